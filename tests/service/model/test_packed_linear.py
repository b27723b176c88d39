"""Prepacked bf16 linears and grouped projections compute exactly what plain `F.linear` computes: a packed
decoder (q/k/v and gate/up grouped) gives bit-identical logits to an unpacked one, with and without
adapters (LoRA through the mixed-batch path, IA3 scaling a member's input so it computes alone), and a
weight changed in place is repacked."""

import pytest
import torch
import transformers

import adapters_core as ac
from service.model.config import ModelConfig
from service.model.decoder import Decoder
from service.model.packed_linear import PackedLinear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.bfloat16),
                                reason="no oneDNN bf16 linear packing here (needs a torch build with oneDNN and "
                                       "a CPU with AVX-512 BW/VL/DQ)")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def decoders():
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)).eval()     # q/k/v carry a bias
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    packed = Decoder.from_state_dict(config, hf.state_dict(), dtype=torch.bfloat16)
    plain = Decoder.from_state_dict(config, hf.state_dict(), dtype=torch.bfloat16, pack=False)
    return packed, plain


def ids():
    return torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))


def test_packed_grouped_decoder_is_bit_identical_to_plain():
    packed, plain = decoders()
    attn = packed.model.layers[0].self_attn
    assert type(attn.q_proj) is PackedLinear and attn.qkv_group is not None
    assert packed.model.layers[0].mlp.gate_up_group is not None
    with torch.inference_mode():
        out, ref = packed(ids()), plain(ids())
    assert torch.equal(out, ref)
    # every grouped member was served by its group: none packed a weight of its own
    assert attn.q_proj._packed is None and attn.v_proj._packed is None
    assert packed.model.layers[1].mlp.up_proj._packed is None
    assert attn.o_proj._packed is not None


def test_adapters_on_grouped_members_equal_plain():
    packed, plain = decoders()
    for model in (packed, plain):
        torch.manual_seed(3)
        ac.inject_adapter_in_model(ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                 init_lora_weights=False), model, "lora")
        ac.inject_adapter_in_model(ac.IA3Config(target_modules=["k_proj", "up_proj", "down_proj"],
                                                feedforward_modules=["up_proj", "down_proj"],
                                                init_ia3_weights=False), model, "ia3")
        model.to(torch.bfloat16)
    names = ["lora", "ia3", "__base__"]
    with torch.inference_mode():
        with ac.mixed_batch(packed, names):
            out = packed(ids())
        with ac.mixed_batch(plain, names):
            ref = plain(ids())
        ac.set_adapter(packed, "ia3")
        ac.set_adapter(plain, "ia3")
        out_ia3, ref_ia3 = packed(ids()), plain(ids())
    assert torch.equal(out, ref)
    assert torch.equal(out_ia3, ref_ia3)
    # up_proj's input is scaled by IA3 (a different tensor), so it computed alone: its own packed weight exists
    assert packed.model.layers[0].mlp.up_proj.base_layer._packed is not None


def test_weight_changed_in_place_is_repacked():
    packed, plain = decoders()
    with torch.inference_mode():
        before = packed(ids())
    for model in (packed, plain):
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
            model.model.layers[1].mlp.gate_proj.weight.add_(0.01)
    with torch.inference_mode():
        out, ref = packed(ids()), plain(ids())
    assert not torch.equal(out, before)
    assert torch.equal(out, ref)
