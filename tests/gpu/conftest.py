"""The `gpu` tests' device and guards. `make test` deselects them (`-m "not gpu"`); `make gpu-check` runs them.

`ADAPTER_SERVE_TEST_DEVICE` (default `cuda`) is the device they run on: without a usable CUDA device every
test skips saying so. `bench/gpu_check.py --dry-run` runs them with `cpu` to prove on a CPU-only machine that
they run end to end: the same code on torch's CPU ops, the C++ kernels switched off and the Triton kernels
forced under Triton's interpreter (the environment that script sets). On CUDA, `NativeKernel.module` is
replaced for the test by a guard whose every kernel function fails the test: the C++ CPU kernels must never
be reached on the CUDA path (and, unbuilt there, would otherwise be compiled on first use).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reliability"))   # its model-folder writer

DEVICE = torch.device(os.environ.get("ADAPTER_SERVE_TEST_DEVICE", "cuda"))


@pytest.fixture
def device() -> torch.device:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (ADAPTER_SERVE_TEST_DEVICE=cpu runs these on the CPU: gpu_check --dry-run)")
    return DEVICE


class _GuardModule:
    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, fn: str):
        def call(*args, **kwargs):
            raise AssertionError(f"the C++ CPU kernel {self.name}.{fn} was called during a CUDA test")
        return call


@pytest.fixture(autouse=True)
def no_cpu_kernels_on_cuda(monkeypatch):
    if DEVICE.type == "cuda":
        from adapters_core.native import NativeKernel

        monkeypatch.setattr(NativeKernel, "module", lambda self: _GuardModule(self.name))
    yield
