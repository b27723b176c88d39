#!/bin/sh
# Print deploy/prometheus/alerts.yml wrapped in a Prometheus Operator PrometheusRule, so the cluster and the
# compose stack evaluate the same rules from one file:
#   deploy/k8s/monitoring/prometheusrule.sh | kubectl apply -f -
set -eu
rules="$(dirname "$0")/../../prometheus/alerts.yml"
cat <<HEAD
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: adapter-serve
  labels:
    app.kubernetes.io/name: adapter-serve
spec:
HEAD
sed 's/^/  /' "$rules"
