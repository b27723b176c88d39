"""Prompt-learning adapters in the engine on the default model (SmolLM2-135M-Instruct from the embedded GGUF).

16 concurrent requests x 64 new tokens each (greedy, EOS ignored): (a) the base model; (b) every request on a
different prompt-learning adapter (prompt tuning, P-tuning and prefix tuning in turn, `--virtual-tokens` each).
Virtual tokens are copied into each request's cache slot at admission (their keys and values are computed once
per adapter, at its first request, which the warm-up run does), so (b) only attends over a few more cached
positions than (a); the issue's target is b/a >= 0.9. Rounds run interleaved (a, b, a, b, ...) and each system
reports its median round. Usage:
    .venv/bin/python bench/prompt_learning_bench.py [--dtype auto|float32|bfloat16] [--requests 16]
                                                    [--new-tokens 64] [--virtual-tokens 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from engine_bench import TOPICS, median_round, run_engine  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402
from service.model.dtype import default_dtype  # noqa: E402
from service.model.gguf_loader import default_model_path, load_gguf  # noqa: E402


def write_adapters(config, count: int, nvt: int, directory: str) -> list[str]:
    """`count` PEFT prompt-learning folders for the model of `config`, kinds in turn, random rows."""
    g = torch.Generator().manual_seed(0)
    kv_width = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    kinds = [(ac.PromptTuningConfig, config.hidden_size, 0.1, {}),
             (ac.PromptEncoderConfig, config.hidden_size, 0.1, {"encoder_reparameterization_type": "MLP"}),
             (ac.PrefixTuningConfig, kv_width, 0.2, {})]
    paths = []
    for i in range(count):
        cls, width, std, extra = kinds[i % len(kinds)]
        path = os.path.join(directory, f"p{i}")
        cls(task_type="CAUSAL_LM", num_virtual_tokens=nvt, **extra).save(path)
        save_file({"prompt_embeddings": std * torch.randn(nvt, width, generator=g)},
                  os.path.join(path, "adapter_model.safetensors"))
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    dtype = default_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_gguf(default_model_path())
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=dtype, max_positions=256)
    tok = loaded.tokenizer
    prompts = [tok.encode(f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}.") for i in range(args.requests)]
    eos = sorted(tok.eos_token_ids)
    print(f"model: {loaded.name}, {args.dtype} -> {dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.requests} requests x {args.new_tokens} new tokens, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.virtual_tokens} virtual tokens each")
    names = [f"p{i}" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in zip(names, write_adapters(loaded.config, args.requests, args.virtual_tokens, tmp)):
            ac.load_adapter(model, path, adapter_name=name)
    rounds = {"a": [], "b": []}
    for _ in range(args.rounds):
        rounds["a"].append(run_engine(model, prompts, [None] * args.requests, args.new_tokens, eos))
        rounds["b"].append(run_engine(model, prompts, names, args.new_tokens, eos))
    report = {key: median_round(runs) for key, runs in rounds.items()}
    labels = {"a": "ours, base only", "b": f"ours, {args.requests} prompt-learning adapters"}
    print(f"\n{'system':<40} {'tokens/s':>9}   rounds")
    for key in ("a", "b"):
        spread = " ".join(f"{r['tps']:.1f}" for r in rounds[key])
        print(f"({key}) {labels[key]:<36} {report[key]['tps']:>9.1f}   {spread}")
    print(f"\nb/a = {report['b']['tps'] / report['a']['tps']:.2f} (target >= 0.9)")
    print(f"TTFT p50 (ms): a {report['a']['ttft50'] * 1e3:.0f}, b {report['b']['ttft50'] * 1e3:.0f}; "
          f"ITL p50 (ms): a {report['a']['itl50'] * 1e3:.1f}, b {report['b']['itl50'] * 1e3:.1f}")
    return report


if __name__ == "__main__":
    main()
