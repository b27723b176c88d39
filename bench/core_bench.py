"""Side-by-side benchmark of adapters_core against peft on a Llama-shaped model, in one run.

(a) Load time of one r=16 adapter on all seven projections, from disk, into a model that already holds
    0 and 50 adapters: `adapters_core.load_adapter(low_cpu_mem_usage=True)` vs peft's
    (`PeftModel.from_pretrained` for the first adapter, `PeftModel.load_adapter` after that, both with
    `low_cpu_mem_usage=True`). Median of several repeats; the timed adapter is deleted between repeats.
(b) Forward throughput of a 16-row batch where every row uses a different adapter: our `mixed_batch`
    vs the bare base model vs peft's mixed batch (`adapter_names=`), at a prefill length and at one
    token per row (a decode step).

The model is a randomly initialised Llama with SmolLM2-135M-Instruct's shape (the default model once the
engine lands); `--tiny` shrinks everything for a smoke run. Usage:
    .venv/bin/python bench/core_bench.py [--tiny] [--dtype float32|bfloat16] [--seq 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)


def build_base(shape: dict, dtype: torch.dtype):
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).to(dtype).eval()
    return model


def write_adapters(base, count: int, directory: str, rank: int) -> list[str]:
    """Write `count` distinct PEFT LoRA folders (random non-zero weights) with peft itself."""
    import peft
    paths = []
    for i in range(count):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                          target_modules=PROJECTIONS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        path = os.path.join(directory, f"adapter{i}")
        model.save_pretrained(path)
        paths.append(path)
        del model
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_load(base, paths: list[str], preloaded: int, repeats: int) -> dict:
    """Median seconds to load one adapter with `preloaded` adapters already in the model."""
    import peft
    target, fillers = paths[0], paths[1:]
    results = {}

    ours = copy.deepcopy(base)
    for i in range(preloaded):
        ac.load_adapter(ours, fillers[i % len(fillers)], adapter_name=f"pre{i}")
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: ac.load_adapter(ours, target, adapter_name="timed")))
        ac.delete_adapter(ours, "timed")
    results["ours"] = statistics.median(times)
    del ours
    gc.collect()

    times = []
    if preloaded == 0:
        for _ in range(repeats):
            fresh = copy.deepcopy(base)
            times.append(timed(lambda: peft.PeftModel.from_pretrained(fresh, target, adapter_name="timed",
                                                                      low_cpu_mem_usage=True)))
            del fresh
    else:
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), fillers[0], adapter_name="pre0",
                                                low_cpu_mem_usage=True)
        for i in range(1, preloaded):
            theirs.load_adapter(fillers[i % len(fillers)], adapter_name=f"pre{i}", low_cpu_mem_usage=True)
        for _ in range(repeats):
            times.append(timed(lambda: theirs.load_adapter(target, adapter_name="timed", low_cpu_mem_usage=True)))
            theirs.delete_adapter("timed")
        del theirs
    results["peft"] = statistics.median(times)
    gc.collect()
    return results


def bench_forward(base, paths: list[str], rows: int, seq: int, repeats: int, dtype) -> dict:
    """Tokens per second for `rows` rows x `seq` tokens, each row with its own adapter."""
    import peft
    names = [f"a{i}" for i in range(rows)]
    ids = torch.randint(0, base.config.vocab_size, (rows, seq))

    def rate(fn) -> float:
        fn()
        best = min(timed(fn) for _ in range(repeats))
        return rows * seq / best

    out = {}
    with torch.inference_mode():
        out["base"] = rate(lambda: base(ids).logits)
        ours = copy.deepcopy(base)
        for name, path in zip(names, paths):
            ac.load_adapter(ours, path, adapter_name=name, autocast_adapter_dtype=False)

        def run_ours():
            with ac.mixed_batch(ours, names):
                return ours(ids).logits
        out["ours"] = rate(run_ours)
        del ours
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0],
                                                autocast_adapter_dtype=False)
        for name, path in zip(names[1:], paths[1:]):
            theirs.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
        theirs.eval()
        out["peft"] = rate(lambda: theirs(input_ids=ids, adapter_names=names).logits)
        del theirs
    gc.collect()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and few adapters (smoke run)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seq", type=int, default=64, help="tokens per row for the prefill-shaped forward")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--preloaded", type=int, default=50, help="adapters already in the model for (a)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else SMOLLM2_135M
    rows = 4 if args.tiny else 16
    preloaded = min(args.preloaded, 3) if args.tiny else args.preloaded
    repeats = 2 if args.tiny else args.repeats
    base = build_base(shape, dtype)
    print(f"model: random Llama {shape['num_hidden_layers']} layers x {shape['hidden_size']} "
          f"({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params), {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(base, max(rows, 4), tmp, args.rank)
        print(f"\n(a) load one r={args.rank} all-projection adapter from disk (median of {repeats})")
        print(f"{'adapters already loaded':>24} {'ours ms':>9} {'peft ms':>9} {'peft/ours':>10}")
        for n in (0, preloaded):
            r = bench_load(base, paths, n, repeats)
            report[f"load_{n}"] = r
            print(f"{n:>24} {r['ours'] * 1e3:>9.1f} {r['peft'] * 1e3:>9.1f} {r['peft'] / r['ours']:>10.1f}x")
        flat = report[f"load_{preloaded}"]["ours"] / report["load_0"]["ours"]
        print(f"ours, {preloaded} loaded / 0 loaded: {flat:.2f}x")
        print(f"\n(b) forward, {rows} rows with {rows} distinct adapters (tokens/s, best of {repeats})")
        print(f"{'tokens per row':>15} {'base':>9} {'ours':>9} {'peft':>9} {'ours/base':>10} {'peft/base':>10} "
              f"{'ours/peft':>10}")
        for seq in (args.seq, 1):
            r = bench_forward(base, paths, rows, seq, repeats, dtype)
            report[f"forward_{seq}"] = r
            print(f"{seq:>15} {r['base']:>9.0f} {r['ours']:>9.0f} {r['peft']:>9.0f} {r['ours'] / r['base']:>10.2f} "
                  f"{r['peft'] / r['base']:>10.2f} {r['ours'] / r['peft']:>10.2f}")
    return report


if __name__ == "__main__":
    main()
