"""The README's Deployment section names what exists: every path it mentions under deploy/, the image tags
the Kubernetes Deployments run, the Dockerfile's build argument, and the `make install` step the image runs."""
from __future__ import annotations

import re

from _deploy_files import K8S, REPO, load_yaml_docs
from _dockerfile import env

README = (REPO / "README.md").read_text()
SECTION = README[README.index("\n## Deployment\n"):]
SECTION = SECTION[:SECTION.index("\n## ", 1)]


def test_every_deploy_path_in_the_section_exists():
    paths = set(re.findall(r"\bdeploy/[\w./-]*\w", SECTION))
    assert {"deploy/k8s/cpu", "deploy/k8s/gpu", "deploy/k8s/monitoring", "deploy/grafana/",
            "deploy/prometheus/"} <= paths | {p + "/" for p in paths}
    for path in paths:
        assert (REPO / path).exists(), path


def test_the_commands_match_the_image_and_the_manifests():
    assert "make install" in SECTION
    assert "--build-arg TORCH_INDEX=" in SECTION and "TORCH_INDEX" in env(REPO / "Dockerfile")
    for variant in ("cpu", "gpu"):
        assert f"kubectl apply -k deploy/k8s/{variant}" in SECTION
        (deployment,) = load_yaml_docs(K8S / variant / "deployment.yaml")
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        assert f"docker build -t {image} " in SECTION, image
    assert "deploy/k8s/monitoring/prometheusrule.sh | kubectl apply -f -" in SECTION
