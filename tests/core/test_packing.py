"""`pack_adapter_tensors` keeps every tensor's key, shape, dtype and value, in one buffer per dtype with LoRA B
transposed, and a packed adapter then serves without a copy: its stacks read the loaded parameters' storage.
With `factor_dtype` (a server's adapter dtype) it casts the LoRA / AdaLoRA factors in that copy, and the loaders
hold them in that dtype whatever the base layer's."""
import pytest
import torch

import adapters_core as ac
from adapters_core.management import cast_adapter_factors
from adapters_core.packing import cast_factor_tensors, is_factor_tensor, pack_adapter_tensors
from adapters_core.prepared import prepare_adapter


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


FACTOR_KEYS = {"m.q.lora_A.weight", "m.q.lora_B.weight", "m.q.lora_B.bias", "m.e.lora_embedding_A",
               "m.e.lora_embedding_B", "m.k.lora_A", "m.k.lora_E", "m.k.lora_B"}


def test_factor_dtype_casts_the_products_tensors_only():
    """A server's adapter dtype casts LoRA / AdaLoRA factors (and LoRA B's bias) in the packing copy; IA3 vectors,
    DoRA magnitudes and other tensors keep their dtype."""
    g = torch.Generator().manual_seed(0)
    shapes = {"m.q.lora_A.weight": (4, 12), "m.q.lora_B.weight": (10, 4), "m.q.lora_B.bias": (10,),
              "m.e.lora_embedding_A": (4, 20), "m.e.lora_embedding_B": (6, 4), "m.k.lora_A": (3, 12),
              "m.k.lora_E": (3, 1), "m.k.lora_B": (8, 3), "m.v.ia3_l": (8, 1), "m.q.lora_magnitude_vector": (10,),
              "m.norm.weight": (12,)}
    tensors = {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}
    assert {key for key in tensors if is_factor_tensor(key)} == FACTOR_KEYS
    packed = pack_adapter_tensors(tensors, torch.bfloat16)
    cast = cast_factor_tensors(tensors, torch.bfloat16)
    for key, t in tensors.items():
        want = t.bfloat16() if key in FACTOR_KEYS else t
        assert packed[key].dtype == cast[key].dtype == want.dtype, key
        assert torch.equal(packed[key], want) and torch.equal(cast[key], want), key
    assert packed["m.q.lora_B.weight"].T.is_contiguous()
    assert cast_factor_tensors(tensors, None) is tensors


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_factor_dtype_wins_over_a_dense_base(low_cpu_mem_usage):
    """`load_adapter(factor_dtype=bf16)` over an fp32 nn.Linear holds A, B and B's bias in bf16 (PEFT's rule
    would cast them to fp32) and DoRA's magnitude in fp32; the plain forward and a token batch both serve it,
    as the fp32 math on the rounded factors; `prepare_adapter` and `cast_adapter_factors` hold them alike."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 24))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    ac.load_adapter(model, "x", adapter_name="a", config=ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                    state_dict={"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b},
                    low_cpu_mem_usage=low_cpu_mem_usage, factor_dtype=torch.bfloat16)
    bias = torch.randn(24, generator=g)
    magnitude = torch.rand(24, generator=g) + 1
    ac.load_adapter(model, "x", adapter_name="d", config=ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                       use_dora=True),
                    state_dict={"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b,
                                "q_proj.lora_magnitude_vector": magnitude},
                    low_cpu_mem_usage=low_cpu_mem_usage, factor_dtype=torch.bfloat16)
    layer = model.q_proj
    for name in ("a", "d"):
        assert layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype == torch.bfloat16
    assert layer.lora_magnitude_vector["d"].weight.dtype == torch.float32
    x = torch.randn(3, 16, generator=g)
    expected = layer.base_layer(x) + x @ a.bfloat16().float().T @ b.bfloat16().float().T * 2
    ac.set_adapter(model, "a")
    with torch.no_grad():
        plain = model(x)
        with ac.token_batch(model, ["a"] * 3):
            batched = model(x)
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(plain, expected, atol=2e-2, rtol=2e-2)        # PEFT's forward casts x to bf16
    ac.set_adapter(model, "d")
    with torch.no_grad():
        assert model(x).dtype == torch.float32

    config = ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    ac.load_adapter(model, "x", adapter_name="b", config=config, low_cpu_mem_usage=low_cpu_mem_usage,
                    state_dict={"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b, "q_proj.lora_B.bias": bias},
                    factor_dtype=torch.bfloat16)
    assert layer.lora_B["b"].bias.dtype == torch.bfloat16
    ac.set_adapter(model, "b")
    with torch.no_grad():
        assert model(x).dtype == torch.float32                                 # B and its bias share a dtype

    prepared = prepare_adapter(model, ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                               pack_adapter_tensors({"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b}), "p",
                               factor_dtype=torch.bfloat16)
    assert {t.weight.dtype for t in prepared.layers[0][3:]} == {torch.bfloat16}
    ac.load_adapter(model, "x", adapter_name="f", config=ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                    state_dict={"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b})
    assert layer.lora_A["f"].weight.dtype == torch.float32                   # PEFT's rule without factor_dtype
    cast_adapter_factors(model, "f", torch.bfloat16)
    assert layer.lora_A["f"].weight.dtype == layer.lora_B["f"].weight.dtype == torch.bfloat16


def test_trimming_the_heap_keeps_the_gil():
    """`trim_heap` (every few loads on the loader thread) calls glibc's malloc_trim with the GIL held: letting it
    go there beside a busy event loop cost the loader up to the 5 ms switch interval, more than the trim."""
    from adapters_core import packing
    from gil_check import lets_the_gil_go
    if packing._libc() is None or getattr(packing._libc(), "malloc_trim", None) is None:
        pytest.skip("no glibc malloc_trim here: trim_heap does nothing")
    assert not lets_the_gil_go(packing.trim_heap)
