"""The stored-weight matmul kernel (csrc/quant_matmul.cpp) against the reference dequantiser, on every code
path this CPU can run: the service's own build (-march=native: AVX-512 or AVX2 here), the AVX2 + FMA build
(x86-64-v3) and the portable SSE2 build (x86-64). Each format's rows dequantise to exactly gguf's values,
and the matmul equals x @ dequantize(W).T up to fp32 summation order, for 1 to 70 rows of x (one decode
token, a micro-kernel remainder, a decode batch, a prefill chunk past one 64-row pass), and 1-4 rows give
the same bits as the same rows among more (the register path and the tile path agree). A path whose
instructions the CPU lacks is skipped with that reason."""

import os
import platform

import numpy as np
import pytest
import torch

from adapters_core.cpu_flags import ARCH_SWITCH, cpu_flags, is_x86_64
from service.model import quant_linear
from service.model.quant_formats import FORMATS, StoredWeight, dequantize, from_dense

pytestmark = pytest.mark.slow          # the two extra builds take ~25 s each, once per machine


ARCHES = {"native": set(), "x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64": set()}


def build(arch: str):
    if arch != "native" and not is_x86_64():
        pytest.skip(f"-march={arch} is an x86-64 level; this machine is {platform.machine()}")
    missing = ARCHES[arch] - cpu_flags("native")      # what this CPU can run, whatever the level override
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))} for the {arch} build")
    module = quant_linear.kernel(arch)
    if module is None:
        pytest.skip("the C++ kernel cannot be built here (no compiler or ninja)")
    return module


def stored(fmt: str, rows: int, columns: int, seed: int) -> StoredWeight:
    """A weight in `fmt`: converted from random values, or for the block formats random block bytes (every
    bit pattern of the quants and scales) with sane fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    if fmt in ("F32", "BF16", "I8"):
        return from_dense(torch.randn(rows, columns, generator=g), fmt)
    if fmt == "F16":
        return StoredWeight(torch.randn(rows, columns, generator=g).half().view(torch.int16), "F16", columns)
    _, values, nbytes = FORMATS[fmt]
    blocks = torch.randint(0, 256, (rows, columns // values, nbytes), generator=g, dtype=torch.uint8).numpy()
    scale = (np.abs(np.random.default_rng(seed).normal(0.01, 0.005, (rows, columns // values))) + 1e-4)
    half = scale.astype(np.float16)[..., None].view(np.uint8)                   # [rows, blocks, 2]
    at = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[fmt]
    for offset in at:
        blocks[..., offset:offset + 2] = half
    return StoredWeight(torch.from_numpy(blocks.reshape(rows, -1).copy()), fmt, columns)


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kernel_equals_dequantised_matmul(arch, fmt):
    module = build(arch)
    rows, columns = 37, 512                       # 37 rows: a register-block remainder on every path
    weight = stored(fmt, rows, columns, seed=len(fmt))
    dense = dequantize(weight)                    # [rows, columns] fp32, gguf's own values
    got = module.dequant_rows(weight.data, weight.kernel_id, columns, torch.arange(rows))
    if weight.row_scale is not None:
        got = got * weight.row_scale[:, None]
    assert torch.equal(got, dense), "dequantised rows differ from the reference"
    bias = torch.randn(rows)
    for m in (1, 3, 16, 70):
        x = torch.randn(m, columns, generator=torch.Generator().manual_seed(m))
        out = quant_linear.matmul(x, weight, bias, module=module)
        ref = (x.double() @ dense.double().T + bias.double()).float()
        # fp32 sums of 512 products in another order: a few ulps of the sum of |terms|
        bound = 64 * torch.finfo(torch.float32).eps * (x.abs().double() @ dense.abs().double().T).float() + 1e-6
        assert ((out - ref).abs() <= bound).all(), f"{fmt} on {arch}, {m} rows: {(out - ref).abs().max()}"



@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_few_rows_give_the_same_bits_as_many(arch, fmt):
    """1-4 rows of x take the register path (blocks dequantised in registers) for the formats it covers, 8
    rows the L1-tile path; each output row must be bit-identical either way (same values, same order), so a
    sequence's logits do not depend on how many others share its decode step."""
    module = build(arch)
    rows, columns = 37, 256
    weight = stored(fmt, rows, columns, seed=7 + len(fmt))
    bias = torch.randn(rows)
    x = torch.randn(8, columns, generator=torch.Generator().manual_seed(11))
    many = quant_linear.matmul(x, weight, bias, module=module)                   # [8, rows]
    for m in (1, 2, 3, 4):
        few = quant_linear.matmul(x[:m], weight, bias, module=module)
        assert torch.equal(few, many[:m]), f"{fmt} on {arch}: {m} rows differ from the same rows among 8"

def test_kernel_refuses_a_weight_of_the_wrong_size():
    module = build("native")
    weight = stored("Q4_1", 8, 64, seed=0)
    with pytest.raises(RuntimeError, match="bytes"):
        module.quant_matmul(torch.randn(2, 96), weight.data, weight.kernel_id, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        module.dequant_rows(weight.data, weight.kernel_id, 64, torch.tensor([8]))
    with pytest.raises(ValueError, match="blocks of 32"):
        StoredWeight(weight.data, "Q4_1", 48)


def test_strided_rows_and_the_service_build_report_their_path():
    module = build("native")
    assert module.isa() in ("avx512", "avx2", "avx", "generic")
    if "avx512f" in cpu_flags() and not os.environ.get(ARCH_SWITCH):   # (an -march override builds for less)
        assert module.isa() == "avx512"
    weight = stored("Q8_0", 24, 64, seed=3)
    x = torch.randn(5, 128)[:, :64]               # rows 128 apart
    torch.testing.assert_close(quant_linear.matmul(x, weight, module=module), x @ dequantize(weight).T,
                               atol=1e-4, rtol=1e-5)


def _matmul_in_child(queue, x, weight, ref):
    queue.put(bool(((quant_linear.matmul(x, weight) - ref).abs() <= 1e-3).all()))


def test_worker_threads_serve_concurrent_callers_and_forked_children():
    """The kernel's own worker pool (csrc/spin_pool.h): callers from several Python threads at once each get
    their own correct result, and a child forked after the pool started gets a pool of its own."""
    import multiprocessing
    import threading

    build("native")
    weight = stored("Q4_1", 256, 512, seed=4)
    dense = dequantize(weight)
    results = {}

    def call(i):
        x = torch.randn(16, 512, generator=torch.Generator().manual_seed(i))
        for _ in range(20):
            out = quant_linear.matmul(x, weight)
        results[i] = torch.allclose(out, x @ dense.T, atol=1e-3, rtol=1e-4)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: True for i in range(4)}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(9))
    child = ctx.Process(target=_matmul_in_child, args=(queue, x, weight, x @ dense.T))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) is True


def test_kernel_arch_switch_picks_the_build_for_every_kernel(monkeypatch):
    """ADAPTERS_CORE_KERNEL_ARCH replaces -march=native (a benchmark of the AVX2 path on an AVX-512 CPU, or a
    cache shared by several CPU types); explicit levels (the tests' builds) keep theirs."""
    from adapters_core.native import NativeKernel, cpu_key

    monkeypatch.setenv("ADAPTERS_CORE_KERNEL_ARCH", "x86-64-v3")
    switched = NativeKernel("k", "k.cpp", "K_SWITCH")
    assert switched.arch == "x86-64-v3" and switched.full_name == "k_x86_64_v3"
    assert NativeKernel("k", "k.cpp", "K_SWITCH", arch="x86-64").full_name == "k_x86_64"
    monkeypatch.delenv("ADAPTERS_CORE_KERNEL_ARCH")
    assert NativeKernel("k", "k.cpp", "K_SWITCH").full_name == f"k_{cpu_key()}"
