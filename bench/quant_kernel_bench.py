"""The stored-weight matmuls of one decode token, timed per weight shape, against this machine's memory roofline.

Loads the embedded SmolLM2-135M GGUF as stored (Q4_1 layers, Q8_0 tied head), groups q/k/v and gate/up as
the decoder does, and runs the 121 matmuls of one token (`--rows` rows of x: 1 is one stream, 16 a full
decode batch) from a thread other than the main one, as the server's engine does, with the kernel build for
`--arch` (native: this CPU's; x86-64-v3: the AVX2 + FMA path; x86-64: the SSE2 path), so the AVX2 path can be
timed on an AVX-512 machine too. Prints per shape the time per token and the bytes of weights read per
second, the total, and the roofline: weight bytes / the read bandwidth measured here (a 512 MiB fp32 sum).
Also the decode step of the whole model at `--rows` 1 from the same thread (forward_step + head), so the
share of the matmuls in a token is visible, and that step without and with the decode loop's read-ahead of the
next weight (direct_step.READ_AHEAD), alternating. Usage:
    .venv/bin/python bench/quant_kernel_bench.py [--rows 1] [--arch native] [--repeats 20] [--model F.gguf]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.model import load_model  # noqa: E402
from service.model import direct_step, quant_linear  # noqa: E402
from service.model.decoder import Decoder, StepPlan, StepSequence  # noqa: E402
from service.model.quant_linear import QuantLinear  # noqa: E402


def read_bandwidth() -> float:
    """Bytes per second of a 512 MiB fp32 sum (best of 5), with torch's threads."""
    big = torch.ones(2**27)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


def token_matmuls(model: Decoder) -> list:
    """The stored weights one token multiplies: each layer's q/k/v and gate/up groups, o and down, the head."""
    weights = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [attn.qkv_group.stored, attn.o_proj.stored, mlp.gate_up_group.stored, mlp.down_proj.stored]
    assert isinstance(model.lm_head, QuantLinear), "the head is not stored: run with the embedded GGUF"
    return weights + [model.lm_head.stored]


def time_matmuls(weights: list, rows: int, module, repeats: int) -> dict:
    """(format, shape) -> (count, seconds per token, bytes per token), each call timed alone, best token."""
    xs = {w.columns: torch.randn(rows, w.columns) for w in weights}
    best: dict = {}
    for _ in range(repeats):
        took = collections.defaultdict(float)
        for w in weights:
            start = time.perf_counter()
            module.quant_matmul(xs[w.columns], w.data, w.kernel_id, w.row_scale, None)
            took[(w.format, w.shape)] += time.perf_counter() - start
        for key, seconds in took.items():
            best[key] = min(best.get(key, float("inf")), seconds)
    out = {}
    for key, seconds in best.items():
        same = [w for w in weights if (w.format, w.shape) == key]
        out[key] = (len(same), seconds, sum(w.nbytes for w in same))
    return out


def time_step(model: Decoder, repeats: int) -> float:
    """Best time of one single-sequence decode step (forward_step and the head) at positions 40.."""
    c = model.config
    cache = type("Cache", (), {})()
    cache.k = torch.zeros(c.num_hidden_layers, 1, c.num_key_value_heads, 512, c.head_dim)
    cache.v = torch.zeros_like(cache.k)
    best = float("inf")
    for i in range(repeats * 3):
        plan = StepPlan([StepSequence(0, 40 + i, 1)], torch.tensor([0]))
        start = time.perf_counter()
        model.lm_head(model.forward_step(torch.tensor([42]), torch.tensor([40 + i]), plan, cache))
        best = min(best, time.perf_counter() - start)
    return best


def mean_step(model: Decoder, steps: int = 30) -> float:
    """Mean time of `steps` single-sequence decode steps (forward_step and the head) at positions 40.."""
    c = model.config
    cache = type("Cache", (), {})()
    cache.k = torch.zeros(c.num_hidden_layers, 1, c.num_key_value_heads, 512, c.head_dim)
    cache.v = torch.zeros_like(cache.k)
    start = time.perf_counter()
    for i in range(steps):
        plan = StepPlan([StepSequence(0, 40 + i, 1)], torch.tensor([0]))
        model.lm_head(model.forward_step(torch.tensor([42]), torch.tensor([40 + i]), plan, cache))
    return (time.perf_counter() - start) / steps


def read_ahead_ab(model: Decoder, rounds: int = 40, steps: int = 10) -> tuple[float, float]:
    """Median mean-step times without and with the decode loop's read-ahead (direct_step.READ_AHEAD),
    alternating every `steps` steps so both see the same moments of the memory system (whose bandwidth here
    moved by 10-20 % within a minute: rounds of 30 steps once gave the two a 10 % difference either way)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(rounds):
            for ahead in (False, True):
                direct_step.READ_AHEAD = ahead
                times[ahead].append(mean_step(model, steps))
    finally:
        direct_step.READ_AHEAD = True
    return tuple(sorted(t)[len(t) // 2] for t in (times[False], times[True]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--arch", default="native", help="gcc -march of the kernel build: native, x86-64-v3, ...")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    args = parser.parse_args()
    module = quant_linear.kernel(args.arch)
    if module is None:
        sys.exit(f"the kernel for -march={args.arch} cannot be built here")
    loaded = load_model(args.model, keep_stored=True)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, stored=loaded.stored, max_positions=512)
    weights = token_matmuls(model)
    bandwidth = read_bandwidth()
    result: dict = {}

    def work():                                   # the engine steps in a thread of its own: so does this
        with torch.inference_mode():
            result["matmuls"] = time_matmuls(weights, args.rows, module, args.repeats)
            if args.arch == "native" and args.rows == 1:
                result["step"] = time_step(model, args.repeats)
                result["read_ahead"] = read_ahead_ab(model)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(f"kernel build: -march={args.arch} ({module.isa()}), rows of x: {args.rows}, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    total_s = total_b = 0.0
    for (fmt, shape), (count, seconds, nbytes) in sorted(result["matmuls"].items(), key=lambda kv: -kv[1][1]):
        flops = 2 * args.rows * shape[0] * shape[1] * count
        print(f"  {fmt:5s} {shape[0]:6d} x {shape[1]:5d} x{count:3d}: {seconds * 1e3:6.2f} ms/token  "
              f"{nbytes / seconds / 1e9:5.1f} GB/s  {flops / seconds / 1e9:6.1f} GFLOP/s")
        total_s += seconds
        total_b += nbytes
    print(f"  all {len(weights)} matmuls: {total_s * 1e3:.2f} ms/token, {total_b / 1e6:.1f} MB of weights, "
          f"{total_b / total_s / 1e9:.1f} GB/s; memory roofline {total_b / bandwidth * 1e3:.2f} ms "
          f"({total_b / bandwidth / total_s:.0%} of it reached)")
    if "step" in result:
        print(f"  whole decode step, 1 sequence (forward_step + head): {result['step'] * 1e3:.2f} ms")
        off, on = result["read_ahead"]
        print(f"  the same, medians of 40 alternating rounds of 10 steps: without the decode loop's read-ahead "
              f"{off * 1e3:.2f} ms, with it {on * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
