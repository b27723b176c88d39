"""`make gpu-check`'s pieces run on the CPU, so they cannot rot unnoticed between GPU runs: the GPU benchmark's
dry run (tiny model, every system, every figure the summary reads), the kernel sweep's dry run (under Triton's
interpreter) and the summary's target check. The full
dry run (`make gpu-check-dry-run`: the `gpu` tests too, the Triton kernels under the interpreter) takes ~6
minutes and is run by hand; numbers are not checked here."""

import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_bench_dry_run_reports_every_system(tmp_path):
    report = load("gpu_bench").main(["--dry-run", "--json", str(tmp_path / "bench.json")])
    assert list(report["runs"]) == [4, 8]
    for runs in report["runs"].values():
        for key in ("a", "b", "t", "ae", "be", "c", "d"):
            assert runs[key]["tps"] > 0 and runs[key]["tokens"] > 0
        assert runs["b"]["tokens"] == runs["a"]["tokens"] and set(runs["ratios"]) >= {"b_over_a", "b_over_d", "a_over_c"}
    assert json.loads((tmp_path / "bench.json").read_text())["shape"] == "tiny"


@pytest.mark.slow
def test_gpu_kernels_dry_run_prints_both_sweeps(capsys):
    pytest.importorskip("triton")
    assert load("gpu_kernels").main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "## SGMV shrink + expand" in out and "## Decode attention" in out and "| tiny 64->96 | 4 |" in out


def test_summary_names_missed_targets(tmp_path):
    check = load("gpu_check")
    runs = {key: {"tps": tps, "ttft50": 0.05, "itl50": 0.01} for key, tps in
            {"a": 1000.0, "b": 850.0, "t": 500.0, "ae": 400.0, "be": 300.0, "c": 600.0, "d": 100.0}.items()}
    runs["ratios"] = {"b_over_a": 0.85, "b_over_d": 8.5, "a_over_c": 1.67, "b_over_t": 1.7}
    report = {"gpu": "NVIDIA H200", "torch": "2.11", "shape": "Llama-3.2-1B", "dtype": "torch.bfloat16",
              "prompt_len": 128, "new_tokens": 64, "rank": 16, "triton_sgmv": True, "runs": {"16": runs}}
    (tmp_path / "bench.json").write_text(json.dumps(report))
    (tmp_path / "t.xml").write_text('<testsuites><testsuite tests="9" failures="1" errors="0" skipped="2"/></testsuites>')
    text, ok = check.summary("env", check.test_counts(str(tmp_path / "t.xml")), 1, 0, str(tmp_path / "bench.json"))
    assert not ok and "6 passed, 1 failed, 0 errors, 2 skipped" in text and "NVIDIA H200" in text
    assert "below target: b_over_a 0.85 < 0.9, a_over_c 1.67 < 2.0" in text
    runs["ratios"].update(b_over_a=0.95, a_over_c=2.5)
    (tmp_path / "bench.json").write_text(json.dumps(report))
    text, ok = check.summary("env", {}, 0, 0, str(tmp_path / "bench.json"))
    assert ok and "every target met" in text
