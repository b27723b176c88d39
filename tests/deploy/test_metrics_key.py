"""The metrics key travels with the deployment: Prometheus's shipped scrape config sends a Bearer key read
from a file beside it (which exists, so `promtool check config` passes, and is empty: no key), compose hands
one variable, `ADAPTER_SERVE_METRICS_KEY`, both to the service and to Prometheus's entrypoint, which writes
it to that file, and in Kubernetes the Deployment and the PodMonitor read the same key of the same secret.
The live check (a real Prometheus scraping a keyed /metrics) is in test_prometheus_live.py."""
from __future__ import annotations

import yaml

from _deploy_files import COMPOSE, K8S, PROMETHEUS_CONFIG, load_yaml, load_yaml_docs

VARIABLE = "ADAPTER_SERVE_METRICS_KEY"


def test_the_scrape_config_sends_the_key_from_a_file_beside_it():
    (scrape,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    auth = scrape["authorization"]
    assert auth["type"] == "Bearer" and "/" not in auth["credentials_file"]
    key_file = PROMETHEUS_CONFIG.parent / auth["credentials_file"]
    assert key_file.is_file() and key_file.read_text() == ""          # shipped empty: no key


def test_compose_gives_the_service_and_prometheus_the_same_key():
    services = load_yaml(COMPOSE)["services"]
    assert services["adapter-serve"]["environment"][VARIABLE] == f"${{{VARIABLE}:-}}"
    prometheus = services["prometheus"]
    (name,) = [k for k, v in prometheus["environment"].items() if v == f"${{{VARIABLE}:-}}"]
    shell, flag, script, argv0 = prometheus["entrypoint"]
    (scrape,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    config_dir = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    key_path = config_dir.rsplit("/", 1)[0] + "/" + scrape["authorization"]["credentials_file"]
    assert (shell, flag) == ("/bin/sh", "-c")
    assert f'"$${name}" > {key_path}' in script and script.endswith('exec /bin/prometheus "$$@"')


def test_kubernetes_reads_the_key_from_one_secret_for_the_pods_and_the_pod_monitor():
    (secret,) = load_yaml_docs(K8S / "base" / "secret.yaml")
    (monitor,) = load_yaml_docs(K8S / "monitoring" / "podmonitor.yaml")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ref = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for variant in ("cpu", "gpu"):
        (deployment,) = [d for d in load_yaml_docs(K8S / variant / "deployment.yaml") if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (env,) = [e for e in container["env"] if e["name"] == VARIABLE]
        assert env["valueFrom"]["secretKeyRef"] == {"name": ref["name"], "key": ref["key"]}
    assert yaml.safe_dump(secret)                   # still a plain, dumpable manifest
