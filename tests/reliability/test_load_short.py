"""`bench/load_test.py --short` as a user runs it: it starts a real server process on the default model,
uploads its adapters, takes reference outputs, drives concurrent streaming and non-streaming clients over
Zipf-drawn adapters while an admin loop churns other adapters, and must pass every criterion: no 5xx, every
greedy answer equal to its reference, 429 with Retry-After once the queue is full, a bounded queue, RSS after
the run within 10% of RSS after warm-up, and exit 0 on SIGTERM."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"


def test_short_load_run_meets_every_criterion(tmp_path):
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--short", "--json", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(out.read_text())
    assert summary["passed"] and all(summary["checks"].values()), summary["checks"]
    assert summary["statuses"].get("200", 0) >= 10
    assert not {s for s in summary["statuses"] if s.startswith("5") or s == "transport error"}
    assert summary["mismatch_count"] == 0 and summary["references"] == 14
    assert summary["distinct_reference_outputs"] > 2          # the adapters really change the outputs
    assert summary["statuses"].get("429", 0) == summary["throttled_with_retry_after"] > 0
    assert summary["max_waiting_seen"] <= 2
    assert summary["rss_after_mib"] <= 1.10 * summary["rss_warm_mib"]
    assert summary["admin"].get("upload 201", 0) >= 1 and summary["admin"].get("delete 200", 0) >= 1
    assert summary["server_exit_status"] == 0
