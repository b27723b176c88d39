"""`adapters_core.cpu_flags`: the CPU's flags as the process may use them, an x86-64 level override leaving out
the vector extensions above it (so that `make test-avx2-paths` on an AVX-512 machine sees an AVX2 one)."""

import pytest
import torch

from adapters_core import cpu_flags as flags_module
from adapters_core.cpu_flags import ARCH_SWITCH, cpu_flags, is_x86_64
from service.model import dtype as dtype_module

ZEN4 = ("flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 sse4a avx avx2 fma f16c bmi1 bmi2 popcnt avx512f avx512dq "
        "avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx512vbmi amx_tile amx_bf16 avx_vnni\n")

x86_only = pytest.mark.skipif(not is_x86_64(), reason="x86-64 levels only")


@pytest.fixture
def zen4(monkeypatch):
    monkeypatch.setattr(flags_module, "cpuinfo_flags_line", lambda: ZEN4)


@x86_only
def test_the_avx2_level_leaves_out_avx512_and_amx(zen4, monkeypatch):
    monkeypatch.setenv(ARCH_SWITCH, "x86-64-v3")
    got = cpu_flags()
    assert {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "sse4_2", "fpu"} <= got
    assert not {f for f in got if f.startswith(("avx512", "amx"))}
    assert "sse4a" not in got and "avx_vnni" not in got          # not in any level: left out
    assert cpu_flags("x86-64-v4") >= {"avx512f", "avx512bw", "avx512vl"}
    assert "avx512_bf16" not in cpu_flags("x86-64-v4") and "amx_tile" not in cpu_flags("x86-64-v4")
    assert "avx2" not in cpu_flags("x86-64") and "sse2" in cpu_flags("x86-64")


@x86_only
@pytest.mark.parametrize("arch", [None, "native", "znver4"])
def test_no_level_leaves_every_flag(zen4, monkeypatch, arch):
    monkeypatch.delenv(ARCH_SWITCH, raising=False)
    if arch is not None:
        monkeypatch.setenv(ARCH_SWITCH, arch)
    assert cpu_flags() == frozenset(ZEN4.split(":", 1)[1].split())


@x86_only
def test_the_default_dtype_follows_the_level(zen4, monkeypatch):
    dtype_module.cpu_has_fast_bf16.cache_clear()
    try:
        monkeypatch.delenv(ARCH_SWITCH, raising=False)
        assert dtype_module.default_dtype("cpu") == torch.bfloat16          # this CPU lists avx512_bf16
        dtype_module.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setenv(ARCH_SWITCH, "x86-64-v3")
        assert dtype_module.default_dtype("cpu") == torch.float32           # as an AVX2 + FMA machine
    finally:
        dtype_module.cpu_has_fast_bf16.cache_clear()


@x86_only
def test_this_cpus_flags_under_the_avx2_level(monkeypatch):
    monkeypatch.setenv(ARCH_SWITCH, "x86-64-v3")
    got = cpu_flags()
    assert got <= cpu_flags("native")
    assert not {f for f in got if f.startswith(("avx512", "amx"))}
    assert ("avx2" in got) == ("avx2" in cpu_flags("native"))
