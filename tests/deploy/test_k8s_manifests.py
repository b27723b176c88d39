"""deploy/k8s: every manifest validates against the Kubernetes OpenAPI schemas with the real validator
(`kubernetes-validate`, strict: unknown fields fail), the Prometheus Operator objects against the CRDs'
documented structure, and the objects agree with each other, with the image and with the service's
settings (labels, ports, probes, the store's volume, the secret's keys, the scrape job's name)."""
from __future__ import annotations

import copy
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from _crd_schemas import POD_MONITOR, PROMETHEUS_RULE
from _deploy_files import ALERTS, K8S, PROMETHEUS_CONFIG, REPO, alert_rules, load_yaml, load_yaml_docs
from service.settings import Settings

K8S_VERSION = kubernetes_validate.latest_version()
# custom resources, checked against tests/deploy/_crd_schemas.py instead
CRD_GROUPS = ("monitoring.coreos.com/", "inference.networking.k8s.io/", "gateway.networking.k8s.io/")
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
GATEWAY_KINDS = ("InferencePool", "HTTPRoute", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
                 "ClusterRole", "ClusterRoleBinding")


def _objects() -> dict[str, dict]:
    """'<folder>/<Kind>' -> object, for every manifest."""
    out = {}
    for path in MANIFESTS:
        for doc in load_yaml_docs(path):
            out[f"{path.parent.name}/{doc['kind']}"] = doc
    return out


OBJECTS = _objects()


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_the_manifests_cover_the_deployment():
    assert set(OBJECTS) == {"cpu/Deployment", "gpu/Deployment", "base/Service", "base/PersistentVolumeClaim",
                            "base/Secret", "base/HorizontalPodAutoscaler", "monitoring/PodMonitor",
                            *(f"gateway/{kind}" for kind in GATEWAY_KINDS)}


@pytest.mark.parametrize("path", [p for p in MANIFESTS if not any(
    d["apiVersion"].startswith(CRD_GROUPS) for d in load_yaml_docs(p))], ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schemas(path):
    for doc in load_yaml_docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)     # raises ValidationError


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"].__setitem__("replica", 2),                                    # misspelt field (strict)
    lambda d: _container(d)["ports"][0].__setitem__("containerPort", "eight thousand"),  # wrong type
    lambda d: _container(d).pop("name"),                                             # required field
], ids=["unknown-field", "wrong-type", "missing-required"])
def test_the_validator_refuses_a_broken_deployment(break_it):
    broken = copy.deepcopy(OBJECTS["cpu/Deployment"])
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_every_kustomization_lists_existing_files_and_no_manifest_is_left_out():
    listed = set()
    for kustomization in KUSTOMIZATIONS:
        spec = load_yaml(kustomization)
        assert spec["kind"] == "Kustomization"
        for resource in spec["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{kustomization}: {resource} is no kustomization"
            listed.add(target)
    assert set(MANIFESTS) <= listed, f"not in any kustomization: {set(MANIFESTS) - listed}"
    for variant in ("cpu", "gpu"):
        resources = load_yaml(K8S / variant / "kustomization.yaml")["resources"]
        assert sorted(resources) == ["../base", "deployment.yaml"]


def test_the_gpu_deployment_is_the_cpu_one_plus_the_gpu_parts():
    cpu, gpu = copy.deepcopy(OBJECTS["cpu/Deployment"]), copy.deepcopy(OBJECTS["gpu/Deployment"])
    assert _container(gpu)["resources"]["limits"].pop("nvidia.com/gpu") == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        gpu["spec"]["template"]["spec"].pop("tolerations")
    assert (_env(_container(cpu))["ADAPTER_SERVE_DEVICE"]["value"],
            _env(_container(gpu))["ADAPTER_SERVE_DEVICE"]["value"]) == ("cpu", "cuda")
    assert (_container(cpu)["image"], _container(gpu)["image"]) == ("adapter-serving:cpu", "adapter-serving:cuda")
    for deployment in (cpu, gpu):
        container = _container(deployment)
        container.pop("image")
        container["env"] = [e for e in container["env"] if e["name"] != "ADAPTER_SERVE_DEVICE"]
    assert cpu == gpu


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_resources_user_and_store(variant):
    deployment = OBJECTS[f"{variant}/Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _env(container)
    assert ports["http"] == int(env["ADAPTER_SERVE_PORT"]["value"])
    assert env["ADAPTER_SERVE_HOST"]["value"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # SIGTERM: the listener closes after the delay, requests get until the timeout; the kubelet must wait longer.
    assert pod["terminationGracePeriodSeconds"] > float(env["ADAPTER_SERVE_SHUTDOWN_DELAY"]["value"]) + float(
        env["ADAPTER_SERVE_SHUTDOWN_TIMEOUT"]["value"])
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    # The image's user (Dockerfile: useradd --uid 10001) and a group that may write the store's volume.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    assert "--uid 10001" in (REPO / "Dockerfile").read_text()
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == env["ADAPTER_SERVE_ADAPTER_DIR"]["value"]
    assert volume["persistentVolumeClaim"]["claimName"] == OBJECTS["base/PersistentVolumeClaim"]["metadata"]["name"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_environment_names_are_settings_of_the_service(variant):
    fields = set(Settings.model_fields)
    for name in _env(_container(OBJECTS[f"{variant}/Deployment"])):
        assert name.startswith("ADAPTER_SERVE_") and name[len("ADAPTER_SERVE_"):].lower() in fields, name


def test_the_service_secret_and_autoscaler_point_at_the_deployment():
    deployment = OBJECTS["cpu/Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = OBJECTS["base/Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in _container(deployment)["ports"]}
    secret = OBJECTS["base/Secret"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in _container(deployment)["env"] if "valueFrom" in e]
    assert {r["name"] for r in refs} == {secret["metadata"]["name"]}
    assert {r["key"] for r in refs} == set(secret["stringData"])
    hpa = OBJECTS["base/HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    # The store is shared by all replicas the autoscaler may start, on any node.
    if hpa["spec"]["maxReplicas"] > 1:
        assert OBJECTS["base/PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_pod_monitor_matches_its_crd_and_scrapes_the_job_the_rules_name():
    monitor = OBJECTS["monitoring/PodMonitor"]
    jsonschema.validate(monitor, POD_MONITOR)
    deployment = OBJECTS["cpu/Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in _container(deployment)["ports"]} and endpoint["path"] == "/metrics"
    job = pod_labels[monitor["spec"]["jobLabel"]]
    (scrape,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    assert job == scrape["job_name"]
    assert any(f'job="{job}"' in rule["expr"] for rule in alert_rules())


def test_the_crd_schema_refuses_misspelt_fields():
    monitor = copy.deepcopy(OBJECTS["monitoring/PodMonitor"])
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, POD_MONITOR)


def test_the_prometheusrule_script_wraps_the_alerting_rules_unchanged():
    out = subprocess.run(["sh", str(K8S / "monitoring" / "prometheusrule.sh")], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    (rule,) = [doc for doc in yaml.safe_load_all(out) if doc]
    jsonschema.validate(rule, PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]
