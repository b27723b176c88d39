"""JSON Schemas for the custom resources the Kubernetes schemas cannot check: the two Prometheus Operator
objects (monitoring.coreos.com/v1), the Gateway API Inference Extension's InferencePool and the Gateway
API's HTTPRoute. Each is written from the fields its API reference documents (for the extension, its
Go types), strict (unknown fields refused) at the levels we use; nested objects we do not use (TLS, auth,
relabelings, filters) are only type-checked. This checks structure and field names, not what the operator
or the gateway would do with them."""
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

# Gateway API Inference Extension (inference.networking.k8s.io/v1, api/v1/inferencepool_types.go) and the
# Gateway API's HTTPRoute (gateway.networking.k8s.io/v1), at the fields their references document.
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT_NUMBER = {"type": "integer", "minimum": 1, "maximum": 65535}
_GROUP = {"type": "string", "maxLength": 253, "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}


def _object(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
        "additionalProperties": False,
    }


INFERENCE_POOL = _object("inference.networking.k8s.io/v1", "InferencePool", {
    "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"],
    "properties": {
        "selector": {"type": "object", "required": ["matchLabels"],
                     "properties": {"matchLabels": {"type": "object", "minProperties": 1, "maxProperties": 64,
                                                    "additionalProperties": _LABEL_VALUE}},
                     "additionalProperties": False},
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["number"], "properties": {"number": _PORT_NUMBER},
            "additionalProperties": False}},
        "endpointPickerRef": {
            "type": "object", "required": ["name"],
            "properties": {"group": _GROUP, "kind": _KIND, "name": _NAME,
                           "port": {"type": "object", "required": ["number"], "properties": {"number": _PORT_NUMBER},
                                    "additionalProperties": False},
                           "failureMode": {"enum": ["FailOpen", "FailClose"]}},
            # the CRD's rule: "port is required when kind is 'Service'" (the default kind)
            "if": {"not": {"required": ["kind"]}}, "then": {"required": ["port"]},
            "else": {"if": {"properties": {"kind": {"const": "Service"}}}, "then": {"required": ["port"]}},
            "additionalProperties": False},
    },
    "additionalProperties": False,
})

_PARENT_REF = {"type": "object", "required": ["name"],
               "properties": {"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": {"type": "string"},
                              "sectionName": {"type": "string"}, "port": _PORT_NUMBER},
               "additionalProperties": False}
_BACKEND_REF = {"type": "object", "required": ["name"],
                "properties": {"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": {"type": "string"},
                               "port": _PORT_NUMBER, "weight": {"type": "integer", "minimum": 0},
                               "filters": {"type": "array"}},
                "additionalProperties": False}
_MATCH = {"type": "object", "properties": {
    "path": {"type": "object", "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                              "value": {"type": "string", "pattern": "^/"}},
             "additionalProperties": False},
    "headers": {"type": "array"}, "queryParams": {"type": "array"}, "method": {"type": "string"}},
    "additionalProperties": False}
HTTP_ROUTE = _object("gateway.networking.k8s.io/v1", "HTTPRoute", {
    "type": "object",
    "properties": {
        "parentRefs": {"type": "array", "maxItems": 32, "items": _PARENT_REF},
        "hostnames": {"type": "array", "items": {"type": "string"}},
        "rules": {"type": "array", "maxItems": 16, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "matches": {"type": "array", "maxItems": 64, "items": _MATCH},
                           "filters": {"type": "array"}, "backendRefs": {"type": "array", "items": _BACKEND_REF},
                           "timeouts": {"type": "object",
                                        "properties": {"request": {"type": "string", "pattern": DURATION},
                                                       "backendRequest": {"type": "string", "pattern": DURATION}},
                                        "additionalProperties": False},
                           "retry": {"type": "object"}, "sessionPersistence": {"type": "object"}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})
