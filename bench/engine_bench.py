"""Side-by-side generation benchmark on the default model (SmolLM2-135M-Instruct from the embedded GGUF).

16 concurrent requests x 64 new tokens each (greedy, EOS ignored so every system makes the same amount):
(a) our engine, base model only;          (b) our engine, 16 distinct LoRA adapters (r=16, all projections);
(c) transformers `generate` on the base, one left-padded batch;
(d) peft mixed-batch `generate` (`adapter_names=`) with the same 16 adapters;
(e) peft one request at a time, `set_adapter` before each.
Prints tokens/s and the ratios the engine issue targets (b/a >= 0.8, a/c >= 1.5, b/d >= 4), plus time to
first token and inter-token latency (p50, p99) of our engine runs. (a), (b) and (c) run `--rounds` times,
interleaved (a, b, c, a, b, c, ...), and each reports its median round: on a shared 2-core machine a single
run of any of them can be 10-20 % off for reasons outside the process. (d) and (e) run once. Usage:
    .venv/bin/python bench/engine_bench.py [--dtype auto|float32|bfloat16] [--requests 16] [--new-tokens 64]
                                           [--rounds 3] [--skip-peft-sequential]
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
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402
from service.model.dtype import default_dtype  # noqa: E402
from service.model.gguf_loader import default_model_path, load_gguf  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPICS = ["the history of tea", "how rainbows form", "a recipe for bread", "why the sky is blue",
          "the rules of chess", "how vaccines work", "the water cycle", "a trip to Lisbon",
          "learning to swim", "the life of bees", "how a bicycle works", "the moon landing",
          "growing tomatoes", "what a compiler does", "the northern lights", "saving money"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def hf_models(path: str, loaded, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding exactly our dequantised weights (dense, like ours: transformers'
    own GGUF loading may keep them packed and dequantise in every matmul, which would not be a fair peer)."""
    import transformers
    c = loaded.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict, strict=False)
    model = model.to(dtype).eval()
    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def make_adapters(hf_model, count: int, rank: int, directory: str) -> list[str]:
    import peft
    paths = []
    for i in range(count):
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                            target_modules=PROJECTIONS))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        path = os.path.join(directory, f"a{i}")
        pm.save_pretrained(path)
        paths.append(path)
    return paths


def settle() -> None:
    """Collect and freeze the garbage of earlier setup (16 deep copies of the peer model) before a timed run:
    otherwise a full collection of that heap lands inside whichever run comes next (one 0.6 s pause was seen
    in our run's inter-token latency), which measures the benchmark, not the system."""
    gc.collect()
    gc.freeze()


def run_engine(model, prompts, adapters, new_tokens, eos, scales=None) -> dict:
    """One timed run of every prompt on its adapter (and `adapter_scale`, 1 when `scales` is None)."""
    scales = scales or [1.0] * len(prompts)
    engine = Engine(model, EngineConfig(max_batch_size=len(prompts), max_seq_len=256, max_batch_tokens=1024,
                                        prefill_chunk=256), eos_token_ids=eos)
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    # A warm server: every adapter has served once (its stacked copy exists), the KV cache is allocated.
    engine.generate([GenerationRequest(p, SamplingParams(max_tokens=2, temperature=0), a, adapter_scale=s)
                     for p, a, s in zip(prompts, adapters, scales)])
    settle()
    start = time.perf_counter()
    for i, (ids, adapter, scale) in enumerate(zip(prompts, adapters, scales)):
        engine.submit(GenerationRequest(ids, params, adapter, adapter_scale=scale),
                      lambda ev, i=i: stamps[i].append(time.perf_counter()) if ev.token_id is not None else None)
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - start
    ttft = [s[0] - start for s in stamps.values()]
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    total = sum(len(s) for s in stamps.values())
    return dict(tps=total / wall, ttft50=percentile(ttft, 50), ttft99=percentile(ttft, 99),
                itl50=percentile(itl, 50), itl99=percentile(itl, 99), tokens=total)


def run_hf(model, tok, texts, new_tokens, **kw) -> tuple[int, float]:
    """(generated tokens, seconds) for one padded `generate` call."""
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        settle()
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        wall = time.perf_counter() - start
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(texts), wall


def rate(runs: list[tuple[int, float]]) -> dict:
    return dict(tps=sum(n for n, _ in runs) / sum(s for _, s in runs))


def median_round(rounds: list[dict]) -> dict:
    """The round with the median tokens/s, plus every round's figure (`all`)."""
    ordered = sorted(rounds, key=lambda r: r["tps"])
    return dict(ordered[(len(ordered) - 1) // 2], all=[r["tps"] for r in rounds])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of (a), (b), (c); medians reported")
    parser.add_argument("--skip-peft-sequential", action="store_true", help="skip (e), the slowest peer")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import peft
    dtype = default_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    path = default_model_path()
    loaded = load_gguf(path)
    # Two copies of our model: (a) runs the bare decoder, (b) the one that the adapters are injected into.
    base = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=dtype, max_positions=256)
    ours = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=dtype, max_positions=256)
    tok = loaded.tokenizer
    texts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(args.requests)]
    prompts = [tok.encode(t) for t in texts]
    eos = sorted(tok.eos_token_ids)
    print(f"model: {loaded.name}, {args.dtype} -> {dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.requests} requests x {args.new_tokens} new tokens, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    hf, hf_tok = hf_models(path, loaded, dtype)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(hf, args.requests, args.rank, tmp)
        names = [f"a{i}" for i in range(args.requests)]
        for name, p in zip(names, paths):
            ac.load_adapter(ours, p, adapter_name=name, autocast_adapter_dtype=False)
        rounds = {"a": [], "b": [], "c": []}
        for _ in range(args.rounds):
            rounds["a"].append(run_engine(base, prompts, [None] * args.requests, args.new_tokens, eos))
            rounds["b"].append(run_engine(ours, prompts, names, args.new_tokens, eos))
            rounds["c"].append(rate([run_hf(hf, hf_tok, texts, args.new_tokens)]))
        report.update({key: median_round(runs) for key, runs in rounds.items()})
        pm = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name=names[0], autocast_adapter_dtype=False)
        for name, p in zip(names[1:], paths[1:]):
            pm.load_adapter(p, adapter_name=name, autocast_adapter_dtype=False)
        pm.eval()
        report["d"] = rate([run_hf(pm, hf_tok, texts, args.new_tokens, adapter_names=names)])
        if not args.skip_peft_sequential:
            runs = []
            for name, text in zip(names, texts):
                pm.set_adapter(name)
                runs.append(run_hf(pm, hf_tok, [text], args.new_tokens))
            report["e"] = rate(runs)
    labels = {"a": "ours, base only", "b": f"ours, {args.requests} LoRA adapters", "c": "transformers generate, base",
              "d": "peft mixed-batch generate", "e": "peft one at a time (set_adapter)"}
    print(f"\n{'system':<36} {'tokens/s':>9}   rounds")
    for key, row in report.items():
        spread = " ".join(f"{t:.1f}" for t in row.get("all", []))
        print(f"({key}) {labels[key]:<32} {row['tps']:>9.1f}   {spread}")
    print(f"\nb/a = {report['b']['tps'] / report['a']['tps']:.2f} (target >= 0.8)   "
          f"a/c = {report['a']['tps'] / report['c']['tps']:.2f} (target >= 1.5)   "
          f"b/d = {report['b']['tps'] / report['d']['tps']:.2f} (target >= 4)")
    if "e" in report:
        print(f"b/e = {report['b']['tps'] / report['e']['tps']:.2f}")
    print(f"\n{'ours (median round)':<24} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}   (ms)")
    for key in ("a", "b"):
        r = report[key]
        print(f"({key}) {labels[key]:<20} {r['ttft50'] * 1e3:>9.0f} {r['ttft99'] * 1e3:>9.0f} "
              f"{r['itl50'] * 1e3:>9.1f} {r['itl99'] * 1e3:>9.1f}")
    return report


if __name__ == "__main__":
    main()
