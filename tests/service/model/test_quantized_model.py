"""The embedded SmolLM2 GGUF served as stored (Q4_1 layers, Q8_0 embedding and tied head) against the same
file dequantised to fp32 dense weights, and adapters on the stored base against PEFT on the dequantised one.

Tolerance: Q4_1 and Q8_0 dequantise exactly (the kernel's values equal gguf's, test_quant_matmul.py), so the
two paths differ only in the order of fp32 sums: ~1e-7 relative per dot product, grown through 30 layers to
~1e-5 of logits that reach ~30. 1e-3 absolute is 100x that and far below a logit gap that could change a
greedy choice, and the greedy continuations must be identical. bf16 and int8 storage round the weights,
so those are checked loosely against the dense logits and for the same first greedy tokens."""

import copy

import pytest
import torch

import adapters_core as ac
from adapters_core.errors import UnsupportedFeatureError
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model import load_gguf
from service.model.decoder import Decoder
from service.model.quant_linear import QuantEmbedding, QuantGroup, QuantLinear, kernel
from service.model.weight_format import resolve_weight_format, store_weights

from _model_fixtures import gguf_path, hf_gguf_model, our_gguf_model, random_peft_lora

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(kernel() is None, reason="the C++ kernel cannot be built here (no compiler)")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at", "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models():
    dense_loaded = our_gguf_model()
    dense = Decoder.from_state_dict(dense_loaded.config, dense_loaded.state_dict, dtype=torch.float32,
                                    max_positions=512)
    loaded = load_gguf(gguf_path(), keep_stored=True)
    quant = Decoder.from_state_dict(loaded.config, loaded.state_dict, max_positions=512, stored=loaded.stored)
    return loaded, quant, dense


def greedy(model, loaded, prompts, tokens=24, adapters=None):
    engine = Engine(model, EngineConfig(max_batch_size=len(prompts), max_seq_len=256),
                    eos_token_ids=[loaded.config.eos_token_id])
    requests = [GenerationRequest(loaded.tokenizer.encode(p), SamplingParams(max_tokens=tokens, temperature=0),
                                  (adapters or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
    return [o.token_ids for o in engine.generate(requests)]


def test_gguf_layers_stay_stored(models):
    loaded, quant, _ = models
    layer = quant.model.layers[0]
    assert type(layer.self_attn.q_proj) is QuantLinear and layer.self_attn.q_proj.stored.format == "Q4_1"
    assert isinstance(layer.self_attn.qkv_group, QuantGroup) and isinstance(layer.mlp.gate_up_group, QuantGroup)
    assert type(quant.model.embed_tokens) is QuantEmbedding and quant.lm_head.stored is quant.model.embed_tokens.stored
    assert quant.lm_head.stored.format == "Q8_0"
    assert layer.self_attn.qkv_group.stored.interleaved and quant.lm_head.stored.interleaved   # csrc/quant_x16.h
    stored = sum(w.nbytes for w in loaded.stored.values())
    assert stored < 100 * 2**20, "the stored model is the file's size, not fp32's ~540 MB"
    assert not any(p.numel() > 1e5 for p in quant.parameters()), "no dense copy of a weight matrix"


def test_logits_and_greedy_continuations_equal_the_dequantised_model(models):
    loaded, quant, dense = models
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Spain is Madrid.")])
    with torch.inference_mode():
        out, ref = quant(ids), dense(ids)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
    assert greedy(quant, loaded, PROMPTS) == greedy(dense, loaded, PROMPTS)


def test_lora_on_the_stored_base_equals_peft_on_the_dequantised_base(models, tmp_path):
    loaded, quant, _ = models
    pm = random_peft_lora(hf_gguf_model(), r=8, lora_alpha=16, target_modules=PROJECTIONS)
    pm.save_pretrained(tmp_path / "lora")
    mine = copy.deepcopy(quant)
    ac.load_adapter(mine, str(tmp_path / "lora"), adapter_name="sql")
    assert mine.model.layers[0].self_attn.q_proj.lora_A["sql"].weight.dtype == torch.float32
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[2])])
    with torch.inference_mode():
        ref = pm(input_ids=ids).logits
        out = mine(ids)
        base = quant(ids)
    assert (ref - base).abs().max() > 0.1, "the adapter must change the logits"
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
    # mixed in one engine batch (the fused kernel over the grouped stored projections) = served alone
    mixed = greedy(mine, loaded, PROMPTS[:3], adapters=["sql", None, "sql"])
    assert mixed[1] == greedy(mine, loaded, [PROMPTS[1]])[0]
    assert mixed[0] == greedy(mine, loaded, [PROMPTS[0]], adapters=["sql"])[0]
    with pytest.raises(UnsupportedFeatureError, match="quantized base layer"):
        ac.merge_adapter(mine, ["sql"])


def test_dora_on_the_stored_base_uses_the_dequantised_weight(models, tmp_path):
    loaded, quant, dense = models
    mine, ref_model = copy.deepcopy(quant), copy.deepcopy(dense)
    config = ac.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], use_dora=True,
                           layers_to_transform=[0, 1], init_lora_weights=False)
    ac.inject_adapter_in_model(config, ref_model, adapter_name="d")
    ac.inject_adapter_in_model(config, mine, adapter_name="d")
    ac.set_peft_model_state_dict(mine, ac.get_peft_model_state_dict(ref_model, adapter_name="d"), adapter_name="d")
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[3])])
    with torch.inference_mode():
        torch.testing.assert_close(mine(ids), ref_model(ids), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fmt, atol", [("fp32", 1e-3), ("bf16", 0.5), ("int8", 1.5)])
def test_dense_checkpoints_converted_at_load(models, fmt, atol):
    _, _, dense = models
    loaded = copy.copy(our_gguf_model())
    loaded.state_dict, loaded.stored = dict(loaded.state_dict), {}
    assert resolve_weight_format(fmt, False, torch.device("cpu")) == fmt
    store_weights(loaded, fmt)
    assert {w.format for w in loaded.stored.values()} == {{"fp32": "F32", "bf16": "BF16", "int8": "I8"}[fmt]}
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, max_positions=512, stored=loaded.stored)
    if fmt != "int8" and kernel() is not None:      # F32 / BF16 rows held interleaved (quant_x16.h)
        assert all(w.interleaved for w in loaded.stored.values())
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        out, ref = model(ids), dense(ids)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    assert out[0, -1].argmax() == ref[0, -1].argmax()


def test_weight_format_setting_is_checked():
    cpu = torch.device("cpu")
    assert resolve_weight_format("auto", True, cpu) == "gguf"
    assert resolve_weight_format("auto", False, cpu) == "dense"
    with pytest.raises(ValueError, match="needs a GGUF"):
        resolve_weight_format("gguf", False, cpu)
    with pytest.raises(ValueError, match="weight_format must be one of"):
        resolve_weight_format("q4", True, cpu)
