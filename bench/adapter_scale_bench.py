"""What `adapter_scale` and merged adapters cost in the engine, on the default model served as the service
serves it (SmolLM2-135M-Instruct, the GGUF's stored blocks; `--weights dense` for fp32 torch layers).

16 concurrent requests x 64 new tokens each (greedy, EOS ignored), every request on its own rank-16 LoRA
adapter over all seven projections: (a) plain adapters; (b) the same adapters with `adapter_scale` 0.5 on
every request (the worst case: every token's delta is multiplied); (c) 16 merged adapters, each PEFT's linear
merge of two of the plain ones (`add_weighted_adapter`, what LoRAX's `merged_adapters` builds), i.e. rank-16
LoRA adapters like (a)'s. The issue's target is b/a and c/a >= 0.95. Rounds run interleaved (a, b, c, a, b, c,
...) and each system reports its median round, since other work on the machine moves single rounds. Usage:
    .venv/bin/python bench/adapter_scale_bench.py [--requests 16] [--new-tokens 64] [--rank 16] [--rounds 5]
                                                  [--weights gguf|dense]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from engine_bench import PROJECTIONS, TOPICS, median_round, run_engine  # noqa: E402
from service.model import load_model  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402
from service.model.weight_format import store_weights  # noqa: E402


def serving_model(weights: str) -> tuple[Decoder, object]:
    """The default model as `build_state` makes it: stored GGUF blocks (fp32 activations) or dense fp32."""
    loaded = load_model(None, keep_stored=weights == "gguf")
    store_weights(loaded, weights)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=torch.float32, max_positions=256,
                                    stored=loaded.stored)
    return model, loaded


def random_adapters(model, count: int, rank: int, scale: float = 0.1) -> list[str]:
    """`count` random rank-`rank` fp32 LoRA adapters a0.. on all seven projections, nn.Linear's init times
    `scale` (0.1: deltas the size of a trained adapter's): their names."""
    names = [f"a{i}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        ac.inject_adapter_in_model(ac.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS,
                                                 init_lora_weights=False), model, name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname:
                    p.mul_(scale)
    return names


def add_adapters(model, count: int, rank: int) -> tuple[list[str], list[str]]:
    """`count` random rank-`rank` LoRA adapters and `count` linear merges of two of them: their names."""
    plain = random_adapters(model, count, rank)
    merged = [f"m{i}" for i in range(count)]
    for i, name in enumerate(merged):
        ac.add_weighted_adapter(model, [plain[i], plain[(i + 1) % count]], [0.6, 0.4], name, "linear")
    ac.set_adapter(model, [])
    return plain, merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--weights", default="gguf", choices=["gguf", "dense"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, loaded = serving_model(args.weights)
    tok = loaded.tokenizer
    prompts = [tok.encode(f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}.") for i in range(args.requests)]
    eos = sorted(tok.eos_token_ids)
    plain, merged = add_adapters(model, args.requests, args.rank)
    print(f"model: {loaded.name}, weights {args.weights}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.requests} requests x {args.new_tokens} new tokens on rank-{args.rank} adapters")
    n = args.requests
    systems = {"a": (plain, None), "b": (plain, [0.5] * n), "c": (merged, None)}
    rounds = {key: [] for key in systems}
    for _ in range(args.rounds):
        for key, (names, scales) in systems.items():
            rounds[key].append(run_engine(model, prompts, names, args.new_tokens, eos, scales))
    report = {key: median_round(runs) for key, runs in rounds.items()}
    labels = {"a": f"{n} plain LoRA adapters", "b": "the same, adapter_scale 0.5", "c": f"{n} merged adapters"}
    print(f"\n{'system':<40} {'tokens/s':>9}   rounds")
    for key in systems:
        spread = " ".join(f"{r['tps']:.1f}" for r in rounds[key])
        print(f"({key}) {labels[key]:<36} {report[key]['tps']:>9.1f}   {spread}")
    print(f"\nb/a = {report['b']['tps'] / report['a']['tps']:.3f}   c/a = {report['c']['tps'] / report['a']['tps']:.3f}"
          "   (target >= 0.95)")
    print(f"ITL p50 (ms): a {report['a']['itl50'] * 1e3:.1f}, b {report['b']['itl50'] * 1e3:.1f}, "
          f"c {report['c']['itl50'] * 1e3:.1f}")
    return report


if __name__ == "__main__":
    main()
