"""`ServerProcess`: `python -m service` in a child process on a free loopback port, configured by
`ADAPTER_SERVE_*` variables, as an operator would run it; its output goes to a log file for failure reports."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _load_live_server import free_port


class ServerProcess:
    def __init__(self, workdir: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        env = {**os.environ, "ADAPTER_SERVE_PORT": str(self.port), "ADAPTER_SERVE_HOST": "127.0.0.1",
               "ADAPTER_SERVE_ADAPTER_DIR": str(workdir / "store")}
        env.update({f"ADAPTER_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=log,
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
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
