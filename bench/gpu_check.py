"""`make gpu-check`: the CUDA path checked and measured in one command on a lent GPU machine (issue 17).

It (1) installs the carried wheels of what that machine lacks (`.whl/`, made here by `make gpu-wheels`:
fastapi, uvicorn, pydantic-settings, gguf, llguidance, ...) into /tmp/site when they are not importable,
(2) records the machine (GPU, driver, torch, Triton, transformers, peft), (3) runs the `gpu`-marked tests
(tests/gpu: decoder parity with transformers, adapters vs PEFT, batching invisible, CUDA graphs equal to the
eager engine, the service end to end through uvicorn; and the registry's device-tier test), (4) runs
bench/gpu_bench.py (Llama-3.2-1B shape, bf16, 16 and 64 adapters, with and without CUDA graphs, and a torch
profile) and bench/gpu_kernels.py (the Triton kernels timed alone over their tuning knobs), and (5) writes a
summary with the issue's targets. Results go to `$OUT` (the device tool's folder), else `--out`, else
bench/out/gpu_check: env.txt, gpu_tests.log, gpu_tests.xml, bench.log, bench.json, profile.txt, kernels.log,
summary.md (8 files: what the device tool brings back). Each phase has a time limit so that the whole stays
under 10 minutes; the exit status is non-zero when a test, the benchmark or the sweep failed.
`--dry-run` runs the same phases on the CPU (tests with ADAPTER_SERVE_TEST_DEVICE=cpu, the benchmark's tiny
model) with the C++ CPU kernels off and the Triton kernels forced under Triton's interpreter: the code paths
of the GPU run, checked end to end on a machine without GPU (5.5 minutes on 2 cores).
`--download-wheels` fills `.whl/` (pip download for the device's Python 3.12 on x86-64; needs PyPI).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS_DIR = os.path.join(REPO, ".whl")
SITE = "/tmp/site"
# What the device image lacks (its package list: /work/.library/device/KINDS.md), at the versions the
# development venv runs: module to test for -> wheel requirement.
WHEELS = {
    "fastapi": "fastapi==0.165.0", "starlette": "starlette==1.10.0", "uvicorn": "uvicorn==0.54.0",
    "pydantic": "pydantic==2.14.4", "pydantic_core": "pydantic-core==2.50.5",
    "pydantic_settings": "pydantic-settings==2.16.3", "dotenv": "python-dotenv==1.2.4",
    "typing_inspection": "typing-inspection==0.4.5", "annotated_types": "annotated-types==0.8.0",
    "opentelemetry": "opentelemetry-api==1.45.2", "multipart": "python-multipart==0.0.34",
    "gguf": "gguf==0.19.0", "llguidance": "llguidance==1.9.1", "anyio": "anyio==4.16.0",
    "typing_extensions": "typing-extensions==4.16.0",          # pydantic 2.14 needs >= 4.16; older ones ship widely
}
PLATFORMS = ["manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
GPU_TESTS = ["tests/gpu", "tests/service/registry/test_serving.py"]
DRY_RUN_ENV = {"ADAPTER_SERVE_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1", "ADAPTERS_CORE_TRITON": "1",
               "ADAPTER_SERVE_TRITON": "1", "ADAPTERS_CORE_SGMV": "0", "ADAPTER_SERVE_CPU_KERNELS": "0",
               "ADAPTER_SERVE_QUANT_KERNEL": "0"}
TARGETS = {"b_over_a": 0.9, "b_over_d": 5.0, "a_over_c": 2.0}


def download_wheels() -> int:
    os.makedirs(WHEELS_DIR, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", WHEELS_DIR] + [a for p in PLATFORMS for a in ("--platform", p)]
    return subprocess.call(cmd + sorted(set(WHEELS.values())))


def install_wheels(log) -> None:
    """Install the carried wheels into SITE when a module they provide is missing; SITE goes first on the path
    of this process and of every child (pytest, the service it starts, the benchmark)."""
    missing = [m for m in WHEELS if importlib.util.find_spec(m) is None]
    if missing and glob.glob(os.path.join(WHEELS_DIR, "*.whl")):
        log(f"missing {missing}: installing the carried wheels into {SITE}")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", SITE, *glob.glob(f"{WHEELS_DIR}/*.whl")])
    elif missing:
        log(f"missing {missing} and no wheels in .whl/ (make gpu-wheels; the device tool must carry .whl)")
    if os.path.isdir(SITE):
        sys.path.insert(0, SITE)
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE, REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def run_logged(cmd: list[str], log_path: str, timeout: float, log) -> int:
    """Run `cmd` in the repo with output to `log_path` (and echoed); its exit code, 124 when killed at `timeout`."""
    log(f"$ {' '.join(cmd)}  (limit {timeout:.0f} s, log {log_path})")
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)           # a silent hang is killed too
        timer.start()
        try:
            for line in proc.stdout:
                fh.write(line)
                if "leaked" not in line and "nanobind" not in line:    # Triton's exit noise under the interpreter
                    sys.stdout.write(line)
            code = proc.wait()
        finally:
            timer.cancel()
        if time.monotonic() - start >= timeout:
            fh.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n")
            code = 124
    log(f"exit {code} after {time.monotonic() - start:.0f} s")
    return code


def environment(dry_run: bool) -> str:
    lines = [f"python {sys.version.split()[0]}"]
    for mod in ("torch", "triton", "transformers", "peft", "fastapi", "uvicorn"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except Exception as exc:                       # report, never stop the check
            lines.append(f"{mod}: {type(exc).__name__}: {exc}")
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                     f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
    else:
        lines.append("no CUDA device" + (" (dry run on the CPU)" if dry_run else ""))
    try:
        lines.append(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                                    capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        lines.append("nvidia-smi: not available")
    return "\n".join(lines)


def test_counts(xml_path: str) -> dict:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def summary(env: str, counts: dict, tests_rc: int, bench_rc: int, bench_json: str) -> tuple[str, bool]:
    lines = ["# gpu-check", "", "```", env, "```", ""]
    passed = counts.get("tests", 0) - counts.get("failures", 0) - counts.get("errors", 0) - counts.get("skipped", 0)
    lines.append(f"gpu tests: exit {tests_rc}; {passed} passed, {counts.get('failures', 0)} failed, "
                 f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped")
    ok = tests_rc == 0 and bench_rc == 0
    try:
        with open(bench_json, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        report = None
    lines.append(f"benchmark: exit {bench_rc}" + ("" if report else " (no report)"))
    if report:
        lines += ["", f"{report['gpu']}, torch {report['torch']}, {report['shape']} {report['dtype']}, prompts "
                      f"{report['prompt_len']} tokens, {report['new_tokens']} new, LoRA r={report['rank']}, "
                      f"Triton SGMV {'on' if report['triton_sgmv'] else 'OFF'}", "",
                  "| adapters | ours base | ours adapters | base, no graphs | adapters, no graphs | adapters, torch "
                  "path | transformers | peft mixed | b/a | b/d | a/c | TTFT p50 b (ms) | ITL p50 b (ms) |",
                  "|" + "---|" * 13]
        for n, runs in report["runs"].items():
            r = runs["ratios"]
            d, b_d = ((f"{runs['d']['tps']:.0f}", f"{r['b_over_d']:.1f}") if "d" in runs else ("not run", "-"))
            lines.append(f"| {n} | {runs['a']['tps']:.0f} | {runs['b']['tps']:.0f} | {runs['ae']['tps']:.0f} | "
                         f"{runs['be']['tps']:.0f} | {runs['t']['tps']:.0f} | {runs['c']['tps']:.0f} | "
                         f"{d} | {r['b_over_a']:.2f} | {b_d} | {r['a_over_c']:.2f} | "
                         f"{runs['b']['ttft50'] * 1e3:.0f} | {runs['b']['itl50'] * 1e3:.1f} |")
        for n, runs in report["runs"].items():
            misses = [f"{k} {runs['ratios'][k]:.2f} < {t}" for k, t in TARGETS.items()
                      if k in runs["ratios"] and runs["ratios"][k] < t]
            lines.append(f"\n{n} adapters: " + (f"below target: {', '.join(misses)}" if misses else "every target met"))
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same phases on the CPU, tiny shapes")
    parser.add_argument("--out", help="results folder (default: $OUT, else bench/out/gpu_check)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-peft", action="store_true", help="the benchmark without peft's mixed batch (d): "
                        "a rerun's ~2 minutes saved on a lent GPU, after a run that measured it")
    parser.add_argument("--download-wheels", action="store_true", help="fill .whl/ for the device and exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels()
    out = args.out or os.environ.get("OUT") or os.path.join(REPO, "bench", "out",
                                                            "gpu_check-dry-run" if args.dry_run else "gpu_check")
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - start:5.0f} s] {msg}", flush=True)

    os.environ["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        os.environ.update(DRY_RUN_ENV)
    install_wheels(log)
    env = environment(args.dry_run)
    with open(os.path.join(out, "env.txt"), "w", encoding="utf-8") as fh:
        fh.write(env + "\n")
    log(env.replace("\n", "; "))
    tests_rc = bench_rc = 0
    xml_path = os.path.join(out, "gpu_tests.xml")
    if not args.skip_tests:
        tests_rc = run_logged([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               "--durations=15", f"--junitxml={xml_path}", *GPU_TESTS],
                              os.path.join(out, "gpu_tests.log"), 540 if args.dry_run else 150, log)
    bench_json = os.path.join(out, "bench.json")
    if not args.skip_bench:
        bench = [sys.executable, "bench/gpu_bench.py", "--json", bench_json, "--profile",
                 os.path.join(out, "profile.txt")] + (["--dry-run"] if args.dry_run else []) + (
                     ["--skip-peft"] if args.skip_peft else [])
        bench_rc = run_logged(bench, os.path.join(out, "bench.log"), 300, log)
    kernels_rc = 0
    if not args.skip_bench:
        kernels_rc = run_logged([sys.executable, "bench/gpu_kernels.py"] + (["--dry-run"] if args.dry_run else []),
                                os.path.join(out, "kernels.log"), 120, log)
    text, ok = summary(env, test_counts(xml_path), tests_rc, bench_rc, bench_json)
    text += f"\nkernel sweep (bench/gpu_kernels.py): exit {kernels_rc}, tables in kernels.log\n"
    ok = ok and kernels_rc == 0
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print("\n" + text, flush=True)
    log(f"results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
