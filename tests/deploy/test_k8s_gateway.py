"""deploy/k8s/gateway: the Gateway API Inference Extension example. The InferencePool and HTTPRoute validate
against their CRDs' documented structure (the core objects are validated with the other manifests by
test_k8s_manifests.py), and the objects agree with each other and with the service: the pool selects the
adapter-serve pods on their HTTP port and names the picker's Service and port, the picker watches that pool
and scrapes `/metrics/gateway`, whose families are the picker's default metric names (the manifest sets no
metric flag; tests/service/api/test_gateway_metrics.py reads them live), the kustomization opens that route on the
Deployment it includes, and the HTTPRoute sends its traffic to the pool."""
from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from _crd_schemas import HTTP_ROUTE, INFERENCE_POOL
from _deploy_files import K8S, load_yaml, load_yaml_docs
from service.metrics import Metrics
from service.settings import Settings

GATEWAY = K8S / "gateway"
OBJECTS = {doc["kind"]: doc for path in sorted(GATEWAY.glob("*.yaml")) if path.name != "kustomization.yaml"
           for doc in load_yaml_docs(path)}
SERVING = {doc["kind"]: doc for folder in ("cpu", "base") for path in sorted((K8S / folder).glob("*.yaml"))
           if path.name != "kustomization.yaml" for doc in load_yaml_docs(path)}
# The picker's metric flags and their defaults (vLLM's names), which the service exports: the manifest sets
# none of them (newer pickers refuse them in favour of their config file).
PICKER_DEFAULTS = {"--total-queued-requests-metric": "vllm:num_requests_waiting",
                   "--total-running-requests-metric": "vllm:num_requests_running",
                   "--kv-cache-usage-percentage-metric": "vllm:kv_cache_usage_perc",
                   "--lora-info-metric": "vllm:lora_requests_info"}


def _args(container: dict) -> dict[str, str]:
    args = container["args"]
    return dict(zip(args[::2], args[1::2]))


def _picker() -> dict:
    (container,) = OBJECTS["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_pool_and_route_match_their_crds():
    jsonschema.validate(OBJECTS["InferencePool"], INFERENCE_POOL)
    jsonschema.validate(OBJECTS["HTTPRoute"], HTTP_ROUTE)


@pytest.mark.parametrize("break_it", [
    lambda p: p["spec"].__setitem__("targetPortNumber", 8000),                   # the v1alpha2 field, gone in v1
    lambda p: p["spec"]["targetPorts"].append({"number": 8001}),                 # at most one port
    lambda p: p["spec"]["endpointPickerRef"].pop("port"),                        # required for a Service
    lambda p: p["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open"),
], ids=["old-field", "two-ports", "no-picker-port", "bad-failure-mode"])
def test_the_pool_schema_refuses_broken_pools(break_it):
    pool = copy.deepcopy(OBJECTS["InferencePool"])
    break_it(pool)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, INFERENCE_POOL)


def test_the_pool_selects_the_serving_pods_and_names_the_picker():
    pool = OBJECTS["InferencePool"]["spec"]
    deployment = SERVING["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [ports["http"]]
    service = OBJECTS["Service"]
    ref = pool["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"] and ref.get("kind", "Service") == "Service"
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    picker = OBJECTS["Deployment"]
    assert service["spec"]["selector"].items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    assert grpc["targetPort"] in {p["name"] for p in _picker()["ports"]}


def test_the_picker_watches_the_pool_and_scrapes_the_gateway_metrics():
    args = _args(_picker())
    assert args["--pool-name"] == OBJECTS["InferencePool"]["metadata"]["name"]
    assert args["--model-server-metrics-path"] == "/metrics/gateway"
    assert not set(PICKER_DEFAULTS) & set(_picker()["args"])
    served = {f.name for f in text_string_to_metric_families(generate_latest(Metrics().gateway_registry).decode())}
    assert served == set(PICKER_DEFAULTS.values())
    pod = OBJECTS["Deployment"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account == OBJECTS["ServiceAccount"]["metadata"]["name"]
    for binding, role in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        assert {s["name"] for s in OBJECTS[binding]["subjects"]} == {account}
        assert OBJECTS[binding]["roleRef"]["name"] == OBJECTS[role]["metadata"]["name"]
    granted = {(group, resource) for rule in OBJECTS["Role"]["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] if "watch" in rule["verbs"]}
    pool_group = OBJECTS["InferencePool"]["apiVersion"].split("/")[0]
    assert {(pool_group, "inferencepools"), ("", "pods")} <= granted


def test_the_kustomization_serves_the_cpu_variant_with_the_gateway_route_open():
    spec = load_yaml(GATEWAY / "kustomization.yaml")
    assert "../cpu" in spec["resources"]
    (patch,) = spec["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": SERVING["Deployment"]["metadata"]["name"]}
    (op,) = yaml.safe_load(patch["patch"])
    assert op["op"] == "add" and op["path"] == "/spec/template/spec/containers/0/env/-"
    name, value = op["value"]["name"], op["value"]["value"]
    assert name == "ADAPTER_SERVE_GATEWAY_METRICS_OPEN" and name[len("ADAPTER_SERVE_"):].lower() in Settings.model_fields
    assert Settings(gateway_metrics_open=value).gateway_metrics_open is True


def test_the_route_sends_traffic_to_the_pool():
    (rule,) = OBJECTS["HTTPRoute"]["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    pool = OBJECTS["InferencePool"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        pool["apiVersion"].split("/")[0], "InferencePool", pool["metadata"]["name"])
