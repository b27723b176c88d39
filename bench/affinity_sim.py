"""Adapter-affinity routing vs round-robin past this machine: a replay of an adapter trace over N replicas.

Each of N replicas (1 to 64) keeps at most `--cap` adapters on its device (the per-replica adapter cap) and
`--cpu-cap` more in RAM, both LRU; K adapters (10 to 10,000) are drawn per request from a Zipf (`--zipf-s`) or
a uniform distribution. Two routers see the same trace:
  * affinity (Ray Serve's model multiplexing): a request goes to the least-backlogged replica already holding its
    adapter unless every holder is saturated (a backlog of `--max-ongoing` requests); otherwise, and for an
    adapter no replica holds, to the less backlogged of two random replicas (Serve's power of two choices),
    which loads it;
  * round-robin (a plain Kubernetes Service): replica i mod N, which loads the adapter when it lacks it.
A replica is one server whose work is, per request, `--new-tokens` x the measured per-token step time at a full
batch, plus, for a load, the measured load time (from RAM if the adapter is in its cpu tier, else from the
store): an adapter load runs between two engine steps and stalls every request of that replica. Requests arrive
as a Poisson stream at `--offered` x the cluster's ideal capacity (no loads, perfect balance). After a warm-up
of `--requests` requests, the next `--requests` are measured: adapter loads per 1,000 requests and the expected
throughput (each replica delivers its requests' tokens over the trace's duration, or at its own pace when their
work and loads need longer: below the offered rate when loads or imbalance overload replicas; the default 80 %
keeps queues finite, so that "saturated" means what it does in Serve). Latency is not
reported: a replica here is one server doing its requests' work in turn, which gives the engine's throughput but
not its latencies (the engine runs a batch of requests at once).

The two times come from this machine (`--measure`, the default when none is given): a rank-16 LoRA on all seven
projections of the default model (SmolLM2-135M, served from its GGUF blocks) loaded from its folder and from
RAM, and the engine's decode throughput with 16 concurrent requests x 32 tokens on 16 adapters. Usage:
    .venv/bin/python bench/affinity_sim.py [--replicas 1 4 16 64] [--adapters 10 100 1000 10000] [--cap 16]
        [--requests 20000] [--load-ms L --load-cpu-ms LC --token-ms T] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import OrderedDict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


# ----- measuring this machine ----------------------------------------------------------------------------------
def measure(rank: int = 16, repeats: int = 5) -> dict:
    """Median adapter load times (folder -> model, RAM -> model) and the decode time per token at batch 16."""
    import statistics

    import torch

    import adapters_core as ac
    from adapter_scale_bench import serving_model
    from engine_bench import PROJECTIONS, run_engine

    torch.manual_seed(0)
    model, loaded = serving_model("gguf")
    names = [f"a{i}" for i in range(16)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        ac.inject_adapter_in_model(ac.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS,
                                                 init_lora_weights=False), model, name)
    ac.set_adapter(model, [])
    with tempfile.TemporaryDirectory() as folder:
        ac.save_adapter(model, folder, "a0")
        config, tensors = ac.load_config(folder), ac.read_adapter_weights(folder)
        disk, ram = [], []
        for i in range(repeats):
            start = time.perf_counter()
            ac.load_adapter(model, folder, adapter_name=f"x{i}", low_cpu_mem_usage=True)
            disk.append(time.perf_counter() - start)
            ac.set_adapter(model, [])
            ac.delete_adapter(model, f"x{i}")
            start = time.perf_counter()
            ac.load_adapter(model, folder, adapter_name=f"y{i}", config=config, state_dict=tensors,
                            low_cpu_mem_usage=True)
            ram.append(time.perf_counter() - start)
            ac.set_adapter(model, [])
            ac.delete_adapter(model, f"y{i}")
    ac.set_adapter(model, [])
    prompts = [loaded.tokenizer.encode(f"Tell me about topic number {i}.") for i in range(16)]
    run = run_engine(model, prompts, names, 32, loaded.tokenizer.eos_token_ids)
    return {"load_ms": 1e3 * statistics.median(disk), "load_cpu_ms": 1e3 * statistics.median(ram),
            "token_ms": 1e3 / run["tps"]}


# ----- the simulation ------------------------------------------------------------------------------------------
class Replica:
    def __init__(self, cap: int, cpu_cap: int):
        self.cap, self.cpu_cap = cap, cpu_cap
        self.device: OrderedDict[int, None] = OrderedDict()
        self.cpu: OrderedDict[int, None] = OrderedDict()
        self.busy_until = 0.0

    def backlog(self, now: float) -> float:
        return max(0.0, self.busy_until - now)

    def take(self, adapter: int, holders: dict[int, set], me: int) -> str:
        """Make `adapter` resident; what it cost: '' (held), 'cpu' or 'disk'."""
        if adapter in self.device:
            self.device.move_to_end(adapter)
            return ""
        source = "cpu" if adapter in self.cpu else "disk"
        self.cpu.pop(adapter, None)
        if len(self.device) >= self.cap:
            old, _ = self.device.popitem(last=False)
            holders[old].discard(me)
            self.cpu[old] = None
            if len(self.cpu) > self.cpu_cap:
                self.cpu.popitem(last=False)
        self.device[adapter] = None
        holders.setdefault(adapter, set()).add(me)
        return source


def trace(k: int, n: int, dist: str, s: float, rng: random.Random) -> list[int]:
    if dist == "uniform":
        return [rng.randrange(k) for _ in range(n)]
    weights = [1.0 / (i + 1) ** s for i in range(k)]
    ids = list(range(k))
    rng.shuffle(ids)                      # popularity is not the adapter's index
    return rng.choices(ids, weights=weights, k=n)


def simulate(policy: str, replicas: int, adapters: list[int], args, times: dict) -> dict:
    work = args.new_tokens * times["token_ms"] / 1e3                       # seconds per request
    cost = {"": 0.0, "cpu": times["load_cpu_ms"] / 1e3, "disk": times["load_ms"] / 1e3}
    rate = args.offered * replicas / work                                 # requests per second
    pool = [Replica(args.cap, args.cpu_cap) for _ in range(replicas)]
    arrivals, rng = random.Random(args.seed + 1), random.Random(args.seed + 2)   # same arrivals for both
    holders: dict[int, set] = {}
    saturated = args.max_ongoing * work
    now, loads, first = 0.0, 0, None
    busy, tokens = [0.0] * replicas, [0] * replicas           # per replica, over the measured requests
    warm = len(adapters) // 2
    for i, adapter in enumerate(adapters):
        now += arrivals.expovariate(rate)
        if policy == "round-robin":
            r = i % replicas
        else:
            held = [h for h in holders.get(adapter, ()) if pool[h].backlog(now) < saturated]
            if held:
                r = min(held, key=lambda h: pool[h].backlog(now))
            else:
                a, b = rng.randrange(replicas), rng.randrange(replicas)
                r = a if pool[a].backlog(now) <= pool[b].backlog(now) else b
        replica = pool[r]
        source = replica.take(adapter, holders, r)
        done = max(now, replica.busy_until) + cost[source] + work
        replica.busy_until = done
        if i >= warm:
            first = now if first is None else first
            loads += source != ""
            busy[r] += cost[source] + work
            tokens[r] += args.new_tokens
    measured, window = len(adapters) - warm, now - first
    # A replica delivers its requests' tokens within the window unless they need more time than that: then
    # at its own pace (a hot replica limits what its requests get, whatever the others do).
    delivered = sum(t * min(1.0, window / b) for t, b in zip(tokens, busy) if b > 0)
    return {"loads_per_1k": 1000 * loads / measured, "tokens_per_s": delivered / window}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--adapters", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--distributions", nargs="+", default=["zipf", "uniform"], choices=["zipf", "uniform"])
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--cap", type=int, default=16, help="adapters per replica's device (max_adapters_per_replica)")
    p.add_argument("--cpu-cap", type=int, default=128, help="adapters per replica's RAM tier (max_cpu_adapters)")
    p.add_argument("--requests", type=int, default=20000, help="measured requests (after as many of warm-up)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--offered", type=float, default=0.8, help="arrival rate / the cluster's ideal capacity")
    p.add_argument("--max-ongoing", type=int, default=16, help="backlog (requests) at which a replica is saturated")
    p.add_argument("--load-ms", type=float, help="adapter load from the store, ms (default: measured here)")
    p.add_argument("--load-cpu-ms", type=float, help="adapter load from RAM, ms (default: measured here)")
    p.add_argument("--token-ms", type=float, help="decode time per token at a full batch, ms (default: measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = p.parse_args(argv)
    given = [args.load_ms, args.load_cpu_ms, args.token_ms]
    if any(v is not None and v <= 0 for v in given):
        p.error("--load-ms, --load-cpu-ms and --token-ms must be positive")
    if min(args.replicas) < 1 or min(args.adapters) < 1 or args.cap < 1 or args.requests < 100:
        p.error("--replicas, --adapters and --cap must be >= 1 and --requests >= 100")
    if None in given:
        print("measuring this machine (default model, rank-16 LoRA on 7 projections, 16 x 32 tokens)...",
              flush=True)
        times = measure()
    else:
        times = {}
    times = {"load_ms": args.load_ms or times["load_ms"], "load_cpu_ms": args.load_cpu_ms or times["load_cpu_ms"],
             "token_ms": args.token_ms or times["token_ms"]}
    print(f"adapter load {times['load_ms']:.1f} ms from the store, {times['load_cpu_ms']:.1f} ms from RAM; "
          f"{times['token_ms']:.2f} ms per generated token at batch 16; cap {args.cap} adapters per replica, "
          f"offered load {args.offered:.0%} of ideal, {args.new_tokens} tokens per request")
    rows = []
    for dist in args.distributions:
        for k in args.adapters:
            for n in args.replicas:
                ids = trace(k, 2 * args.requests, dist, args.zipf_s, random.Random(args.seed))
                row = {"dist": dist, "K": k, "N": n}
                for policy in ("affinity", "round-robin"):
                    row[policy] = simulate(policy, n, ids, args, times)
                rows.append(row)
    show(rows, args.markdown)
    return rows


def show(rows: list[dict], markdown: bool) -> None:
    head = ["trace", "K", "N", "loads/1k affinity", "loads/1k round-robin", "tok/s affinity", "tok/s round-robin",
            "affinity / round-robin"]
    lines = []
    for r in rows:
        a, b = r["affinity"], r["round-robin"]
        lines.append([r["dist"], str(r["K"]), str(r["N"]), f"{a['loads_per_1k']:.1f}", f"{b['loads_per_1k']:.1f}",
                      f"{a['tokens_per_s']:.0f}", f"{b['tokens_per_s']:.0f}",
                      f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for line in [head] + lines:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))


if __name__ == "__main__":
    main()
