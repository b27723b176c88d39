"""The fused CPU kernel (`adapters_core/csrc/sgmv.cpp`) computes what the torch path computes: directly
against each slot's `((A x) * scale) @ Bt` for mixed ranks and dtypes side by side (strided output rows
included), and through
`token_batch` / `mixed_batch` on decode-shaped and prefill-shaped batches against the same model with the
kernel switched off (the gathered-rows `bmm` path).
Under CI the kernel must build (a compiler is there); elsewhere its absence skips these tests."""
import os

import pytest
import torch

import adapters_core as ac
from adapters_core import sgmv

from sgmv_tables import Slots


if sgmv.kernel() is None:
    if os.environ.get("CI"):
        raise RuntimeError("the fused CPU kernel did not build under CI (see the adapters_core warning)")
    pytest.skip("the fused CPU kernel is unavailable here (no compiler or ninja)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("n_in, fout", [(40, 70), (32, 128)])   # masked tails / whole 16-value and 64-column steps
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_torch_for_mixed_ranks_and_dtypes(xdt, n_in, fout):
    """Slots of ranks 1-37 (below, at and past the 4-row and 16-lane steps) and of every dtype side by side,
    an empty slot, strided output rows inside a wider tensor; rows with a partial last chunk and rows of whole
    chunks only (the kernel loads those without a mask)."""
    ranks = [0, 6, 1, 16, 37, 3]
    slots_def = Slots(n_in, fout, ranks, [torch.float32, torch.float32, torch.bfloat16, torch.float16,
                                          torch.bfloat16, torch.float32])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, n_in, generator=g).to(xdt)
    slots = torch.tensor([3, 0, 4, 3, 1, 2, 4, 5, 0])
    wide = torch.randn(9, fout + 10, generator=g).to(xdt)
    result = wide[:, 5:5 + fout]
    wide_before, before = wide.clone(), result.clone()
    sgmv.lora_add_group_([result], x, [slots_def.table], slots)
    expected = (before.double() + slots_def.delta(x, slots)).to(xdt)
    tol = 1e-5 if xdt == torch.float32 else 1e-2
    torch.testing.assert_close(result, expected, atol=tol, rtol=tol)
    assert torch.equal(wide[:, :5], wide_before[:, :5]) and torch.equal(wide[:, 5 + fout:], wide_before[:, 5 + fout:])
    assert torch.equal(result[1], before[1]) and torch.equal(result[8], before[8])     # slot 0: nothing added
    assert not torch.equal(result, before)


def test_kernel_refuses_bad_input():
    slots_def = Slots(4, 5, [0, 3], [torch.float32, torch.float32])
    with pytest.raises(RuntimeError, match="slot out of range"):
        sgmv.lora_add_group_([torch.zeros(1, 5)], torch.zeros(1, 4), [slots_def.table], torch.tensor([2]))
    with pytest.raises(RuntimeError, match="do not chain"):
        sgmv.lora_add_group_([torch.zeros(1, 5)], torch.zeros(1, 3), [slots_def.table], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="do not chain"):
        sgmv.lora_add_group_([torch.zeros(1, 6)], torch.zeros(1, 4), [slots_def.table], torch.tensor([1]))
    bad = slots_def.table.clone()
    bad[1, 4] = 7                                          # an unknown dtype code
    with pytest.raises(RuntimeError, match="malformed"):
        sgmv.lora_add_group_([torch.zeros(1, 5)], torch.zeros(1, 4), [bad], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="int64"):
        sgmv.lora_add_group_([torch.zeros(1, 5)], torch.zeros(1, 4), [slots_def.table.int()], torch.tensor([1]))
    empty = torch.zeros(1, 5)                              # a slot with no adapter needs no matching sizes
    sgmv.lora_add_group_([empty], torch.zeros(1, 3), [slots_def.table], torch.tensor([0]))
    assert torch.equal(empty, torch.zeros(1, 5))


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(32, 48))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("down_proj", torch.nn.Linear(48, 16))
    for i, r in enumerate((4, 8, 2)):
        ac.inject_adapter_in_model(ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False), model, f"a{i}")
    return model.to(dtype).eval()


def test_strided_slot_tensor_is_accepted():
    model = _model(torch.float32)
    names = ["a1", "a0", "a2"]
    slots = torch.tensor([[ac.adapter_slot(model, n), 0] for n in names])[:, 0]       # a strided view
    assert not slots.is_contiguous()
    x = torch.randn(len(names), 32)
    with torch.inference_mode():
        with ac.token_batch(model, slots):
            by_slot = model(x)
        with ac.token_batch(model, names):
            by_name = model(x)
    assert torch.equal(by_slot, by_name)


# (token batch adapters, mixed-batch row adapters, tokens per row): decode-shaped (one token per segment)
# and prefill-shaped (runs of several tokens per adapter beside single ones; rows of several tokens).
BATCHES = {
    "decode": (["a0", "a2", "__base__", "a1", "a0", "a1"], ["a0", "a2", "__base__", "a1", "a0", "a1"], 1),
    "prefill": (["a0"] * 5 + ["a2"] + ["__base__"] * 3 + ["a1"] * 7 + ["a0"], ["a2", "__base__", "a0", "a1"], 6),
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_equal_the_torch_path(monkeypatch, dtype, batch):
    """Every token goes through the kernel with its own slot, and the result is the torch path's."""
    token_names, row_names, row_len = BATCHES[batch]
    model = _model(dtype)
    x = torch.randn(len(token_names), 32).to(dtype)
    rows = torch.randn(len(row_names), row_len, 32).to(dtype)
    calls = []
    fused = sgmv.lora_add_group_
    monkeypatch.setattr(sgmv, "lora_add_group_", lambda *args: calls.append(1) or fused(*args))
    with torch.inference_mode():
        with ac.token_batch(model, token_names):
            fused_tokens = model(x)
        with ac.mixed_batch(model, row_names):
            fused_rows = model(rows)
        assert len(calls) == 4                       # both adapted layers, both batches, through the kernel
        monkeypatch.setattr(sgmv, "kernel", lambda: None)
        with ac.token_batch(model, token_names):
            plain_tokens = model(x)
        with ac.mixed_batch(model, row_names):
            plain_rows = model(rows)
        assert len(calls) == 4
        ac.disable_adapters(model)
        base_rows = model(rows)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused_tokens, plain_tokens, atol=tol, rtol=tol)
    torch.testing.assert_close(fused_rows, plain_rows, atol=tol, rtol=tol)
    on_base = [i for i, n in enumerate(row_names) if n == "__base__"]
    adapted = [i for i, n in enumerate(row_names) if n != "__base__"]
    assert torch.equal(fused_rows[on_base], base_rows[on_base])                    # base rows untouched
    assert (fused_rows - base_rows).abs().flatten(1).amax(-1)[adapted].min() > 10 * tol   # adapters acted


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dst_dtype", DTYPES)
def test_transpose_copy_equals_torch_copy(src_dtype, dst_dtype):
    """The tiled transpose a load uses for LoRA B gives `copy_`'s values (its rounding to the dtype too) for
    shapes inside, at and past its 16 x 16 tiles, including NaN, inf and a value that rounds differently
    (NaN payloads may differ: a load refuses NaN anyway)."""
    g = torch.Generator().manual_seed(3)
    for rows, cols in [(1, 1), (16, 16), (37, 8), (1536, 36), (5, 70)]:
        src = (torch.randn(rows, cols, generator=g) * 300).to(src_dtype)
        src.view(-1)[0] = float("nan")
        if src.numel() > 2:
            src.view(-1)[1], src.view(-1)[2] = float("inf"), 1.00390625       # 1 + 2^-8: bf16 rounds it to even
        want = torch.empty(cols, rows, dtype=dst_dtype).copy_(src.T)
        got = torch.empty(cols, rows, dtype=dst_dtype)
        sgmv.transpose_copy_(got, src)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{rows} x {cols}")
