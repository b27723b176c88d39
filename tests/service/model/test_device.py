"""The `device` setting resolved at start-up (`service/model/device.py`), and the CPU kernels' gates.

`auto` picks the first GPU when torch sees one, else the CPU; `cuda` / `cuda:N` that this machine cannot
serve, and names that are no torch device the service runs on, are refused with a message naming the setting,
by `build_state` before any model is loaded and by `adapter-serve` (exit 2) before any kernel is built. The
C++ CPU kernels' gates and the Triton kernels' gates refuse tensors of other devices (the meta device stands
in for a GPU here), so neither set of kernels is ever handed the other's tensors."""
import pytest
import torch

from adapters_core import cuda_lora
from service.app import build_state
from service.cli import main
from service.model import cpu_ops, cuda_ops
from service.model.device import resolve_device
from service.model.packed_linear import _packable
from service.settings import Settings


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("setting,gpus,expected", [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), (" CPU ", 0, "cpu"),
    ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"), ("", 0, "cpu"),
])
def test_resolves(monkeypatch, setting, gpus, expected):
    fake_gpus(monkeypatch, gpus)
    assert resolve_device(setting) == torch.device(expected)


@pytest.mark.parametrize("setting,gpus,message", [
    ("cuda", 0, "sees no usable CUDA device"), ("cuda:0", 0, "sees no usable CUDA device"),
    ("cuda:2", 2, "has 2 CUDA device"), ("mps", 0, "auto, cpu, cuda or cuda:N"),
    ("gpu", 1, "auto, cpu, cuda or cuda:N"), ("meta", 0, "auto, cpu, cuda or cuda:N"),
])
def test_refuses_what_cannot_run_here(monkeypatch, setting, gpus, message):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(ValueError, match=message) as info:
        resolve_device(setting)
    assert repr(setting) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable GPU")
def test_service_refuses_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="device 'cuda'"):
        build_state(Settings(device="cuda", adapter_dir=str(tmp_path / "store")))
    with pytest.raises(SystemExit) as done:
        main(["--device", "cuda", "--adapter-dir", str(tmp_path / "store")])
    assert done.value.code == 2
    assert "--device: device 'cuda'" in capsys.readouterr().err


def test_kernel_gates_refuse_other_devices(monkeypatch):
    """The meta device stands in for a GPU: the C++ kernels' gates refuse it; the Triton gates take only CUDA
    tensors (or CPU tensors under the interpreter when asked to) and never meta ones."""
    meta = torch.empty(4, 8, device="meta")
    cpu = torch.empty(4, 8)
    monkeypatch.setattr(cpu_ops, "kernel", lambda: object())                 # as if built
    assert cpu_ops.usable(cpu, cpu) and not cpu_ops.usable(meta, meta) and not cpu_ops.usable(cpu, meta)
    assert _packable(cpu, cpu) and not _packable(meta, meta)
    assert not cuda_ops.usable(meta) and not cuda_lora.applies(meta)
    monkeypatch.setattr(cuda_ops._KERNELS, "mode", "auto")
    monkeypatch.setattr(cuda_lora._KERNELS, "mode", "auto")
    assert not cuda_ops.usable(cpu) and not cuda_lora.applies(cpu)          # auto: CPU tensors never
