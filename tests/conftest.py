"""Shared pytest setup: deterministic seeds and a quiet, single-threaded torch so tests are repeatable on 2 cores."""
import atexit
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton's kernels (the CUDA path) run only under Triton's interpreter, which must be chosen
# before anything imports triton (transformers and peft may): tests/core/test_triton_sgmv.py and
# tests/service/model/test_triton_attention.py run them so. With a GPU, tests/gpu checks them on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@atexit.register
def _quiet_triton_teardown() -> None:
    """libtriton's nanobind bindings report objects still alive at interpreter shutdown (hundreds of lines after
    pytest's summary, a known report that Triton silences the same way in its own workers): once triton was
    loaded, stderr goes to /dev/null for the teardown only, after every test and report has run."""
    if "triton._C.libtriton" in sys.modules:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in tmp_path, with the hub client forced offline (no network)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
