"""Time of `RequestSampler.sample` for requests with a temperature, on a vocabulary the size of SmolLM2's.

Each configuration (temperature, top-p, top-k) samples one token from the same logits (`--spread` x a
standard normal over `--vocab` tokens; larger spreads give peakier distributions, as a trained model's
usually are) `--repeats` times with its own seeded generator; the best and median time per token are
printed. Greedy requests never reach `sample` (the engine takes one batched argmax for them). `--compare
FILE` also times another copy of service/engine/sampling.py (e.g. an older commit's, from `git show`) in the
same process, interleaved, for a side-by-side before/after. Usage:
    .venv/bin/python bench/sampling_bench.py [--vocab 49152] [--spread 3] [--repeats 50] [--compare old.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.engine import sampling  # noqa: E402

CONFIGS = [dict(temperature=0.7), dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_k=40),
           dict(temperature=1.0, top_p=0.95, top_k=50)]


def time_sample(module, params: dict, logits: torch.Tensor, repeats: int) -> tuple[float, float]:
    sampler = module.RequestSampler(module.SamplingParams(seed=0, **params), logits.numel())
    for _ in range(5):
        sampler.sample(logits)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.sample(logits)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--spread", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compare", help="another sampling.py to time beside this one")
    args = parser.parse_args()
    modules = {"this": sampling}
    if args.compare:
        spec = importlib.util.spec_from_file_location("compared_sampling", args.compare)
        other = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = other                   # dataclasses look their module up there
        spec.loader.exec_module(other)
        modules = {"compared": other, "this": sampling}
    logits = torch.randn(args.vocab, generator=torch.Generator().manual_seed(0)) * args.spread
    print(f"vocabulary {args.vocab}, logits {args.spread} x N(0, 1), {torch.get_num_threads()} torch threads; "
          f"best / median ms per token")
    for params in CONFIGS:
        cells = []
        for name, module in modules.items():
            best, median = time_sample(module, params, logits, args.repeats)
            cells.append(f"{name} {best * 1e3:6.3f} / {median * 1e3:6.3f}")
        print(f"  {str(params):45s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
