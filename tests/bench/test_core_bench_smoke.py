"""The core benchmark runs end to end on a tiny model, so it cannot rot unnoticed (numbers are not checked:
timings on a shared 2-core machine are for BENCHMARKS.md, not for asserts)."""

import importlib.util
import pathlib

import pytest


@pytest.mark.slow
def test_core_bench_tiny_run_reports_every_measurement():
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "core_bench.py"
    spec = importlib.util.spec_from_file_location("core_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--tiny", "--repeats", "1"])
    assert set(report) == {"load_0", "load_3", "forward_64", "forward_1"}
    for row in report.values():
        assert set(row) >= {"ours", "peft"} and all(v > 0 for v in row.values())
