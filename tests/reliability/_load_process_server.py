"""`ServerProcess`: `python -m service` in a child process on a free loopback port, configured by
`ADAPTER_SERVE_*` variables (and command-line flags), as an operator would run it; its output goes to a log
file for failure reports."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _load_live_server import free_port


def service_env(**settings) -> dict:
    """This process's environment without its `ADAPTER_SERVE_*` variables, plus `settings` as such variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SERVE_")}
    env.update({f"ADAPTER_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class ServerProcess:
    def __init__(self, workdir: Path, args=(), **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        env = service_env(**{"port": self.port, "host": "127.0.0.1", "adapter_dir": workdir / "store", **settings})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service", *args], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> "ServerProcess":
        try:
            return self.wait_ready()
        except BaseException:              # not ready: the process must not outlive the test
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
