"""Load test: N concurrent clients over K adapters against a live server over loopback, while an admin loop
uploads, activates, deactivates and deletes other adapters. Bounded by --requests and --duration; it stops
by itself and exits 1 when a criterion fails.

    .venv/bin/python bench/load_test.py            # long mode: N=64 clients, K=100 adapters, default model
    .venv/bin/python bench/load_test.py --short    # the test suite's mode: N=8, K=6, a few dozen requests
    .venv/bin/python bench/load_test.py --url http://127.0.0.1:8000   # a running server (no RSS figures)

Unless --url is given it starts `python -m service` itself on a free loopback port (float32, so a greedy
answer does not depend on what else shares its batch; a small `max_waiting`, so the queue fills). It writes
K random non-zero LoRA adapters in PEFT's format (shapes from the base model's config) and uploads them;
takes the reference greedy output of every (prompt, adapter) pair, each request alone; warms up with one
burst of N requests and reads the server's RSS; then N clients (half streaming) send greedy requests with
adapters drawn Zipf-skewed (default) or uniformly, honouring `Retry-After` on 429, while the admin loop
churns adapters the clients do not use. Afterwards it reads the RSS again and stops the server with SIGTERM.

Criteria: inference requests get no 5xx and no other unexpected status or transport error; every greedy
answer equals its reference; every admin operation succeeds (an activation refused with the registry's
documented 503, every device slot held by requests in flight, is retried and counted); RSS after the run
within 10% of RSS after warm-up; 429s seen, each with `Retry-After`, and the engine's waiting queue never above
`max_waiting` (sampled from /stats, which counts apart the requests waiting for a device slot before that queue:
the waiting gauges of /metrics include them); the server exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from adapters_core.state_dict import PEFT_PREFIX  # noqa: E402
from service.model.config import ModelConfig  # noqa: E402
from service.model.gguf_loader import config_from_gguf, default_model_path  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The weather today"]
TIMEOUT = 180.0                       # one HTTP request; generous for 64 clients on 2 cores
ADMIN_TRIES = 20                      # an activation refused while every device slot is in use is retried

LONG = dict(clients=64, adapters=100, requests=6000, duration=300.0, max_tokens=16, prompts=2,
            max_batch_size=16, max_waiting=16, churn=4)
SHORT = dict(clients=8, adapters=6, requests=40, duration=30.0, max_tokens=8, prompts=2,
             max_batch_size=4, max_waiting=2, churn=2)


# ----- adapters ----------------------------------------------------------------------------------------------
def base_config(spec: Optional[str]) -> ModelConfig:
    """The base model's config without loading its weights (a folder's config.json, else GGUF metadata)."""
    if spec and os.path.isdir(spec):
        return ModelConfig.from_hf_dict(json.loads((Path(spec) / "config.json").read_text()))
    from gguf import GGUFReader
    reader = GGUFReader(spec or default_model_path())
    metadata = {key: f.contents() for key, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return config_from_gguf(metadata, set(tensors), int(tensors["token_embd.weight"].shape[-1]))


def write_adapter(folder: Path, config: ModelConfig, seed: int, r: int = 4) -> Path:
    """A LoRA on q_proj and v_proj with random non-zero weights, in PEFT's format."""
    generator = torch.Generator().manual_seed(seed)
    out = {"q_proj": config.num_attention_heads * config.head_dim,
           "v_proj": config.num_key_value_heads * config.head_dim}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, rows in out.items():
            key = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, config.hidden_size, generator=generator) \
                / config.hidden_size ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, r, generator=generator) * 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(out)).save(str(folder))
    return folder


def adapter_files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


# ----- the server ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service` started by this script (so its RSS can be read), or a running one at --url."""

    def __init__(self, args, workdir: Path):
        self.process: Optional[subprocess.Popen] = None
        self.url = args.url
        if args.url:
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "ADAPTER_SERVE_PORT": str(port), "ADAPTER_SERVE_HOST": "127.0.0.1",
               "ADAPTER_SERVE_ADAPTER_DIR": str(workdir / "store"), "ADAPTER_SERVE_DTYPE": args.dtype,
               "ADAPTER_SERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
               "ADAPTER_SERVE_MAX_WAITING": str(args.max_waiting), "ADAPTER_SERVE_MAX_SEQ_LEN": "512"}
        if args.model:
            env["ADAPTER_SERVE_MODEL"] = args.model
        self.log = open(workdir / "server.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout} s")

    def rss_mib(self) -> Optional[float]:
        if self.process is None:
            return None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None

    def stop(self) -> Optional[int]:
        """SIGTERM, then the exit status (None when the server is not ours)."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)


# ----- requests ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    status: Optional[int]                 # None: transport error
    text: str = ""
    finish_reason: Optional[str] = None
    tokens: int = 0
    latency: float = 0.0
    ttft: Optional[float] = None
    retry_after: Optional[str] = None
    error: str = ""


async def complete(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    start = time.monotonic()
    try:
        if not stream:
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                return Result(r.status_code, latency=time.monotonic() - start,
                              retry_after=r.headers.get("retry-after"), error=r.text[:200])
            out = r.json()
            choice = out["choices"][0]
            return Result(200, choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"],
                          time.monotonic() - start)
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Result(r.status_code, latency=time.monotonic() - start,
                              retry_after=r.headers.get("retry-after"), error=text[:200])
            result, pieces, done = Result(200), [], False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    if result.ttft is None:
                        result.ttft = time.monotonic() - start
                    pieces.append(choice["text"])
                    if choice["finish_reason"]:
                        result.finish_reason = choice["finish_reason"]
                    else:
                        result.tokens += 1
            result.text, result.latency = "".join(pieces), time.monotonic() - start
            if not done:
                result.status, result.error = None, "the stream ended without [DONE]"
            return result
    except httpx.HTTPError as exc:
        return Result(None, latency=time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")


@dataclass
class Load:
    results: list[Result] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    admin: Counter = field(default_factory=Counter)
    admin_busy: int = 0                   # activations answered 503 "device slots in use", then retried
    max_waiting_seen: float = 0.0         # the engine's queue
    max_slot_waiters_seen: float = 0.0    # requests waiting for a device slot, before the engine's queue
    seconds: float = 0.0


def make_picker(names: list[str], distribution: str, rng: random.Random, zipf_s: float):
    weights = [1 / (rank + 1) ** zipf_s for rank in range(len(names))] if distribution == "zipf" else None
    return lambda: rng.choices(names, weights)[0]


async def run_load(args, http: httpx.AsyncClient, adapters: list[str], references: dict, prompts: list[str],
                   churn_folders: list[Path]) -> Load:
    load, rng = Load(), random.Random(args.seed)
    pick = make_picker(adapters, args.distribution, rng, args.zipf_s)
    issued, start = 0, time.monotonic()
    deadline = start + args.duration
    stop = asyncio.Event()

    async def client(index: int) -> None:
        nonlocal issued
        stream = index % 2 == 0
        while time.monotonic() < deadline and issued < args.requests:
            issued += 1
            model, prompt = pick(), rng.choice(prompts)
            result = await complete(http, model, prompt, args.max_tokens, stream)
            load.results.append(result)
            if result.status == 200:
                expected = references[(model, prompt)]
                if (result.text, result.finish_reason) != expected:
                    load.mismatches.append(f"{model} / {prompt!r}: {result.text!r} ({result.finish_reason}) "
                                           f"!= {expected[0]!r} ({expected[1]})")
            elif result.status == 429:
                await asyncio.sleep(min(float(result.retry_after or 1), 5.0))

    async def admin() -> None:
        cycle = 0
        while not stop.is_set():
            folder = churn_folders[cycle % len(churn_folders)]
            name = f"churn-{cycle}"
            steps = [("upload", lambda: http.post("/admin/adapters", data={"name": name},
                                                  files=adapter_files(folder))),
                     ("activate", lambda: http.post(f"/admin/adapters/{name}/activate")),
                     ("deactivate", lambda: http.post(f"/admin/adapters/{name}/deactivate")),
                     ("delete", lambda: http.delete(f"/admin/adapters/{name}"))]
            for verb, call in steps:
                for _ in range(ADMIN_TRIES):
                    try:
                        status = (await call()).status_code
                    except httpx.HTTPError as exc:
                        load.admin[f"{verb} {type(exc).__name__}"] += 1
                        break
                    if verb == "activate" and status == 503:     # documented: every device slot in use
                        load.admin_busy += 1
                        await asyncio.sleep(0.5)
                        continue
                    load.admin[f"{verb} {status}"] += 1
                    break
                else:
                    load.admin[f"{verb} still 503 after {ADMIN_TRIES} tries"] += 1
            cycle += 1
            await asyncio.sleep(0.2)

    async def monitor() -> None:
        # /stats: the engine's queue (what max_waiting bounds) apart from the requests waiting for a device slot
        # before it, which the waiting gauges of /metrics also count
        while not stop.is_set():
            try:
                r = await http.get("/stats")
                if r.status_code == 200:
                    requests = r.json()["requests"]
                    slot = requests.get("waiting_for_adapter_slot", 0)
                    load.max_waiting_seen = max(load.max_waiting_seen, float(requests["waiting"] - slot))
                    load.max_slot_waiters_seen = max(load.max_slot_waiters_seen, float(slot))
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.25)

    background = [asyncio.create_task(admin()), asyncio.create_task(monitor())]
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    load.seconds = time.monotonic() - start
    stop.set()
    await asyncio.gather(*background)
    return load


# ----- report ----------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(args, load: Load, rss_warm, rss_after, exit_status, distinct_refs: int, n_refs: int) -> dict:
    ok = [r for r in load.results if r.status == 200]
    statuses = Counter("transport error" if r.status is None else str(r.status) for r in load.results)
    throttled = [r for r in load.results if r.status == 429]
    unexpected = {s: n for s, n in statuses.items() if s not in ("200", "429")}
    admin_bad = {k: n for k, n in load.admin.items() if not k.split()[1].startswith("2")}
    ours = rss_warm is not None
    checks = {
        "some requests completed": bool(ok),
        "inference: no 5xx, no other unexpected status or transport error": not unexpected,
        "every greedy answer equals its reference": not load.mismatches,
        "admin operations all succeeded (activate retried while device slots are busy)":
            bool(load.admin) and not admin_bad,
        "every 429 carries Retry-After": all(r.retry_after for r in throttled),
    }
    if ours:
        checks["429s seen once the queue is full"] = bool(throttled)
        checks[f"waiting queue never above max_waiting={args.max_waiting}"] = load.max_waiting_seen <= args.max_waiting
        checks["RSS after the run within 10% of RSS after warm-up"] = rss_after <= 1.10 * rss_warm
        checks["server exits 0 on SIGTERM"] = exit_status == 0
    summary = {
        "mode": "short" if args.short else "long", "clients": args.clients, "adapters": args.adapters,
        "distribution": args.distribution, "max_tokens": args.max_tokens, "seconds": round(load.seconds, 1),
        "requests": len(load.results), "completed": len(ok),
        "throughput_requests_per_s": round(len(ok) / load.seconds, 2) if load.seconds else 0,
        "throughput_tokens_per_s": round(sum(r.tokens for r in ok) / load.seconds, 1) if load.seconds else 0,
        "ttft_p50_ms": _ms(percentile([r.ttft for r in ok if r.ttft is not None], 50)),
        "ttft_p99_ms": _ms(percentile([r.ttft for r in ok if r.ttft is not None], 99)),
        "latency_p50_ms": _ms(percentile([r.latency for r in ok], 50)),
        "latency_p99_ms": _ms(percentile([r.latency for r in ok], 99)),
        "statuses": dict(statuses), "throttled_with_retry_after": sum(1 for r in throttled if r.retry_after),
        "max_waiting_seen": load.max_waiting_seen, "max_slot_waiters_seen": load.max_slot_waiters_seen,
        "mismatches": load.mismatches[:20],
        "mismatch_count": len(load.mismatches), "references": n_refs, "distinct_reference_outputs": distinct_refs,
        "admin": dict(load.admin), "admin_activate_busy_retries": load.admin_busy, "rss_warm_mib": rss_warm, "rss_after_mib": rss_after,
        "server_exit_status": exit_status, "errors": sorted({r.error for r in load.results if r.error
                                                             and r.status != 429})[:10],
        "checks": checks, "passed": all(checks.values()),
    }
    return summary


def _ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value * 1000, 1)


def print_summary(s: dict) -> None:
    print(f"\n== load test ({s['mode']}): {s['clients']} clients, {s['adapters']} adapters ({s['distribution']}), "
          f"max_tokens {s['max_tokens']}, {s['seconds']} s")
    print(f"requests {s['requests']}, completed {s['completed']}: {s['throughput_requests_per_s']} req/s, "
          f"{s['throughput_tokens_per_s']} generated tokens/s")
    print(f"time to first token (streaming): p50 {s['ttft_p50_ms']} ms, p99 {s['ttft_p99_ms']} ms")
    print(f"latency: p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms")
    print(f"statuses: {s['statuses']}; 429 with Retry-After: {s['throttled_with_retry_after']}; "
          f"max waiting seen: {s['max_waiting_seen']} (and {s['max_slot_waiters_seen']} for a device slot)")
    print(f"references: {s['references']} pairs, {s['distinct_reference_outputs']} distinct outputs; "
          f"mismatches: {s['mismatch_count']}")
    for line in s["mismatches"]:
        print(f"  mismatch: {line}")
    for line in s["errors"]:
        print(f"  error: {line}")
    print(f"admin: {s['admin']}; activations retried after 503 (device slots in use): "
          f"{s['admin_activate_busy_retries']}")
    if s["rss_warm_mib"] is not None:
        print(f"server RSS: {s['rss_warm_mib']:.0f} MiB after warm-up, {s['rss_after_mib']:.0f} MiB after the run "
              f"({(s['rss_after_mib'] / s['rss_warm_mib'] - 1) * 100:+.1f}%); exit status on SIGTERM: "
              f"{s['server_exit_status']}")
    for name, passed in s["checks"].items():
        print(f"[{'PASS' if passed else 'FAIL'}] {name}")


# ----- main ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="small N, K and request count (the test suite's mode)")
    p.add_argument("--url", help="a running server; default: start `python -m service` here")
    p.add_argument("--model", help="base model the server loads (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="float32", help="server dtype when started here (float32: exact greedy)")
    p.add_argument("--clients", type=int, help="N concurrent clients (half streaming)")
    p.add_argument("--adapters", type=int, help="K adapters the clients use")
    p.add_argument("--distribution", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--requests", type=int, help="most requests sent in the load phase")
    p.add_argument("--duration", type=float, help="most seconds of the load phase")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--prompts", type=int, help=f"how many of the {len(PROMPTS)} prompts to use")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-waiting", type=int)
    p.add_argument("--churn", type=int, help="distinct adapter folders the admin loop cycles through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the summary to this file")
    args = p.parse_args(argv)
    for key, value in (SHORT if args.short else LONG).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


async def main_async(args, server: Server, workdir: Path) -> dict:
    config = base_config(args.model)
    folders = [write_adapter(workdir / f"a{i}", config, seed=i) for i in range(args.adapters)]
    churn = [write_adapter(workdir / f"c{i}", config, seed=10_000 + i) for i in range(args.churn)]
    # idle connections are dropped before uvicorn's 5 s keep-alive closes them: a client that sleeps 5 s after a 429
    # and then reuses one the server is closing at that moment gets a ReadError (the race is the client's)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8,
                          keepalive_expiry=4.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as http:
        base_id = (await http.get("/v1/models")).json()["data"][0]["id"]
        names = [f"load-{i}" for i in range(args.adapters)]
        for name, folder in zip(names, folders):
            r = await http.post("/admin/adapters", data={"name": name}, files=adapter_files(folder))
            if r.status_code not in (200, 201):
                raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text}")
        models, prompts = [base_id, *names], PROMPTS[:args.prompts]     # the base too: a reference baseline
        started = time.monotonic()
        references = {}
        for model in models:               # each request alone: the reference greedy output
            for prompt in prompts:
                r = await complete(http, model, prompt, args.max_tokens, stream=False)
                if r.status != 200:
                    raise RuntimeError(f"reference {model} / {prompt!r} failed: {r.status} {r.error}")
                references[(model, prompt)] = (r.text, r.finish_reason)
        print(f"references: {len(references)} requests alone in {time.monotonic() - started:.1f} s", flush=True)
        rng = random.Random(args.seed + 1)
        await asyncio.gather(*(complete(http, rng.choice(models), rng.choice(prompts), args.max_tokens, i % 2 == 0)
                               for i in range(args.clients)))             # warm-up burst, not counted
        rss_warm = server.rss_mib()
        print(f"warm-up done; server RSS {rss_warm} MiB; load phase: up to {args.requests} requests or "
              f"{args.duration:.0f} s", flush=True)
        load = await run_load(args, http, names, references, prompts, churn)
        rss_after = server.rss_mib()
    exit_status = server.stop()
    distinct = len({text for text, _ in references.values()})
    return report(args, load, rss_warm, rss_after, exit_status, distinct, len(references))


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        workdir = Path(tmp)
        server = Server(args, workdir)
        try:
            started = time.monotonic()
            server.wait_ready()
            print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)
            summary = asyncio.run(main_async(args, server, workdir))
        finally:
            if server.process is not None and server.process.poll() is None:
                server.process.kill()
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
