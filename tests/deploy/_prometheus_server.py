"""A real Prometheus server (Debian's `prometheus` binary) on a free loopback port with its own storage in a
temp folder, for the integration test: start, wait until ready, query over the HTTP API, stop. Every wait
is bounded in time."""
from __future__ import annotations

import math
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(self, binary: str, config: dict, workdir: Path):
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 30 s: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; the `data` of a successful answer, else an AssertionError with the error."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body.get("status") == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's result vector (or scalar as a one-element list)."""
        data = self.api("query", query=promql)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_until(self, promql: str, predicate, timeout: float = 30.0) -> list[dict]:
        """Poll `promql` until predicate(result) holds; the result, or AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            assert time.monotonic() < deadline, f"{promql}: still {result} after {timeout} s"
            time.sleep(0.25)

    def wait_for_scrapes(self, count: int, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped `count` more times from now."""
        def last_scrapes():
            return [t["lastScrape"] for t in self.api("targets", state="active")["activeTargets"]]
        seen = [last_scrapes()]
        deadline = time.monotonic() + timeout
        while len({tuple(s) for s in seen}) <= count:
            assert time.monotonic() < deadline, f"fewer than {count} scrapes in {timeout} s"
            time.sleep(0.2)
            seen.append(last_scrapes())


    def evaluated_rules(self, names: set[str], timeout: float = 30.0) -> list[dict]:
        """The rule manager's rules once every one of `names` is loaded and has been evaluated at least once."""
        deadline = time.monotonic() + timeout
        while True:
            rules = [rule for group in self.api("rules")["groups"] for rule in group["rules"]]
            if {r["name"] for r in rules} == names and all(
                    not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):
                return rules
            assert time.monotonic() < deadline, f"rules not all evaluated in {timeout} s: {rules}"
            time.sleep(0.25)


def has_number(result: list[dict]) -> bool:
    """True when some sample of the result is a number (not NaN): the query returned data."""
    return any(not math.isnan(float(sample["value"][1])) for sample in result)
