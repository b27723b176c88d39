"""Metrics: per-adapter label values stay bounded however many adapters serve traffic."""
from prometheus_client import generate_latest

from service.metrics import BASE_LABEL, OTHER_LABEL, Metrics


def test_label_cardinality_is_bounded_with_200_adapters():
    m = Metrics(max_adapter_labels=20)
    for i in range(200):
        m.request_finished(f"adapter-{i}", "success", 5, [1.0, 1.1, 1.2], 0.9, 1.3)
    m.request_finished(None, "success", 5, [1.0], 0.9, 1.1)
    text = generate_latest(m.registry).decode()
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("adapter_serve_requests_total{")}
    assert len(labels) == 22                       # 20 named + "other" + the base model
    assert OTHER_LABEL in labels and BASE_LABEL in labels and "adapter-0" in labels and "adapter-150" not in labels
    other = [line for line in text.splitlines()
             if line.startswith(f'adapter_serve_requests_total{{adapter="{OTHER_LABEL}"')]
    assert other and float(other[0].split()[-1]) == 180.0
