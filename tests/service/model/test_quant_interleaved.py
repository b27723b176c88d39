"""The interleaved layout (csrc/quant_x16.h: Q8_0, Q4_0, Q4_1, F32 and BF16 with 16 rows' blocks woven together)
on every code path this CPU can run (the native build, AVX2 + FMA, SSE2; see test_quant_matmul.py).

The layout holds the same bytes (interleaving and back is the identity), dequantises to gguf's values, and
its matmul equals x @ dequantize(W).T up to rounding order: the kernel sums d * sum(q x) + m * sum(x) per
block where the reference sums (d q + m) x, so the bound is a few ulps of sum(|d q| + |m|) |x| (for Q4_0,
Q8_0, F32 and BF16 that is sum |w| |x|, for Q4_1 it is the same weight with |d| and |m|). Each row of x gives
the same bits whether it comes alone (the register path), among 8 or among 70 (the tile path, across a 64-row
pass; F32 / BF16: passes of 16, 5 or 4 rows, then 8, 4, 2, 1): a sequence's logits do not depend on its batch. And
no path reads a row of x past the last (x placed just before a page the process may not read)."""

import ctypes
import mmap

import numpy as np
import pytest
import torch

from service.model import quant_linear
from service.model.quant_formats import StoredWeight, deinterleave, dequantize
from service.model.quant_linear import QuantLinear, group_quant_linears

from test_quant_matmul import ARCHES, build, stored

pytestmark = pytest.mark.slow          # shares test_quant_matmul's extra builds
FORMATS = ["Q8_0", "Q4_0", "Q4_1", "F32", "BF16"]


def interleave(weight: StoredWeight, module) -> StoredWeight:
    data = module.interleave(weight.data.view(torch.uint8), weight.kernel_id, weight.columns)
    return StoredWeight(data, weight.format, weight.columns, interleaved=True)


def magnitudes(weight: StoredWeight) -> torch.Tensor:
    """|d q| + |m| per value (Q4_1: the weight with its scales' sign bits cleared), |w| otherwise."""
    if weight.format != "Q4_1":
        return dequantize(weight).abs()
    blocks = weight.data.numpy().reshape(weight.shape[0], -1, 20).copy()
    blocks[..., 1] &= 0x7F                                             # d's sign bit (fp16, little-endian)
    blocks[..., 3] &= 0x7F                                             # m's
    return dequantize(StoredWeight(torch.from_numpy(blocks.reshape(weight.shape[0], -1)), "Q4_1", weight.columns))


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_interleaved_layout_holds_the_same_weight(arch, fmt):
    module = build(arch)
    weight = stored(fmt, 48, 256, seed=3 + len(fmt))
    woven = interleave(weight, module)
    as_bytes = weight.data.view(torch.uint8)
    assert woven.kernel_id != weight.kernel_id and not torch.equal(woven.data, as_bytes)
    assert torch.equal(deinterleave(woven).data.view(torch.uint8), as_bytes)
    dense = dequantize(weight)
    assert torch.equal(dequantize(woven), dense)
    rows = torch.tensor([0, 17, 47, 5, 17])
    assert torch.equal(module.dequant_rows(woven.data, woven.kernel_id, 256, rows), dense[rows])


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_interleaved_matmul_equals_the_dequantised_one_and_ignores_the_batch(arch, fmt):
    module = build(arch)
    rows, columns = 64, 512
    weight = stored(fmt, rows, columns, seed=len(fmt))
    woven = interleave(weight, module)
    dense, size = dequantize(weight), magnitudes(weight)
    bias = torch.randn(rows)
    x = torch.randn(70, columns, generator=torch.Generator().manual_seed(5))
    many = quant_linear.matmul(x, woven, bias, module=module)                       # [70, rows]
    ref = (x.double() @ dense.double().T + bias.double()).float()
    bound = 64 * torch.finfo(torch.float32).eps * (x.abs().double() @ size.double().T).float() + 1e-6
    assert ((many - ref).abs() <= bound).all(), f"{fmt} on {arch}: {(many - ref).abs().max()}"
    for m in (1, 3, 5, 6, 7, 8, 9, 16):
        assert torch.equal(quant_linear.matmul(x[:m], woven, bias, module=module), many[:m]), \
            f"{fmt} on {arch}: {m} rows differ from the same rows among 70"
    assert torch.equal(quant_linear.matmul(x[64:67], woven, bias, module=module), many[64:67])


def test_service_weights_are_interleaved_where_the_layout_applies(monkeypatch):
    module = build("native")
    q, k, v = (QuantLinear(quant_linear.interleaved(stored("Q4_1", n, 128, seed=n))) for n in (64, 32, 32))
    assert q.stored.interleaved and k.stored.interleaved
    group = group_quant_linears([q, k, v])
    assert group is not None and group.stored.interleaved
    x = torch.randn(5, 128)
    joined = group.compute(x)                                                        # [5, 128]
    alone = torch.cat([quant_linear.matmul(x, m.stored, module=module) for m in (q, k, v)], dim=1)
    assert torch.equal(joined, alone)
    odd = stored("Q4_1", 40, 128, seed=1)                       # rows not in whole groups of 16: left as is
    assert quant_linear.interleaved(odd) is odd
    plain = stored("I8", 32, 128, seed=2)
    assert quant_linear.interleaved(plain) is plain
    fp32 = stored("F32", 32, 128, seed=3)
    woven = quant_linear.interleaved(fp32)                      # its bytes, so nothing takes it for the matrix
    assert woven.interleaved and woven.data.dtype == torch.uint8 and torch.equal(dequantize(woven), fp32.data)
    narrow = stored("F32", 32, 48, seed=3)                      # columns not in whole blocks of 32: as is
    assert quant_linear.interleaved(narrow) is narrow
    monkeypatch.setenv("ADAPTER_SERVE_INTERLEAVE", "0")
    weight = stored("Q8_0", 32, 128, seed=4)
    assert quant_linear.interleaved(weight) is weight
    with pytest.raises(ValueError, match="interleaved"):
        q.stored.rows(torch.arange(64))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        module.interleave(odd.data, odd.kernel_id, 128)
    assert np.array_equal(deinterleave(weight).data.numpy(), weight.data.numpy())


def guarded_rows(rows: int, columns: int):
    """x [rows, columns] fp32 ending exactly where a page the process may not read begins: a kernel that
    reads past x's last row faults at once (a test failure) instead of reading someone else's memory."""
    page = mmap.PAGESIZE
    size = rows * columns * 4
    assert size <= page
    buf = mmap.mmap(-1, 2 * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + page), page, 0) == 0          # PROT_NONE
    values = torch.frombuffer(buf, dtype=torch.float32, count=page // 4)
    x = values[page // 4 - rows * columns:].view(rows, columns)
    x.copy_(torch.randn(rows, columns))
    return x, buf


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "F32", "BF16", "I8", "Q4_K"])
def test_no_row_of_x_is_read_past_the_last(arch, fmt):
    module = build(arch)
    columns = 256 if fmt == "Q4_K" else 128
    weight = stored(fmt, 32, columns, seed=9)
    weights = [weight] + ([interleave(weight, module)] if fmt in FORMATS else [])
    for rows in range(1, mmap.PAGESIZE // (columns * 4) + 1):
        x, buf = guarded_rows(rows, columns)
        for w in weights:
            out = quant_linear.matmul(x, w, module=module)
            torch.testing.assert_close(out, x @ dequantize(w).T, atol=1e-3, rtol=1e-4)
        del x
        ctypes.CDLL(None).mprotect(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + mmap.PAGESIZE),
                                   mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)


def test_reading_ahead_between_matmuls_changes_no_bit():
    """`read_ahead` (quant_read_ahead: the decoder's C++ loop has the matmul pool's workers read the start of
    the next weight while it works between two matmuls) from a thread other than the process's first, as the
    engine's: every matmul after one gives the same bits as without, a large weight's read still going when the
    next one is posted or the next matmul starts is stopped there (the calls return), and weights without the
    interleaved layout are left alone."""
    import threading

    module = build("native")
    weights = [interleave(stored(fmt, 256, 512, seed=i), module) for i, fmt in enumerate(FORMATS)]
    big = interleave(stored("F32", 2048, 2048, seed=9), module)                  # 16 MB: far more than is read
    plain = stored("Q4_1", 256, 512, seed=7)                                     # row-major: nothing to read
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    expected = [module.quant_matmul(x, w.data, w.kernel_id, None, None) for w in weights]
    got, errors = [], []

    def engine_like():
        try:
            for _ in range(40):
                for w in weights:
                    module.read_ahead(big.data, big.kernel_id)
                    module.read_ahead(plain.data, plain.kernel_id)
                    module.read_ahead(w.data, w.kernel_id)
                    got.append(module.quant_matmul(x, w.data, w.kernel_id, None, None))
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=engine_like)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and errors == []
    assert len(got) == 40 * len(weights)
    assert all(torch.equal(out, expected[i % len(weights)]) for i, out in enumerate(got))


@pytest.mark.parametrize("arch", list(ARCHES))
def test_pulling_spans_alongside_changes_no_bit(arch):
    """`quant_matmul_spans` (quant_matmul_alongside: the decoder's C++ loop hands each matmul the LoRA factors
    the fused call after it reads, for the matmul's threads to pull into the cache as they go): every
    interleaved format at 1, 5, 16 and 70 rows of x (the register, tile and multi-pass paths) gives the bits of
    quant_matmul, on the process's first thread (OpenMP) and on another (the kernels' pool), with spans of a
    live buffer, spans larger than the matmul has steps for, an address no page backs (a prefetch cannot
    fault), and none (F32 / BF16 past 2 rows of x drop them); row-major weights take the spans and ignore them,
    with every build this CPU runs."""
    import threading

    module = build(arch)
    weights = [interleave(stored(fmt, 256, 512, seed=i), module) for i, fmt in enumerate(FORMATS)]
    weights.append(stored("Q4_1", 256, 512, seed=11))                            # row-major: no spans taken
    buffer = torch.randn(3 << 20)                                                # 12 MB of "factors"
    base = buffer.data_ptr() & ~63
    cases = [torch.tensor([[base, 64 << 10], [base + (1 << 20), 4 << 20]], dtype=torch.int64),
             torch.tensor([[base, 12 << 20]], dtype=torch.int64),                # more lines than blocks x 16
             torch.tensor([[4096, 1 << 20]], dtype=torch.int64),                 # unmapped: prefetched, no fault
             torch.zeros(0, 2, dtype=torch.int64)]
    xs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) for rows in (1, 5, 16, 70)]
    expected = [[module.quant_matmul(x, w.data, w.kernel_id, None, None) for x in xs] for w in weights]

    def check(got):
        for w, want in zip(weights, expected):
            for x, out in zip(xs, want):
                for spans in cases:
                    got.append(torch.equal(module.quant_matmul_spans(x, w.data, w.kernel_id, None, None, spans), out))

    on_first, on_other = [], []
    check(on_first)
    thread = threading.Thread(target=check, args=(on_other,))
    thread.start()
    thread.join(120)
    count = len(weights) * len(xs) * len(cases)
    assert on_first == [True] * count and on_other == [True] * count
    with pytest.raises(RuntimeError, match="int64 \\[n, 2\\]"):
        module.quant_matmul_spans(xs[0], weights[0].data, weights[0].kernel_id, None, None, torch.zeros(4))
    with pytest.raises(RuntimeError, match="must not be negative"):
        module.quant_matmul_spans(xs[0], weights[0].data, weights[0].kernel_id, None, None,
                                  torch.tensor([[base, -64]], dtype=torch.int64))


def test_both_prefetch_hints_give_the_same_bits():
    """The F32 / BF16 chunks' prefetch is non-temporal on AMD CPUs with AVX-512 and not elsewhere, and (F32) at 1-2 rows
    of x absent on AMD CPUs without AVX-512 (quant_x16.h), decided when the kernel loads;
    ADAPTER_SERVE_PREFETCH_NTA and ADAPTER_SERVE_PREFETCH_AHEAD force each, so every path runs here whatever the
    CPU: hints, so the same bits at one and at 16 rows of x."""
    import os
    import subprocess
    import sys
    import tempfile

    module = build("native")
    code = (
        "import torch, sys\n"
        "from service.model import quant_linear\n"
        "from test_quant_matmul import stored\n"
        "from test_quant_interleaved import interleave\n"
        "m = quant_linear.kernel()\n"
        "outs = []\n"
        "for fmt in ('F32', 'BF16'):\n"
        "    w = interleave(stored(fmt, 256, 512, seed=5), m)\n"
        "    for rows in (1, 16):\n"
        "        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))\n"
        "        outs.append(m.quant_matmul(x, w.data, w.kernel_id, None, None))\n"
        "torch.save(outs, sys.argv[1])\n")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))          # the checkout: service/ lives there
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for hint, ahead in (("0", "8192"), ("1", "8192"), ("0", "0")):
            path = os.path.join(tmp, f"{hint}-{ahead}.pt")
            env = dict(os.environ, ADAPTER_SERVE_PREFETCH_NTA=hint, ADAPTER_SERVE_PREFETCH_AHEAD=ahead,
                       PYTHONPATH=os.pathsep.join([here, root]))
            done = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            results.append(torch.load(path))
    assert len(results[0]) == 4 and all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
    weight = interleave(stored("F32", 256, 512, seed=5), module)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    assert torch.equal(module.quant_matmul(x, weight.data, weight.kernel_id, None, None), results[0][0])


@pytest.mark.parametrize("arch", list(ARCHES))
def test_work_beside_the_matmul_adds_its_delta_with_the_bits_of_an_add_after(arch):
    """`quant_matmul_beside_rows` (quant_matmul_beside: the decoder's C++ loop has each matmul's threads compute
    the LoRA deltas of its input beside it, then adds them): the result is quant_matmul's plus the delta, the
    bits of `out + delta`, whether the work is done before the matmul stores its rows (no wait: the workers take
    it first; one row: no worker at all) or after (a long wait: every row's delta added at the end), on every
    interleaved format, a row-major one (the work first, then the matmul) and int8 with row scales, with a
    bias, at 1, 5, 16 and 70 rows of x, on the process's first thread (OpenMP) and on another (the pool)."""
    import threading

    module = build(arch)
    weights = [interleave(stored(fmt, 256, 512, seed=i), module) for i, fmt in enumerate(FORMATS)]
    weights += [stored("Q4_1", 256, 512, seed=11), stored("I8", 256, 512, seed=12)]
    bias = torch.randn(256)
    xs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) for rows in (1, 5, 16, 70)]
    deltas = [torch.randn(len(x), 256) * 1e-3 for x in xs]
    deltas[1][2, :16] = -0.0                                                    # -0 changes no bit of out
    cases = [(w, x, d, wait) for w in weights for x, d in zip(xs, deltas) for wait in (0, 3000 if len(x) < 70 else 0)]

    def check(got):
        for w, x, delta, wait in cases:
            scale = w.row_scale if w.format == "I8" else None
            want = module.quant_matmul(x, w.data, w.kernel_id, scale, bias) + delta
            out = module.quant_matmul_beside_rows(x, w.data, w.kernel_id, scale, bias, delta, wait)
            got.append(torch.equal(out, want))

    on_first, on_other = [], []
    check(on_first)
    thread = threading.Thread(target=check, args=(on_other,))
    thread.start()
    thread.join(120)
    assert on_first == [True] * len(cases) and on_other == [True] * len(cases)
    with pytest.raises(RuntimeError, match="contiguous fp32 \\[M, N\\]"):
        module.quant_matmul_beside_rows(xs[0], weights[0].data, weights[0].kernel_id, None, None, deltas[1], 0)
