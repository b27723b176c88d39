"""Engine benchmark on a GPU: a random-weight Llama-3.2-1B-shaped model in bf16, 16 and 64 distinct adapters.

For each adapter count N: N requests (one per adapter for ours, prompts of `--prompt-len` random tokens,
`--new-tokens` new tokens each, greedy, no end-of-sequence), on
(a) our engine, base model only;         (b) our engine, N distinct r=16 LoRA adapters on all seven projections
                                             (the Triton SGMV kernels);
(t) as (b) with the Triton SGMV off (`ADAPTERS_CORE_TRITON=0` in effect: the torch path's gathers and `bmm`s,
    which CUDA graphs do not serve); (ae), (be) as (a), (b) without CUDA graphs (the eager engine);
(c) transformers `generate` on the base, one batch;
(d) peft's mixed-batch `generate` (`adapter_names=`) with the same N adapters.
The three models share one copy of the base weights. Reported: tokens/s (every generated token over the
run's wall time), the issue's ratios b/a (>= 0.9), b/d (>= 5) and a/c (>= 2), and our runs' time to first
token and inter-token latency (p50, p99). (a), (b) and (c) run `--rounds` times interleaved, each reporting
its median round; (t), (ae), (be) and (d) run once. `--json PATH` writes the report. `--profile PATH` then runs (a) and
(b) once more at the largest N under torch's profiler and writes where the time goes (operators by device and
by host time, and the device's busy share of the wall time) to PATH. `--dry-run` runs the same code on the CPU
with a tiny model and 4 / 8 adapters (fp32), to check the script end to end without a GPU. Usage:
    python3 bench/gpu_bench.py [--adapters 16 64] [--prompt-len 128] [--new-tokens 64] [--rounds 3] [--json out.json]
                               [--profile profile.txt]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from adapters_core import cuda_lora  # noqa: E402
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from service.model.config import ModelConfig  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                   max_position_embeddings=131072, tie_word_embeddings=True,
                   rope_parameters=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192, rope_theta=500000.0))
TINY = dict(LLAMA_32_1B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle(device: torch.device) -> None:
    """Collect and freeze setup garbage, and let the GPU finish, before a timed run."""
    gc.collect()
    gc.freeze()
    sync(device)


def build_models(shape: dict, device: torch.device, dtype: torch.dtype, max_positions: int):
    """transformers' LlamaForCausalLM with random weights (std 0.02) on `device`, and two of our Decoders (base
    only, and the one adapters go into) holding the very same weight tensors."""
    import transformers

    config = transformers.LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    hf = hf.to(dtype).eval().requires_grad_(False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours_config = ModelConfig.from_hf_dict(config.to_dict())
    state = hf.state_dict()                  # the same storage: Decoder.from_state_dict assigns, .to() keeps it
    base = Decoder.from_state_dict(ours_config, state, dtype=dtype, device=device, max_positions=max_positions)
    adapted = Decoder.from_state_dict(ours_config, state, dtype=dtype, device=device, max_positions=max_positions)
    return hf, base, adapted


def lora_state_dicts(shape: dict, count: int, rank: int, device, dtype) -> list[dict]:
    """`count` LoRA adapters (r=`rank`, all projections) in PEFT's state-dict keys, N(0, 0.02) entries."""
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    dims = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h)}
    out = []
    for i in range(count):
        g = torch.Generator(device=device).manual_seed(1000 + i)
        sd = {}
        for layer in range(shape["num_hidden_layers"]):
            for module, (fin, fout) in dims.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                sd[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g, device=device) * 0.02).to(dtype)
                sd[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g, device=device) * 0.02).to(dtype)
        out.append(sd)
    return out


def run_engine(model, prompts, adapters, new_tokens, device, graphs: bool = True, timed_context=None) -> dict:
    """One timed run of every prompt on its adapter; tokens/s, TTFT and ITL from each token's arrival, each
    engine step's wall time (the first step is the prompts' prefill, the others decode steps), and how many
    decode steps replayed a CUDA graph (`graphs=False`: none, the eager path). `timed_context`: a context
    manager entered around the timed run only (the profiler), after the warm-up."""
    n, plen = len(prompts), len(prompts[0])
    engine = Engine(model, EngineConfig(max_batch_size=n, max_seq_len=plen + new_tokens + 8,
                                        max_batch_tokens=n * plen, prefill_chunk=plen, max_waiting=n,
                                        cuda_graphs=graphs))
    # warm: stacks, Triton, and the decode step's CUDA graph (captured at the second decode step, once the
    # adapters have held still for one: 3 tokens), so the timed run replays it from its first decode step
    engine.generate([GenerationRequest(p, SamplingParams(max_tokens=3, temperature=0), a)
                     for p, a in zip(prompts, adapters)])
    stamps: dict[int, list[float]] = {i: [] for i in range(n)}
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    settle(device)
    steps: list[float] = []
    with timed_context or contextlib.nullcontext():
        start = time.perf_counter()
        for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
            engine.submit(GenerationRequest(ids, params, adapter),
                          lambda ev, i=i: ev.token_id is None or stamps[i].append(time.perf_counter()))
        while engine.has_work():
            begun = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - begun)
        wall = time.perf_counter() - start          # each step ends reading its tokens back: the GPU is done
    ttft = [s[0] - start for s in stamps.values()]
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    total = sum(len(s) for s in stamps.values())
    replays = engine.graphs.replays if engine.graphs is not None else 0
    return dict(tps=total / wall, tokens=total, seconds=wall, ttft50=percentile(ttft, 50),
                ttft99=percentile(ttft, 99), itl50=percentile(itl, 50), itl99=percentile(itl, 99),
                first_step=steps[0], decode_step50=percentile(steps[1:] or steps, 50),
                graph_replays=replays, graph_failed=engine.graphs.failed if engine.graphs is not None else None)


def run_hf(model, prompts, new_tokens, device, **kw) -> dict:
    """One batched `generate` of every prompt (all of one length: no padding)."""
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        model.generate(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, **kw)                                     # warm
        settle(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kw)
        sync(device)
        wall = time.perf_counter() - start
    total = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(tps=total / wall, tokens=total, seconds=wall)


def median_round(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["tps"])
    return dict(ordered[(len(ordered) - 1) // 2], all=[r["tps"] for r in rounds])


def peft_model(hf, names: list[str], states: list[dict], rank: int):
    """peft's PeftModel over `hf` (wrapped in place) holding every adapter, kept in the model's dtype."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS)
    pm = peft.PeftModel(hf, config, adapter_name=names[0], autocast_adapter_dtype=False)
    for name, sd in zip(names, states):
        if name != names[0]:
            try:
                pm.add_adapter(name, config, autocast_adapter_dtype=False)
            except TypeError:                  # an older peft: adapters take the layer's dtype anyway
                pm.add_adapter(name, config)
        peft.set_peft_model_state_dict(pm, sd, adapter_name=name)
    return pm.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--profile", help="write a torch profile of (a) and (b) at the largest N here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (fp32), 4 and 8 adapters")
    parser.add_argument("--skip-peft", action="store_true", help="no (d) run (peft's mixed batch: ~2 minutes on "
                        "an H200), for a rerun after one that measured it; b/d is then not reported")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.dry_run:
        atexit.register(lambda: os.dup2(os.open(os.devnull, os.O_WRONLY), 2))   # libtriton's teardown report
        shape, device, dtype = TINY, torch.device("cpu"), torch.float32
        args.adapters, args.prompt_len, args.new_tokens, args.rounds = [4, 8], 8, 6, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench: no CUDA device (use --dry-run to check the script on the CPU)")
        shape, device, dtype = LLAMA_32_1B, torch.device("cuda"), torch.bfloat16
    setup = time.perf_counter()
    most = max(args.adapters)
    hf, base, adapted = build_models(shape, device, dtype, args.prompt_len + args.new_tokens + 16)
    names = [f"a{i}" for i in range(most)]
    states = lora_state_dicts(shape, most, args.rank, device, dtype)
    config = ac.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS)
    for name, sd in zip(names, states):
        ac.inject_adapter_in_model(config, adapted, name, low_cpu_mem_usage=True)      # meta until loaded
        ac.set_peft_model_state_dict(adapted, sd, name, low_cpu_mem_usage=True)
    adapted.eval()
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, shape["vocab_size"], (most, args.prompt_len), generator=g).tolist()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    report = dict(gpu=gpu, torch=torch.__version__, dtype=str(dtype), shape="tiny" if args.dry_run else
                  "Llama-3.2-1B", prompt_len=args.prompt_len, new_tokens=args.new_tokens, rank=args.rank,
                  triton_sgmv=cuda_lora.applies(torch.empty(1, device=device)), runs={},
                  setup_s=round(time.perf_counter() - setup, 1))
    print(f"{gpu}; torch {torch.__version__}; {report['shape']} {dtype}; prompts {args.prompt_len} tokens, "
          f"{args.new_tokens} new; LoRA r={args.rank} on {len(PROJECTIONS)} projections; setup "
          f"{report['setup_s']} s", flush=True)
    for n in args.adapters:
        rounds = {"a": [], "b": [], "c": []}
        for _ in range(args.rounds):
            rounds["a"].append(run_engine(base, prompts[:n], [None] * n, args.new_tokens, device))
            rounds["b"].append(run_engine(adapted, prompts[:n], names[:n], args.new_tokens, device))
            rounds["c"].append(run_hf(hf, prompts[:n], args.new_tokens, device))
        runs = {key: median_round(r) for key, r in rounds.items()}
        saved, cuda_lora._KERNELS.mode = cuda_lora._KERNELS.mode, "0"
        try:
            runs["t"] = run_engine(adapted, prompts[:n], names[:n], args.new_tokens, device)
        finally:
            cuda_lora._KERNELS.mode = saved
        runs["ae"] = run_engine(base, prompts[:n], [None] * n, args.new_tokens, device, graphs=False)
        runs["be"] = run_engine(adapted, prompts[:n], names[:n], args.new_tokens, device, graphs=False)
        report["runs"][n] = runs
        print(f"N={n}: a {runs['a']['tps']:.0f}  b {runs['b']['tps']:.0f}  t {runs['t']['tps']:.0f}  "
              f"c {runs['c']['tps']:.0f}  a eager {runs['ae']['tps']:.0f}  b eager {runs['be']['tps']:.0f} "
              f"tokens/s; graph replays a {runs['a']['graph_replays']} b {runs['b']['graph_replays']} "
              f"(failed: {runs['b']['graph_failed']})", flush=True)
    if args.profile:
        profile_runs(args.profile, [("a", base, [None] * most), ("b", adapted, names[:most])], prompts[:most],
                     args.new_tokens, device)
    pm = None if args.skip_peft else peft_model(hf, names, states, args.rank)     # wraps hf in place: after (c)
    for n in (args.adapters if pm is not None else []):
        report["runs"][n]["d"] = run_hf(pm, prompts[:n], args.new_tokens, device, adapter_names=names[:n])
        print(f"N={n}: d {report['runs'][n]['d']['tps']:.0f} tokens/s", flush=True)
    gc.unfreeze()                          # settle() froze the setup's objects for the timed runs
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return report


def profile_runs(path: str, runs: list, prompts, new_tokens: int, device) -> None:
    """One engine run per (label, model, adapters) with torch's profiler around its timed part (not the warm-up);
    the operator tables by device time and by host time, and the device's busy time (its kernels' self time)
    against the run's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sections = []
    for label, model, adapters in runs:
        prof = profile(activities=activities)
        result = run_engine(model, prompts, adapters, new_tokens, device, timed_context=prof)
        events = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA") / 1e6
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        sections.append(f"## ({label}) {len(prompts)} requests under the profiler: {result['tps']:.0f} tokens/s, "
                        f"wall {result['seconds']:.3f} s (prefill step {result['first_step'] * 1e3:.1f} ms, decode "
                        f"step p50 {result['decode_step50'] * 1e3:.2f} ms), device kernels "
                        f"{busy:.3f} s busy\n\n### by device time\n{events.table(sort_by=sort, row_limit=30)}\n"
                        f"### by host time\n{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n")
        print(f"profile ({label}): {result['tps']:.0f} tokens/s under the profiler, device busy {busy:.3f} s "
              f"of {result['seconds']:.3f} s timed", flush=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(sections))


def print_report(report: dict) -> None:
    labels = {"a": "ours, base only", "b": "ours, N LoRA adapters", "t": "ours, N adapters, torch path",
              "ae": "ours, base, no CUDA graphs", "be": "ours, N adapters, no graphs",
              "c": "transformers generate, base", "d": "peft mixed-batch generate"}
    for n, runs in report["runs"].items():
        print(f"\n{n} adapters / requests          tokens/s   rounds")
        for key in ("a", "b", "t", "ae", "be", "c", "d"):
            if key in runs:
                spread = " ".join(f"{t:.0f}" for t in runs[key].get("all", []))
                print(f"({key}) {labels[key]:<30} {runs[key]['tps']:>9.1f}   {spread}")
        ratios = dict(b_over_a=runs["b"]["tps"] / runs["a"]["tps"], a_over_c=runs["a"]["tps"] / runs["c"]["tps"],
                      b_over_t=runs["b"]["tps"] / runs["t"]["tps"])
        if "d" in runs:
            ratios["b_over_d"] = runs["b"]["tps"] / runs["d"]["tps"]
        runs["ratios"] = ratios
        b_over_d = f"{ratios['b_over_d']:.1f}" if "b_over_d" in ratios else "not run"
        print(f"b/a = {ratios['b_over_a']:.2f} (target >= 0.9)   b/d = {b_over_d} (target >= 5)   "
              f"a/c = {ratios['a_over_c']:.2f} (target >= 2)   b/t = {ratios['b_over_t']:.2f} (Triton vs torch)")
        print(f"{'':<20} TTFT p50 {'p99':>6}   ITL p50 {'p99':>6}  prefill step  decode step p50 (ms)")
        for key in ("a", "b", "t", "ae", "be"):
            r = runs[key]
            print(f"({key}) {labels[key][:16]:<16} {r['ttft50'] * 1e3:>8.1f} {r['ttft99'] * 1e3:>6.1f}   "
                  f"{r['itl50'] * 1e3:>7.2f} {r['itl99'] * 1e3:>6.2f}  {r['first_step'] * 1e3:>12.1f}  "
                  f"{r['decode_step50'] * 1e3:>15.2f}")


if __name__ == "__main__":
    main()
