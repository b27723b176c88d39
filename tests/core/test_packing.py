"""`pack_adapter_tensors` keeps every tensor's key, shape, dtype and value, in one buffer per dtype with LoRA B
transposed, and a packed adapter then serves without a copy: its stacks read the loaded parameters' storage."""
import torch

import adapters_core as ac
from adapters_core.packing import pack_adapter_tensors


def test_values_kept_one_buffer_per_dtype_b_transposed():
    g = torch.Generator().manual_seed(0)
    tensors = {"m.q.lora_A.weight": torch.randn(4, 12, generator=g),
               "m.q.lora_B.weight": torch.randn(10, 4, generator=g),
               "m.e.lora_embedding_B": torch.randn(6, 4, generator=g).bfloat16(),
               "m.e.lora_embedding_A": torch.randn(4, 20, generator=g).bfloat16(),
               "m.k.lora_B": torch.randn(8, 3, generator=g),                     # AdaLoRA
               "m.k.lora_E": torch.randn(3, 1, generator=g),
               "m.norm.weight": torch.randn(12, generator=g)}
    packed = pack_adapter_tensors(tensors)
    assert list(packed) == list(tensors)
    for key, t in tensors.items():
        assert packed[key].dtype == t.dtype and torch.equal(packed[key], t), key
    for key in ("m.q.lora_B.weight", "m.e.lora_embedding_B", "m.k.lora_B"):
        assert packed[key].T.is_contiguous() and not packed[key].is_contiguous()
    assert packed["m.q.lora_A.weight"].is_contiguous()
    storages = {t.untyped_storage().data_ptr() for t in packed.values()}
    assert len(storages) == 2                                                  # fp32 and bf16


def test_packed_adapter_is_served_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 24))
    config = ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    g = torch.Generator().manual_seed(1)
    state = {"q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
             "q_proj.lora_B.weight": torch.randn(24, 4, generator=g)}
    packed = pack_adapter_tensors(state)
    ac.load_adapter(model, "x", adapter_name="a", config=config, state_dict=packed, low_cpu_mem_usage=True)
    x = torch.randn(3, 16, generator=g)
    with torch.no_grad(), ac.token_batch(model, ["a", "a", "a"]):
        out = model(x)
    a_fact, bt, _ = model.q_proj.stack.lora[ac.adapter_slot(model, "a")]
    assert a_fact.data_ptr() == packed["q_proj.lora_A.weight"].data_ptr()
    assert bt.data_ptr() == packed["q_proj.lora_B.weight"].data_ptr()       # no copy on the serving side
    expected = model.q_proj.base_layer(x) + x @ state["q_proj.lora_A.weight"].T @ state["q_proj.lora_B.weight"].T * 2
    torch.testing.assert_close(out, expected)
