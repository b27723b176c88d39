"""Shared by tests/deploy: where the deployment files are, how to read them, and how a test asks for a real
tool (promtool, prometheus, docker-compose) that `make test` installs: missing, the test skips with the
reason, except under CI (the env var CI set), where a missing tool is a failure, so CI cannot pass by
skipping what it was meant to check."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "adapter-serving.json"
COMPOSE = REPO / "docker-compose.yml"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, package: str) -> str:
    """The tool's path; skip (or fail under CI) when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    reason = (f"{name} not found: install Debian's `{package}` package "
              f"(`make test` does so when run as root with apt-get)")
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so a missing tool is a failure")
    pytest.skip(reason)


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as fh:
        return json.load(fh)


def dashboard_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, rows' nested panels included."""
    out = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel["title"], target["expr"]))
    return out


def alert_rules() -> list[dict]:
    """Every rule (alerting and recording) of deploy/prometheus/alerts.yml."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
