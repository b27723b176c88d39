"""JSON Schemas for the two Prometheus Operator objects (monitoring.coreos.com/v1) that the Kubernetes
schemas cannot check, because they are custom resources. Written from the fields the operator's API
reference documents for PodMonitor and PrometheusRule, strict (unknown fields refused) at the levels we
use; nested objects we do not use (TLS, auth, relabelings) are only type-checked. This checks structure and
field names, not what the operator would do with them."""
from __future__ import annotations

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                   "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRING_MAP,
                   "matchExpressions": {"type": "array", "items": {
                       "type": "object", "required": ["key", "operator"],
                       "properties": {"key": {"type": "string"},
                                      "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                      "values": {"type": "array", "items": {"type": "string"}}},
                       "additionalProperties": False}}},
    "additionalProperties": False,
}
_POD_METRICS_ENDPOINT = {
    "type": "object",
    "properties": {
        "port": {"type": "string"}, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
        "targetPort": {"type": ["integer", "string"]}, "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]}, "params": {"type": "object"},
        "interval": {"type": "string", "pattern": DURATION}, "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
        "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
        "filterRunning": {"type": "boolean"}, "proxyUrl": {"type": "string"},
        "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
        "tlsConfig": {"type": "object"}, "basicAuth": {"type": "object"}, "authorization": {"type": "object"},
        "oauth2": {"type": "object"}, "bearerTokenSecret": {"type": "object"},
    },
    "additionalProperties": False,
}


def _resource(kind: str, spec: dict) -> dict:
    """The schema of a prometheus-operator resource of `kind` whose spec has the schema `spec`."""
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                       "metadata": _METADATA, "spec": spec},
        "additionalProperties": False,
    }


POD_MONITOR = _resource("PodMonitor", {
    "type": "object", "required": ["selector"],
    "properties": {
        "jobLabel": {"type": "string"}, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "properties": {
            "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False},
        "podMetricsEndpoints": {"type": "array", "items": _POD_METRICS_ENDPOINT},
        "sampleLimit": {"type": "integer", "minimum": 0}, "targetLimit": {"type": "integer", "minimum": 0},
        "labelLimit": {"type": "integer", "minimum": 0}, "attachMetadata": {"type": "object"},
    },
    "additionalProperties": False,
})

_RULE = {
    "type": "object", "required": ["expr"],
    "properties": {"record": {"type": "string"}, "alert": {"type": "string"},
                   "expr": {"type": ["string", "integer"]}, "for": {"type": "string", "pattern": DURATION},
                   "keep_firing_for": {"type": "string", "pattern": DURATION},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "additionalProperties": False,
}
PROMETHEUS_RULE = _resource("PrometheusRule", {
    "type": "object", "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1},
                       "interval": {"type": "string", "pattern": DURATION},
                       "query_offset": {"type": "string", "pattern": DURATION},
                       "limit": {"type": "integer"}, "partial_response_strategy": {"type": "string"},
                       "labels": _STRING_MAP, "rules": {"type": "array", "items": _RULE}},
        "additionalProperties": False}}},
    "additionalProperties": False,
})
