"""docker-compose.yml and the Grafana provisioning it mounts, without a Docker engine: the file passes a
real Compose validator (Debian's `docker-compose`, whose `config` needs no engine; and `docker compose`
too where that plugin is installed), every file it builds from or mounts exists, and the three services
agree: Prometheus scrapes the service's port and loads the rules it mounts, Grafana finds the data source
and the dashboard where they are mounted, and the dashboard only names metrics the service exports."""
from __future__ import annotations

import re
import shutil
import subprocess

import yaml
from prometheus_client.metrics import MetricWrapperBase

from _deploy_files import (COMPOSE, DASHBOARD, DEPLOY, PROMETHEUS_CONFIG, REPO, alert_rules, dashboard_targets,
                           load_dashboard, load_yaml, require_tool)
from _dockerfile import env as dockerfile_env
from service.metrics import Metrics

SPEC = load_yaml(COMPOSE)
SERVICES = SPEC["services"]


def _binds(service: str) -> dict[str, str]:
    """Container path -> repo path of the service's bind mounts (named volumes left out)."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(("./", "/")):
            out[target] = source
    return out


def _compose_v1_input() -> str:
    """The file as Compose v1 reads it: v1 predates the version-less Compose Specification and its `name`
    key, so it gets a `version` of the same schema instead; every service is checked as written."""
    spec = dict(SPEC)
    spec.pop("name")
    return yaml.safe_dump({"version": "3.9", **spec})


def test_a_compose_validator_accepts_the_file():
    docker_compose = require_tool("docker-compose", "docker-compose")
    out = subprocess.run([docker_compose, "-f", "-", "config", "-q"], input=_compose_v1_input(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30) \
        if shutil.which("docker") else None
    if plugin is not None and plugin.returncode == 0:              # the v2 plugin, where installed
        out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def test_the_validator_refuses_a_misspelt_key():
    docker_compose = require_tool("docker-compose", "docker-compose")
    broken = _compose_v1_input().replace("restart: unless-stopped", "restrat: unless-stopped", 1)
    out = subprocess.run([docker_compose, "-f", "-", "config", "-q"], input=broken, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "restrat" in out.stdout + out.stderr


def test_every_file_the_stack_builds_from_or_mounts_exists():
    build = SERVICES["adapter-serve"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    args = set(dockerfile_env(REPO / build["dockerfile"]))
    assert set(build.get("args", {})) <= args, "build args the Dockerfile does not declare"
    named = set(SPEC.get("volumes", {}))
    for service, spec in SERVICES.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./", "/")):
                assert (REPO / source).exists(), f"{service}: {source} does not exist"
            else:
                assert source in named, f"{service}: volume {source} is not declared"


def test_prometheus_scrapes_the_service_and_loads_the_mounted_rules():
    binds = _binds("prometheus")
    config_path = next(t for t, s in binds.items() if (REPO / s).resolve() == PROMETHEUS_CONFIG)
    assert f"--config.file={config_path}" in SERVICES["prometheus"]["command"]
    config = load_yaml(PROMETHEUS_CONFIG)
    container_dir = config_path.rsplit("/", 1)[0]
    for rule_file in config["rule_files"]:
        mounted = binds[f"{container_dir}/{rule_file}"]
        assert (REPO / mounted).resolve() == (PROMETHEUS_CONFIG.parent / rule_file).resolve()
    (scrape,) = config["scrape_configs"]
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    port_of_image = dockerfile_env(REPO / "Dockerfile")["ADAPTER_SERVE_PORT"]
    assert host in SERVICES and port == port_of_image
    assert f"{port}:{port}" in SERVICES[host]["ports"] and scrape["metrics_path"] == "/metrics"


def test_grafana_finds_the_data_source_and_the_dashboard():
    binds = _binds("grafana")
    provisioning = REPO / binds["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in SERVICES and f"{port}:{port}" in SERVICES[host]["ports"] and SERVICES[host]["image"].startswith(
        "prom/prometheus")
    (provider,) = load_yaml(provisioning / "dashboards" / "adapter-serving.yml")["providers"]
    dashboards_dir = REPO / binds[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    dashboard = load_dashboard()
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"] if "datasource" in v}
    assert uids == {datasource["uid"]}


SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def _exported_names() -> set[str]:
    """Every sample name the service's collectors export (counters' _total, histograms' three series)."""
    names = set()
    for collector in vars(Metrics()).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def test_the_dashboard_and_rules_name_only_exported_metrics_and_cover_the_issue_list():
    exported = _exported_names()
    queries = [expr for _, expr in dashboard_targets(load_dashboard())]
    rules = [rule["expr"] for rule in alert_rules()]
    for expr in queries + rules:
        for name in re.findall(r"\badapter_serve_\w+", expr):
            assert name in exported, f"{name} is not a metric of service/metrics.py"
    used = " ".join(queries)
    for topic in ("requests_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                  "generated_tokens_total", "requests_running", "requests_waiting", "batch_size",
                  "kv_cache_usage_ratio", "adapter_serve_adapters", "adapter_load_seconds",
                  "adapter_evictions_total", 'outcome!="success"'):
        assert topic in used, f"the dashboard shows nothing for {topic}"
    assert DEPLOY in DASHBOARD.parents
