"""The CUDA kernels' tuning sweep: each Triton kernel of the decode step timed alone over its knobs, on the
Llama-3.2-1B shapes `bench/gpu_bench.py` serves, so one run on a lent GPU says which setting to ship.

The H200 profile of a 64-sequence decode step (BENCHMARKS.md, "GPU") put our two LoRA kernels at ~12 us per
projection (shrink 4.9 after splitting its input features, expand 7.2: each program re-reads every partial
sum) against a base projection's 6-15 us matmul, and our decode attention at 59 us per layer with fp32
(`input_precision="ieee"`) products off the tensor cores. Timed here, per call (the median of calls replayed
from a CUDA graph, as the engine's decode steps run: device time without Python's launch cost; the same
inputs each call, so the factors sit in L2, which a real step's 64 adapters x 7 projections do not):
- SGMV shrink + expand (`adapters_core/triton_sgmv.add_lora_`) for G one-token segments on G distinct rank-16
  bf16 adapters, per projection shape (in -> out), over `programs` (the shrink's split-K target; 0: no split)
  and `block_n` (columns per expand program); beside it the base projection's own matmul (`F.linear`);
- decode attention (`service/model/triton_attention.decode_attention_`) for B sequences of L positions in a
  bf16 cache (32 query heads, 8 KV heads, head_dim 64) over `block_n`, `num_warps` and `precise` (False:
  bf16 products on the tensor cores and bf16 probabilities, as flash attention; checked against the precise
  kernel here, max abs difference reported).
The defaults (what the service runs) are marked `*`. `--dry-run`: tiny shapes and two variants each on the CPU
under Triton's interpreter (the script checked end to end without a GPU). Usage:
    python3 bench/gpu_kernels.py [--dry-run]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RANK = 16
PROJECTIONS = {"q/o 2048->2048": (2048, 2048), "k/v 2048->512": (2048, 512), "gate/up 2048->8192": (2048, 8192),
               "down 8192->2048": (8192, 2048)}


def timer(device: torch.device):
    """Median microseconds per call of fn: on CUDA the device's time, calls replayed from one CUDA graph
    (`do_bench_cudagraph`, as the engine's decode steps run them: no launch cost from Python, which made the
    first sweep's `do_bench` figures ~10-20 us for kernels of a few us), `do_bench` where the capture fails;
    a plain loop on the CPU (dry run)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        def cuda(fn):
            try:
                return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
            except Exception as exc:                  # reported, then the launch-bound figure
                print(f"(graph timing failed: {type(exc).__name__}: {exc}; do_bench instead)", flush=True)
                torch.cuda.synchronize()
                return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
        return cuda

    def cpu(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return cpu


def sgmv_sweep(device, dtype, time_us, dry: bool) -> list[str]:
    from adapters_core import triton_sgmv

    shapes = {"tiny 64->96": (64, 96)} if dry else PROJECTIONS
    counts = [4] if dry else [16, 64]
    programs = [0, 528] if dry else [0, 264, 528, 1056]
    blocks = [64] if dry else [64, 128]
    lines = [f"## SGMV shrink + expand, rank {RANK}, {dtype}, one token per segment on its own adapter (us per call)",
             "", "| shape | G | base matmul | " + " | ".join(f"p{p}/n{n}" + ("*" if (p, n) == (528, 128) else "")
                                                          for p, n in itertools.product(programs, blocks)) + " |",
             "|" + "---|" * (3 + len(programs) * len(blocks))]
    g = torch.Generator(device=device).manual_seed(0)
    for name, (fin, fout) in shapes.items():
        for count in counts:
            a = torch.randn(count + 1, fin, RANK, generator=g, device=device).to(dtype) * 0.02   # [n, in, R]
            b = torch.randn(count + 1, RANK, fout, generator=g, device=device).to(dtype) * 0.02  # [n, R, out]
            x = torch.randn(count, fin, generator=g, device=device).to(dtype)                   # [G, in]
            w = torch.randn(fout, fin, generator=g, device=device).to(dtype)                    # [out, in]
            out = torch.zeros(count, fout, device=device, dtype=dtype)
            slots = torch.arange(1, count + 1, device=device)
            cells = [f"{time_us(lambda: F.linear(x, w)):.1f}"]
            reference = None
            for p, n in itertools.product(programs, blocks):
                def call(p=p, n=n):
                    triton_sgmv.add_lora_(out, x, a, b, slots, None, 1, None, programs=p, block_n=n)
                out.zero_()
                call()
                reference = out.clone() if reference is None else reference
                assert torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2), (name, p, n)
                cells.append(f"{time_us(call):.1f}")
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
    return lines


def attention_sweep(device, dtype, time_us, dry: bool) -> list[str]:
    from service.model import triton_attention

    heads, kv_heads, head_dim = (4, 2, 16) if dry else (32, 8, 64)
    cases = [(4, 40)] if dry else [(16, 192), (64, 192), (64, 1024)]
    blocks = [64] if dry else [32, 64, 128]
    warps = [4] if dry else [2, 4, 8]
    # the old default (fp32 products) beside the tensor-core variants
    variants = [(True, 64, 4)] + list(itertools.product((False,), blocks, warps))
    lines = ["", f"## Decode attention, {heads} heads / {kv_heads} KV heads, head_dim {head_dim}, {dtype} cache "
             "(us per call; precise=False's largest difference from precise)", "",
             "| sequences x positions | " + " | ".join(
                 f"{'fp32' if p else 'bf16'}/n{n}/w{w}" + ("*" if (p, n, w) == (False, 64, 4) else "")
                 for p, n, w in variants) + " | bf16 max diff |", "|" + "---|" * (2 + len(variants))]
    g = torch.Generator(device=device).manual_seed(1)
    for seqs, length in cases:
        k_cache = torch.randn(seqs + 1, kv_heads, length, head_dim, generator=g, device=device).to(dtype)
        v_cache = torch.randn(seqs + 1, kv_heads, length, head_dim, generator=g, device=device).to(dtype)
        q = torch.randn(seqs, heads, head_dim, generator=g, device=device).to(dtype)
        tokens = torch.arange(seqs, device=device)
        slots = torch.arange(seqs, device=device)
        last = torch.full((seqs,), length - 1, device=device)
        outs, cells = {}, []
        for p, n, w in variants:
            out = torch.empty_like(q)

            def call(p=p, n=n, w=w, out=out):
                triton_attention.decode_attention_(out, q, k_cache, v_cache, tokens, slots, last, head_dim ** -0.5,
                                                   block_n=n, num_warps=w, precise=p)
            call()
            outs[p] = out
            cells.append(f"{time_us(call):.1f}")
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        lines.append(f"| {seqs} x {length} | " + " | ".join(cells) + f" | {diff:.2e} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = torch.device("cpu"), torch.bfloat16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_kernels: no CUDA device (use --dry-run to check the script on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    time_us = timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, interpreter)"
    print(f"# Triton kernel sweep on {name}, torch {torch.__version__}\n", flush=True)
    with torch.inference_mode():
        for section in (sgmv_sweep, attention_sweep):
            print("\n".join(section(device, dtype, time_us, args.dry_run)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
