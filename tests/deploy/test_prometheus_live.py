"""Integration: the real service (uvicorn on loopback, the embedded SmolLM2) scraped by a real Prometheus
server started with the project's scrape config (target rewritten to the test server, 1 s interval) and
alerting rules. The service runs with a metrics key, which Prometheus sends as the shipped scrape config
says (`authorization.credentials_file`, a file beside the config), so a scrape without it would fail; a
request without the key gets 401. After traffic over several adapters (streaming and not, two device slots for three
adapters so evictions happen, refused requests), every PromQL expression of the Grafana dashboard, with
Grafana's variables substituted by real values, returns data, and every rule expression evaluates
without error in Prometheus's rule manager. A metric renamed in service/metrics.py breaks this test. It
also runs the Dockerfile's HEALTHCHECK command against the live server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lora_folders import save_random_lora
from _deploy_files import PROMETHEUS_CONFIG, REPO, alert_rules, dashboard_targets, load_dashboard, load_yaml, \
    require_tool
from _deploy_live_server import LiveServer
from _dockerfile import instructions
from _prometheus_server import PrometheusServer, free_port, has_number
from service.app import create_app
from service.model import load_model
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow

T = 120                                          # HTTP timeout: generous on 2 busy cores
ADAPTERS = ("sql", "chat", "poem")               # three adapters for two device slots: evictions
REFUSED = "parked"                               # registered, then deactivated: its requests get 409
PROMPTS = ("Once upon a time", "The capital of France is", "def fibonacci(n):")
# Grafana's built-in interval variables: windows long enough to cover the whole test's traffic.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "15s", "__range": "5m"}
METRICS_KEY = "test-metrics-key"


def _scrape_config(port: int, workdir) -> dict:
    """deploy/prometheus/prometheus.yml with its one target pointed at the test server, a 1 s interval and
    the rule file by absolute path; everything else (job name, metrics path, the key's file name) as shipped,
    the key written to that file beside the config Prometheus reads (as compose does)."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    (scrape,) = config["scrape_configs"]
    scrape["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    assert scrape["authorization"]["type"] == "Bearer"
    (workdir / scrape["authorization"]["credentials_file"]).write_text(METRICS_KEY)
    return config


def _complete(url: str, model: str, prompt: str, stream: bool) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
    if not stream:
        return httpx.post(f"{url}/v1/completions", json=body, timeout=T).status_code
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=T) as r:
        lines = list(r.iter_lines())
        assert r.status_code != 200 or "data: [DONE]" in lines
        return r.status_code


def _round(url: str, base_id: str, stream: bool) -> list[int]:
    """Each adapter beside a base-model request (two sequences per batch, one adapter in use at a time, so
    a third adapter always finds a device slot to evict), then one request to the deactivated adapter."""
    statuses = []
    with ThreadPoolExecutor(2) as pool:
        for i, adapter in enumerate(ADAPTERS):
            prompt = PROMPTS[i % len(PROMPTS)]
            statuses += pool.map(lambda model: _complete(url, model, prompt, stream), (adapter, base_id))
    statuses.append(_complete(url, REFUSED, PROMPTS[0], stream))
    return statuses


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The service after its traffic, and a Prometheus that has scraped all of it: (server, prometheus)."""
    binary = require_tool("prometheus", "prometheus")
    loaded = load_model(None)
    root = tmp_path_factory.mktemp("live")
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    folders = {name: save_random_lora(model, root / "src" / name, name, seed)
               for seed, name in enumerate(ADAPTERS + (REFUSED,), start=1)}
    settings = Settings(adapter_dir=str(root / "store"), dtype="float32", max_batch_size=4, max_seq_len=128,
                        max_device_adapters=2, metrics_key=METRICS_KEY)
    with LiveServer(create_app(settings, loaded)) as server, \
            PrometheusServer(binary, _scrape_config(server.port, root), root) as prometheus:
        assert httpx.get(f"{server.url}/metrics", timeout=T).status_code == 401
        prometheus.wait_until('up{job="adapter-serve"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        for name, folder in folders.items():
            files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
            r = httpx.post(f"{server.url}/admin/adapters", data={"name": name}, files=files, timeout=T)
            assert r.status_code == 201, r.text
        r = httpx.post(f"{server.url}/admin/adapters/{REFUSED}/deactivate", timeout=T)
        assert r.status_code == 200, r.text
        base_id = httpx.get(f"{server.url}/v1/models", timeout=T).json()["data"][0]["id"]
        statuses = []
        for stream in (False, True):    # two rounds some scrapes apart, so every series grows between scrapes
            statuses += _round(server.url, base_id, stream)
            prometheus.wait_for_scrapes(2)
        assert statuses.count(409) == 2 and statuses.count(200) == len(statuses) - 2, statuses
        prometheus.wait_until("sum(adapter_serve_requests_total)",
                              lambda r: bool(r) and float(r[0]["value"][1]) == len(statuses))
        prometheus.wait_for_scrapes(2)
        yield server, prometheus


def _substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable syntaxes ($name, ${name}, [[name]]) replaced by values; none may be left over."""
    def value(match):
        name = next(g for g in match.groups() if g)
        assert name in variables, f"unknown dashboard variable ${name} in {expr}"
        return variables[name]
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)
    assert "$" not in out, out
    return out


def _dashboard_variables(prometheus) -> dict[str, str]:
    """The dashboard's template variables resolved the way Grafana does: a label_values() query through the
    same data source, all values selected (a multi-value regex `(a|b|...)`)."""
    variables = dict(GRAFANA_INTERVALS)
    for variable in load_dashboard()["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"]).groups()
        values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert values, f"variable {variable['name']}: no values"
        variables[variable["name"]] = "(" + "|".join(re.escape(v) for v in values) + ")"
    return variables


def test_the_adapter_variable_lists_every_adapter_that_had_traffic(stack):
    _, prometheus = stack
    values = prometheus.api("label/adapter/values", **{"match[]": "adapter_serve_requests_total"})
    assert set(values) == set(ADAPTERS) | {REFUSED, "__base__"}


def test_every_dashboard_query_returns_data(stack):
    _, prometheus = stack
    variables = _dashboard_variables(prometheus)
    targets = dashboard_targets(load_dashboard())
    assert len(targets) >= 20
    empty = []
    for title, expr in targets:
        result = prometheus.query(_substitute(expr, variables))      # an invalid query raises here
        if not has_number(result):
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_the_scrape_saw_the_traffic_it_was_sent(stack):
    _, prometheus = stack
    by_outcome = {s["metric"]["outcome"]: float(s["value"][1])
                  for s in prometheus.query("sum by (outcome) (adapter_serve_requests_total)")}
    assert by_outcome == {"success": 12.0, "rejected": 2.0}
    evictions = prometheus.query('sum(adapter_serve_adapter_evictions_total{from_tier="device"})')
    assert float(evictions[0]["value"][1]) >= 1                     # three adapters, two device slots


def test_every_rule_evaluates_without_error(stack):
    _, prometheus = stack
    for rule in alert_rules():
        prometheus.query(rule["expr"])                              # raises with Prometheus's error
    rules = prometheus.evaluated_rules({rule.get("alert") or rule["record"] for rule in alert_rules()})
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_metric_the_rules_name_is_scraped(stack):
    _, prometheus = stack
    names = {n for rule in alert_rules() for n in re.findall(r"\badapter_serve_\w+", rule["expr"])}
    assert len(names) >= 8
    missing = [n for n in sorted(names) if not prometheus.query(f'count({{__name__="{n}"}})')]
    assert not missing, f"rules name metrics the service does not export: {missing}"


def test_the_dockerfile_health_check_passes_on_the_live_server_and_fails_on_a_closed_port(stack):
    server, _ = stack
    (health,) = [args for keyword, args in instructions(REPO / "Dockerfile") if keyword == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    command = [sys.executable, *argv[1:]]
    ok = subprocess.run(command, env={**os.environ, "ADAPTER_SERVE_PORT": str(server.port)}, timeout=30)
    closed = subprocess.run(command, env={**os.environ, "ADAPTER_SERVE_PORT": str(free_port())},
                            capture_output=True, timeout=30)
    assert ok.returncode == 0 and closed.returncode != 0
