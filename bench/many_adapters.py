"""Many adapters over HTTP: throughput, latency, load time and memory with 16 to 1,000 registered adapters.

For each K in --counts (default 16, 128, 1000) and each traffic shape in --distributions (uniform, and Zipf(1.1)
over the K names; or hot: --rare-share of the requests spread over the adapters past the first --room, the rest
over those --room, so that every device slot is always in use: `ADAPTER_SERVE_ADAPTER_TURN_SECONDS`'s case), it
starts `python -m service` on a store holding K LoRA adapters (random rank in [--rank-min,
--rank-max], q_proj and v_proj of every layer, PEFT's format, --adapter-dtype), so every server starts cold,
then runs --streams concurrent streaming clients, each sending greedy completions of --max-tokens tokens
(`ignore_eos`) on an adapter drawn from the shape, for --cold seconds (measured as "cold": adapters load as
traffic arrives) and then --steady seconds (measured as "steady"). Per window: completed tokens/s, inter-token
latency p50/p99 (gaps between streamed chunks), time to first token p50 / p99 / max, and the adapter loads of the
window read from the server's metrics (count, and p50 of the whole load, of its wait for the loader thread behind the
loads before it, of the loader thread's part, of the finished read's wait for the event loop to take it back, and
of its engine-thread part). Rows are printed as they finish;
the last lines give the issue's ratios (steady K=max uniform / K=min uniform tokens/s, ITL p99 / p50 per run).

The steady windows of the smallest and the largest K are minutes apart, and a shared machine's memory reads
10-30 % faster or slower from one minute to the next, so the ratio of the two moves with it. With --pair-rounds
N (default 3) the run ends with that ratio at the same moments: servers of the smallest and the largest K both
up, each warmed with one unmeasured round, then N rounds on each in turn (uniform traffic; each round
--pair-lead seconds unmeasured, then --pair-seconds measured, the other server idle); the medians and their
ratio are printed beside the one from the rows.

With --memory N it also measures resident memory per adapter: a server with room for N adapters, RSS after
one base request, then after one request on each of N adapters, (difference / N) / the adapters' mean weight
bytes.

    .venv/bin/python bench/many_adapters.py                  # the full run (about 15 minutes on 2 cores)
    .venv/bin/python bench/many_adapters.py --counts 16,1000 --distributions uniform --steady 30
The adapters are written once under --workdir (default: a temporary folder) and linked into each store; by
default so are their served files (`adapter_served_files`: made once in the pool; see --served-files). Before
each server starts, the store's files are read into the page cache (--page-cache warm: a box whose RAM holds
its adapters' files, the steady state of one that has served them), evicted from it (cold: a box that has just
booted, every first load reads the disk), or left as earlier runs left them (as-is). With --touch-all each
server first answers one request on every adapter (a server that has served them all before) before the
windows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from adapters_core.state_dict import PEFT_PREFIX  # noqa: E402
from load_test import Server, base_config, percentile  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
           "List three facts about the moon.", "Describe the taste of a ripe peach."]


def write_pool(folder: Path, count: int, args) -> list[int]:
    """`count` adapters a0..a{count-1} under `folder` (kept between runs); returns their weight bytes."""
    config = base_config(args.model)
    dtype = getattr(torch, args.adapter_dtype)
    out = {"q_proj": config.num_attention_heads * config.head_dim,
           "v_proj": config.num_key_value_heads * config.head_dim}
    rng, sizes = random.Random(0), []
    for i in range(count):
        r = rng.randint(args.rank_min, args.rank_max)
        target = folder / f"a{i}"
        weights = target / "adapter_model.safetensors"
        if not weights.exists():
            g = torch.Generator().manual_seed(i)
            tensors = {}
            for layer in range(config.num_hidden_layers):
                for proj, rows in out.items():
                    key = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{proj}"
                    tensors[f"{key}.lora_A.weight"] = (torch.randn(r, config.hidden_size, generator=g)
                                                       / config.hidden_size ** 0.5).to(dtype)
                    tensors[f"{key}.lora_B.weight"] = (torch.randn(rows, r, generator=g) * 0.05).to(dtype)
            target.mkdir(parents=True, exist_ok=True)
            ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(out)).save(str(target))
            save_file(tensors, str(weights), metadata={"format": "pt"})
        sizes.append(r * config.num_hidden_layers * (2 * config.hidden_size + sum(out.values()))
                     * dtype.itemsize)
    return sizes


def make_store(workdir: Path, pool: Path, count: int, tag: str, served_files: str) -> Path:
    """A store of links to the pool's first `count` adapters; with --served-files kept, also to their served
    files (`served.*.safetensors`, `prepare_served`)."""
    store = workdir / f"store-{tag}"
    store.mkdir()
    for i in range(count):
        target = store / f"a{i}"
        target.mkdir()
        names = ["adapter_config.json", "adapter_model.safetensors"]
        if served_files == "kept":
            names += [p.name for p in (pool / f"a{i}").glob("served.*.safetensors")]
        for name in names:
            os.symlink(pool / f"a{i}" / name, target / name)
    return store


def set_page_cache(pool: Path, count: int, mode: str) -> int:
    """--page-cache: the pool's first `count` adapters' files read into the page cache (warm) or dropped from it
    (cold: `POSIX_FADV_DONTNEED`, which drops the clean pages no process maps); the bytes they hold."""
    total = 0
    for i in range(count):
        for path in (pool / f"a{i}").iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                total += os.fstat(fd).st_size
                if mode == "cold":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                elif mode == "warm":
                    while os.read(fd, 1 << 20):
                        pass
            finally:
                os.close(fd)
    return total


def prepare_served(pool: Path, count: int) -> int:
    """With --served-files kept: the served file of each of the pool's first `count` adapters that lacks a
    current one, made by the code a server's loader runs after a first load (read, checked, held in the servers'
    adapter_dtype, saved); how many were made."""
    from service.registry.adapter_dtype import AdapterDtype
    from service.registry.store import AdapterStore
    held = AdapterDtype(os.environ.get("ADAPTER_SERVE_ADAPTER_DTYPE", "auto"))
    store, made = AdapterStore(str(pool)), 0
    for i in range(count):
        folder = str(pool / f"a{i}")
        if store.read_served(folder, held.factor_dtype) is not None:     # there and current (one an older
            continue                                                    # server wrote is made again)
        source = store.source(folder)
        tensors, file_bytes, nonfinite = store.read_packed(folder, held.factor_dtype)
        tensors, _ = held.hold_packed(tensors, file_bytes, nonfinite, lambda: store.read_tensors(folder),
                                      "adapter_model.safetensors")
        made += store.write_served(folder, held.factor_dtype, tensors, file_bytes, source)
    return made


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Cumulative histogram buckets of `name` (summed over labels): le -> count."""
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def metric_total(text: str, name: str) -> dict[str, float]:
    """`name`'s `_sum`, `_count` and count above 20 ms, summed over labels (a histogram in seconds)."""
    buckets = metric_samples(text, name)
    totals = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in totals:
            if line.startswith(f"{name}_{part}"):
                totals[part] += float(line.rsplit(" ", 1)[1])
    totals["over_20ms"] = buckets.get("+Inf", 0.0) - buckets.get("0.02", 0.0)
    return totals


def bucket_quantile(before: dict, after: dict, q: float = 0.5) -> tuple[int, Optional[str]]:
    """(count, the smallest bucket bound holding the share `q` of the window's observations)."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = delta.get("+Inf", 0)
    if not total:
        return 0, None
    for le in sorted((k for k in delta if k != "+Inf"), key=float):
        if delta[le] >= total * q:
            return int(total), f"<= {float(le) * 1e3:g} ms"
    return int(total), "> last bucket"


def bucket_share(before: dict, after: dict, bound: float) -> Optional[float]:
    """The share of the window's observations at or below `bound` seconds (one of the histogram's bucket
    bounds: service/metrics.py's LOAD_BUCKETS has the issue's 20 ms); None without observations."""
    delta = {float(le): after.get(le, 0) - before.get(le, 0) for le in after if le != "+Inf"}
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    if not total or bound not in delta:
        return None
    return delta[bound] / total


class Window:
    def __init__(self, start: float, end: float):
        self.start, self.end, self.tokens, self.itl, self.ttft = start, end, 0, [], []
        self.ttft_rare: list[float] = []    # hot traffic: the requests on adapters past the first --room


async def run_traffic(url: str, names: list[str], args, distribution: str) -> tuple[Window, Window, dict]:
    """--streams clients for --cold + --steady seconds; returns the two windows and the load metrics."""
    rng = random.Random(1)
    hot = min(args.room, len(names))        # hot: --rare-share of the requests on the adapters past the first --room
    weights = ([1 / (k + 1) ** args.zipf_s for k in range(len(names))] if distribution == "zipf" else
               [(1 - args.rare_share) / hot if k < hot else args.rare_share / (len(names) - hot)
                for k in range(len(names))] if distribution == "hot" and hot < len(names) else None)
    start = time.monotonic()
    cold = Window(start, start + args.cold)
    steady = Window(cold.end, cold.end + args.steady)
    errors: dict[str, int] = {}
    scraped: dict[str, dict] = {}

    def account(stamp: float, previous: Optional[float], first: bool, sent: float, rare: bool) -> None:
        for w in (cold, steady):
            if w.start <= stamp < w.end:
                w.tokens += 1
                if first:
                    w.ttft.append(stamp - sent)
                    if rare:
                        w.ttft_rare.append(stamp - sent)
                elif previous is not None:
                    w.itl.append(stamp - previous)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < steady.end:
            index = rng.choices(range(len(names)), weights)[0]
            body = {"model": names[index], "prompt": rng.choice(PROMPTS), "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            sent, previous = time.monotonic(), None
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        key = f"HTTP {r.status_code}"
                        errors[key] = errors.get(key, 0) + 1
                        await r.aread()
                        await asyncio.sleep(float(r.headers.get("retry-after", 1)) if r.status_code == 429 else 1)
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            now = time.monotonic()
                            account(now, previous, previous is None, sent, distribution == "hot" and index >= hot)
                            previous = now
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async def scrape_at(http: httpx.AsyncClient, when: float, key: str) -> None:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        text = (await http.get("/metrics")).text
        scraped[key] = {m: metric_samples(text, m) for m in
                        ("adapter_serve_adapter_load_seconds", "adapter_serve_adapter_load_apply_seconds",
                         "adapter_serve_adapter_load_queue_seconds", "adapter_serve_adapter_load_read_seconds",
                         "adapter_serve_adapter_load_resume_seconds")}
        scraped[key]["gc"] = metric_total(text, "adapter_serve_gc_pause_seconds")
        scraped[key]["steps"] = metric_samples(text, "adapter_serve_step_seconds")

    limits = httpx.Limits(max_connections=args.streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(scrape_at(http, start, "start"), scrape_at(http, cold.end, "cold"),
                             scrape_at(http, steady.end, "steady"),
                             *(client(http) for _ in range(args.streams)))
    loads = {}
    for window, (a, b) in (("cold", ("start", "cold")), ("steady", ("cold", "steady"))):
        loads[window] = {m: bucket_quantile(scraped[a][m], scraped[b][m]) for m in scraped[b]
                         if m not in ("gc", "steps")}
        loads[window]["within_20ms"] = bucket_share(scraped[a]["adapter_serve_adapter_load_seconds"],
                                                    scraped[b]["adapter_serve_adapter_load_seconds"], 0.02)
        loads[window]["steps"] = [bucket_quantile(scraped[a]["steps"], scraped[b]["steps"], q) for q in (0.5, 0.99)]
        loads[window]["gc"] = {k: scraped[b]["gc"][k] - scraped[a]["gc"][k] for k in scraped[b]["gc"]}
    return cold, steady, {"loads": loads, "errors": errors}


def serve(args, workdir: Path, store: Path, room: int, tag: str) -> Server:
    os.environ.update({"ADAPTER_SERVE_ADAPTER_SERVED_FILES": str(args.served_files != "off").lower(),
                       "ADAPTER_SERVE_MAX_DEVICE_ADAPTERS": str(room),
                       "ADAPTER_SERVE_MAX_CPU_ADAPTERS": str(max(room, 16)),
                       "ADAPTER_SERVE_MAX_LORA_RANK": str(args.rank_max)})
    run = argparse.Namespace(url=None, dtype=args.dtype, max_batch_size=args.streams, max_waiting=4 * args.streams,
                             model=args.model)
    (workdir / tag).mkdir()
    os.rename(store, workdir / tag / "store")           # the Server's adapter_dir
    server = Server(run, workdir / tag)
    server.wait_ready(timeout=900)
    return server


def row(k: int, distribution: str, window: str, w: Window, loads: dict) -> dict:
    seconds = w.end - w.start
    total = loads["adapter_serve_adapter_load_seconds"]
    apply = loads["adapter_serve_adapter_load_apply_seconds"]
    queue, read = loads["adapter_serve_adapter_load_queue_seconds"], loads["adapter_serve_adapter_load_read_seconds"]
    resume = loads["adapter_serve_adapter_load_resume_seconds"]
    return {"K": k, "traffic": distribution, "window": window, "tokens_s": w.tokens / seconds,
            "itl_p50_ms": 1e3 * (percentile(w.itl, 50) or 0), "itl_p99_ms": 1e3 * (percentile(w.itl, 99) or 0),
            "ttft_p50_ms": 1e3 * (percentile(w.ttft, 50) or 0), "ttft_p99_ms": 1e3 * (percentile(w.ttft, 99) or 0),
            "ttft_max_ms": 1e3 * max(w.ttft, default=0), "rare_requests": len(w.ttft_rare),
            "rare_ttft_p50_ms": 1e3 * (percentile(w.ttft_rare, 50) or 0),
            "rare_ttft_max_ms": 1e3 * max(w.ttft_rare, default=0),
            "loads": total[0], "load_p50": total[1],
            "loads_within_20ms": loads["within_20ms"],
            "queue_p50": queue[1], "read_p50": read[1], "resume_p50": resume[1], "apply_p50": apply[1],
            "gc_pauses": int(loads["gc"]["count"]), "gc_ms": 1e3 * loads["gc"]["sum"],
            "gc_over_20ms": int(loads["gc"]["over_20ms"]), "step_p50": loads["steps"][0][1],
            "step_p99": loads["steps"][1][1]}


def _share(share: Optional[float]) -> str:
    return "-" if share is None else f"{100 * share:.0f} %"


def print_row(r: dict) -> None:
    print(f"K={r['K']:<5} {r['traffic']:<8} {r['window']:<7} {r['tokens_s']:8.1f} tok/s  ITL p50 "
          f"{r['itl_p50_ms']:6.0f} p99 {r['itl_p99_ms']:6.0f} ms  TTFT p50 {r['ttft_p50_ms']:6.0f} p99 "
          f"{r['ttft_p99_ms']:6.0f} max {r['ttft_max_ms']:6.0f} ms  loads "
          f"{r['loads']:5d} (whole p50 {r['load_p50']}, {_share(r['loads_within_20ms'])} within 20 ms; "
          f"waiting for the loader p50 {r['queue_p50']}, loader p50 {r['read_p50']}, then for the loop p50 "
          f"{r['resume_p50']}, engine-thread p50 {r['apply_p50']})  GC {r['gc_pauses']} pauses, {r['gc_ms']:.0f} ms, "
          f"{r['gc_over_20ms']} over 20 ms; steps p50 {r['step_p50']} p99 {r['step_p99']}"
          + (f"; rare adapters: {r['rare_requests']} first tokens, TTFT p50 {r['rare_ttft_p50_ms']:.0f} max "
             f"{r['rare_ttft_max_ms']:.0f} ms" if r["traffic"] == "hot" else ""), flush=True)


async def memory_probe(args, workdir: Path, pool: Path, sizes: list[int]) -> dict:
    n = args.memory
    store = make_store(workdir, pool, n, "mem", args.served_files)
    server = serve(args, workdir, store, n, "mem-server")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            async def one(model: str) -> None:
                r = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
                r.raise_for_status()
            await one((await http.get("/v1/models")).json()["data"][0]["id"])
            await asyncio.sleep(1)
            before = server.rss_mib()
            for i in range(n):
                await one(f"a{i}")
            await asyncio.sleep(1)
            after = server.rss_mib()
    finally:
        server.stop()
    weight_mib = statistics.mean(sizes[:n]) / 2**20
    per = (after - before) / n
    return {"adapters": n, "rss_before_mib": before, "rss_after_mib": after, "per_adapter_mib": per,
            "weight_mib": weight_mib, "ratio": per / weight_mib}


async def same_moments(args, workdir: Path, pool: Path, low: int, high: int) -> dict:
    """Steady uniform tokens/s of K=`low` and K=`high` taken in turn by two servers that are both up (see the
    module docstring): one warm-up round each, then --pair-rounds measured rounds each; medians and ratio."""
    if args.page_cache != "as-is":
        set_page_cache(pool, high, args.page_cache)
    rounds = argparse.Namespace(**{**vars(args), "cold": args.pair_lead, "steady": args.pair_seconds})
    servers: dict[int, Server] = {}
    got: dict[int, list[float]] = {low: [], high: []}
    try:
        for k in (low, high):
            store = make_store(workdir, pool, k, f"pair-{k}", args.served_files)
            servers[k] = serve(args, workdir, store, args.room, f"pair-server-{k}")
        for i in range(args.pair_rounds + 1):                  # round 0 warms each server: not counted
            for k in (low, high):
                _, steady, extra = await run_traffic(servers[k].url, [f"a{j}" for j in range(k)], rounds, "uniform")
                if extra["errors"]:
                    print(f"  errors (K={k}, round {i}): {extra['errors']}", flush=True)
                if i > 0:
                    got[k].append(steady.tokens / (steady.end - steady.start))
    finally:
        for server in servers.values():
            server.stop()
    lo, hi = statistics.median(got[low]), statistics.median(got[high])
    return {"low": low, "high": high, "rounds": {str(k): v for k, v in got.items()}, "low_tokens_s": lo,
            "high_tokens_s": hi, "ratio": hi / lo}


async def touch_all(url: str, count: int, streams: int) -> float:
    """--touch-all: one 1-token request on each of a0..a{count-1}, `streams` at a time (a server that has
    served every adapter before); the seconds taken."""
    started, names = time.monotonic(), [f"a{i}" for i in range(count)]

    async def client(http: httpx.AsyncClient) -> None:
        while names:
            r = await http.post("/v1/completions", json={"model": names.pop(), "prompt": "Hi", "max_tokens": 1})
            r.raise_for_status()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=streams)) as http:
        await asyncio.gather(*(client(http) for _ in range(streams)))
    return time.monotonic() - started


async def main_async(args, workdir: Path) -> dict:
    counts = [int(c) for c in args.counts.split(",")]
    pool = Path(args.pool or workdir / "pool")
    pool.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sizes = write_pool(pool, max(counts + [args.memory]), args)
    print(f"{max(counts + [args.memory])} adapters in {pool} ({time.monotonic() - started:.0f} s), mean "
          f"{statistics.mean(sizes) / 2**20:.2f} MiB, ranks {args.rank_min}-{args.rank_max}, {args.adapter_dtype}; "
          f"{args.streams} streams x {args.max_tokens} tokens, device room {args.room}", flush=True)
    if args.served_files == "kept":
        started = time.monotonic()
        made = prepare_served(pool, max(counts + [args.memory]))
        print(f"served files: kept ({made} made now, {time.monotonic() - started:.0f} s)", flush=True)
    rows = []
    for k in counts:
        for distribution in args.distributions.split(","):
            tag = f"{k}-{distribution}"
            if args.page_cache != "as-is":
                size = set_page_cache(pool, k, args.page_cache)
                print(f"page cache: {args.page_cache} ({size / 2**30:.2f} GiB of files)", flush=True)
            server = serve(args, workdir, make_store(workdir, pool, k, tag, args.served_files), args.room,
                           f"server-{tag}")
            try:
                if args.touch_all:
                    print(f"touched every adapter once in {await touch_all(server.url, k, args.streams):.0f} s",
                          flush=True)
                cold, steady, extra = await run_traffic(server.url, [f"a{i}" for i in range(k)], args, distribution)
            finally:
                server.stop()
            for window, w in (("cold", cold), ("steady", steady)):
                rows.append(row(k, distribution, window, w, extra["loads"][window]))
                print_row(rows[-1])
            if extra["errors"]:
                print(f"  errors: {extra['errors']}", flush=True)
    report = {"rows": rows}
    steady_uniform = {r["K"]: r["tokens_s"] for r in rows if r["window"] == "steady" and r["traffic"] == "uniform"}
    if len(steady_uniform) > 1:
        lo, hi = min(steady_uniform), max(steady_uniform)
        report["ratio"] = steady_uniform[hi] / steady_uniform[lo]
        print(f"\nsteady uniform tokens/s K={hi} / K={lo}: {report['ratio']:.2f} (target >= 0.8)")
    if args.pair_rounds > 0 and len(counts) > 1 and "uniform" in args.distributions.split(","):
        low, high = min(counts), max(counts)
        pair = report["same_moments"] = await same_moments(args, workdir, pool, low, high)
        print(f"steady uniform tokens/s K={high} / K={low} at the same moments ({args.pair_rounds} rounds of "
              f"{args.pair_seconds:g} s each, in turn): {pair['high_tokens_s']:.1f} / {pair['low_tokens_s']:.1f} = "
              f"{pair['ratio']:.2f} (target >= 0.8; rounds K={high} "
              f"{', '.join(f'{v:.1f}' for v in pair['rounds'][str(high)])}, K={low} "
              f"{', '.join(f'{v:.1f}' for v in pair['rounds'][str(low)])})", flush=True)
    for r in rows:
        if r["itl_p50_ms"]:
            print(f"ITL p99/p50 K={r['K']} {r['traffic']} {r['window']}: {r['itl_p99_ms'] / r['itl_p50_ms']:.2f}")
    if args.memory:
        report["memory"] = await memory_probe(args, workdir, pool, sizes)
        m = report["memory"]
        print(f"\nmemory: {m['adapters']} resident adapters: RSS {m['rss_before_mib']:.0f} -> {m['rss_after_mib']:.0f} "
              f"MiB, {m['per_adapter_mib']:.2f} MiB each for {m['weight_mib']:.2f} MiB of weights: "
              f"{m['ratio']:.2f}x (target <= 1.15)")
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="16,128,1000")
    p.add_argument("--distributions", default="uniform,zipf")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cold", type=float, default=15.0, help="seconds measured from a cold start")
    p.add_argument("--steady", type=float, default=40.0, help="seconds measured after the cold window")
    p.add_argument("--room", type=int, default=128, help="max_device_adapters of the servers")
    p.add_argument("--rank-min", type=int, default=8)
    p.add_argument("--rank-max", type=int, default=64)
    p.add_argument("--adapter-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--rare-share", type=float, default=0.05,
                   help="hot traffic: the share of requests on the adapters past the first --room (the rest spread "
                        "evenly over those --room, which then always have requests in flight)")
    p.add_argument("--memory", type=int, default=128, help="adapters of the memory probe (0: skip it)")
    p.add_argument("--dtype", default="auto", help="ADAPTER_SERVE_DTYPE of the servers")
    p.add_argument("--model", default=None, help="ADAPTER_SERVE_MODEL (default: the embedded model)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--pool", default=None, help="folder of the written adapters, kept between runs")
    p.add_argument("--served-files", default="kept", choices=["kept", "first", "off"],
                   help="kept: each adapter's served file (adapter_served_files) is made in the pool before the "
                        "runs, as a loader makes it, and linked into each store: a store that has served before; "
                        "first: none, every adapter's first load in the store; off: the servers write and map none "
                        "(adapter_served_files=false)")
    p.add_argument("--page-cache", default="warm", choices=["warm", "cold", "as-is"],
                   help="before each server: the store's files read into the page cache (warm), dropped from it "
                        "(cold), or left as they are (as-is)")
    p.add_argument("--touch-all", action="store_true",
                   help="before the windows, request every adapter of the store once, --streams at a time (a "
                        "server that has served them all before); the cold window then starts with the last "
                        "--room of them on the device")
    p.add_argument("--pair-rounds", type=int, default=3,
                   help="rounds of K=min and K=max in turn, both servers up (0: skip; see the docstring)")
    p.add_argument("--pair-seconds", type=float, default=20.0, help="seconds measured in each of those rounds")
    p.add_argument("--pair-lead", type=float, default=5.0, help="seconds before each of them, not measured")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        report = asyncio.run(main_async(args, Path(tmp)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
