"""`read_packed_safetensors` gives what `pack_adapter_tensors(load_file(path))` gives (keys, shapes, dtypes, values,
one buffer per dtype, LoRA B stored transposed), with and without a factor dtype, and fails on malformed files as
safetensors does."""
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters_core.packed_read import read_packed_safetensors
from adapters_core.packing import pack_adapter_tensors

from _models import adapter_tensors


@pytest.mark.parametrize("factor_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_equals_load_then_pack(tmp_path, factor_dtype):
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file(adapter_tensors(), path)
    expected = pack_adapter_tensors(load_file(path), factor_dtype)
    got, file_bytes, _ = read_packed_safetensors(path, factor_dtype)
    assert list(got) == list(load_file(path))
    assert file_bytes == sum(t.numel() * t.element_size() for t in adapter_tensors().values())
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert torch.equal(got[key], want), key
        assert got[key].stride() == want.stride(), key                     # B transposed in storage, as packed
    bases = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(bases) == len({t.dtype for t in got.values()})             # one buffer per dtype


def test_malformed_and_truncated_files_fail(tmp_path):
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file(adapter_tensors(), path)
    data = open(path, "rb").read()
    for broken in (data[:-7], data[:20], b"\xff" * 8 + data[8:]):
        with open(path, "wb") as fh:
            fh.write(broken)
        with pytest.raises((SafetensorError, OSError, ValueError)):
            read_packed_safetensors(path)


@pytest.mark.parametrize("factor_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("one_call", [True, False], ids=["unpack", "per-tensor"])
def test_float_files_read_in_one_call_or_per_tensor_alike(tmp_path, monkeypatch, factor_dtype, one_call):
    """A file of fp32 / bf16 / fp16 tensors only (a tensor of an odd byte count among them) goes through the
    kernel's one-call unpack where it is built, else tensor by tensor: both give load-then-pack's result."""
    from adapters_core import packed_read, sgmv

    tensors = {k: v for k, v in adapter_tensors().items() if v.dtype != torch.float64}
    tensors["m.odd.lora_A.weight"] = torch.randn(1, 3).bfloat16()
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file(tensors, path)
    kernel, calls = sgmv.kernel(), []
    if one_call and kernel is None:
        pytest.skip("the C++ kernel cannot be built here (no compiler)")

    class Counting:
        @staticmethod
        def unpack_(*args):
            calls.append(len(args[1]))
            return kernel.unpack_(*args)
    monkeypatch.setattr(packed_read.sgmv, "kernel", (lambda: Counting) if one_call else (lambda: None))
    got, _, nonfinite = read_packed_safetensors(path, factor_dtype)
    assert calls == ([len(tensors)] if one_call else [])
    assert nonfinite == ([] if one_call else None)                    # checked on the kernel path only
    expected = pack_adapter_tensors(load_file(path), factor_dtype)
    assert list(got) == list(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
        assert got[key].stride() == want.stride(), key


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_one_call_read_names_the_tensors_that_are_not_finite(tmp_path, stored):
    """The kernel's read checks each tensor as it writes it: an inf or a NaN anywhere in a tensor (an A, a
    transposed B, the last value of a tensor of odd length) names that tensor and only it; a value finite in
    the file but beyond the held dtype's range (fp32 1e6 held as fp16) is named too."""
    from adapters_core import sgmv

    if sgmv.kernel() is None:
        pytest.skip("the C++ kernel cannot be built here (no compiler)")
    g = torch.Generator().manual_seed(3)
    tensors = {f"m.l{i}.lora_{ab}.weight": torch.randn(*((4, 33) if ab == "A" else (17, 4)), generator=g).to(stored)
               for i in range(4) for ab in "AB"}
    tensors["m.odd.lora_A.weight"] = torch.randn(1, 3, generator=g).to(stored)
    tensors["m.l0.lora_A.weight"][2, 5] = float("nan")
    tensors["m.l2.lora_B.weight"][16, 3] = float("-inf")
    tensors["m.odd.lora_A.weight"][0, 2] = float("inf")
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file(tensors, path)
    _, _, nonfinite = read_packed_safetensors(path)
    assert nonfinite == ["m.l0.lora_A.weight", "m.l2.lora_B.weight", "m.odd.lora_A.weight"]
    if stored == torch.float32:
        tensors = {k: torch.nan_to_num(v) for k, v in tensors.items()}          # finite, if huge
        tensors["m.l3.lora_B.weight"][0, 0] = 1e6
        save_file(tensors, path)
        assert read_packed_safetensors(path)[2] == []
        assert "m.l3.lora_B.weight" in read_packed_safetensors(path, torch.float16)[2]


def test_unpack_refuses_a_tensor_outside_its_buffer():
    from adapters_core import sgmv

    kernel = sgmv.kernel()
    if kernel is None:
        pytest.skip("the C++ kernel cannot be built here (no compiler)")
    with pytest.raises(RuntimeError, match="outside the buffer"):
        kernel.unpack_(torch.zeros(8, dtype=torch.uint8), [torch.empty(4)], [0], [0], [0])     # 16 bytes from 8
    with pytest.raises(RuntimeError, match="dtype code"):
        kernel.unpack_(torch.zeros(8, dtype=torch.uint8), [torch.empty(2)], [0], [7], [0])
