"""Graceful shutdown of a real server process (`python -m service`, a small random Llama from a model folder).

SIGTERM while requests run: `/ready` answers 503 while the listener still accepts (during `SHUTDOWN_DELAY`),
then new connections are refused, the running requests (two streaming, one not) finish in full, and the
process exits 0. With a short `SHUTDOWN_TIMEOUT`, requests still running at the deadline end properly with
finish reason "cancelled" (streams still close with `[DONE]`) and the process exits 0 soon after."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from _load_model_folder import write_tiny_model
from _load_process_server import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("shutdown") / "tiny")


class Client(threading.Thread):
    """One completion request; records its chunks (streaming) or body, and when it ended."""

    def __init__(self, url: str, stream: bool, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.stream, self.max_tokens = url, stream, max_tokens
        self.first_chunk = threading.Event()
        self.chunks: list[dict] = []
        self.done_marker = False
        self.body: dict | None = None
        self.status: int | None = None
        self.ended_at: float | None = None
        self.error: str | None = None

    def run(self):
        try:
            self._request()
        except Exception as exc:  # reported by the test's assertions, not lost in a thread
            self.error = f"{type(exc).__name__}: {exc}"
        self.ended_at = time.monotonic()

    def _request(self):
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": self.max_tokens, "temperature": 0,
                "stream": self.stream}
        with httpx.Client(timeout=120) as client:
            if self.stream:
                with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            self.done_marker = True
                        elif line.startswith("data: "):
                            self.chunks.append(json.loads(line[6:]))
                            self.first_chunk.set()
            else:
                r = client.post(f"{self.url}/v1/completions", json=body)
                self.status, self.body = r.status_code, r.json()

    @property
    def tokens_and_reason(self) -> tuple[int, str]:
        if self.stream:
            return len(self.chunks) - 1, self.chunks[-1]["choices"][0]["finish_reason"]
        return self.body["usage"]["completion_tokens"], self.body["choices"][0]["finish_reason"]


def running(server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("adapter_serve_requests_running "):
            return float(line.split()[1])
    return 0.0


def start_clients(server, max_tokens: int) -> list[Client]:
    clients = [Client(server.url, stream, max_tokens) for stream in (True, True, False)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 60
    while running(server) < len(clients):       # all three are in the batch
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.02)
    return clients


def refused(url: str, signalled: float, delay: float) -> bool:
    """True once a new connection is refused. A connection made in the instant the listener closes is dropped
    unanswered (uvicorn closes the connections that have no request yet): allowed then, never before the delay."""
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return True
    except httpx.RemoteProtocolError:
        assert time.monotonic() - signalled >= delay * 0.9, "a connection was dropped while the listener was open"
    return False


def test_sigterm_turns_unready_first_then_drains_and_exits_0(model_folder, tmp_path):
    delay = 3.0           # room for the /ready check on a loaded machine; the listener must still be open then
    # long enough to outlast the delay on a fast CPU: 1,200 tokens ended ~1 s after the listener closed on the Zen 4
    tokens = 3000
    with ServerProcess(tmp_path, model=model_folder, dtype="float32", shutdown_delay=delay,
                       shutdown_timeout=60, max_tokens_limit=tokens, max_seq_len=4096) as server:
        clients = start_clients(server, max_tokens=tokens)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == 503
        assert time.monotonic() - signalled < delay, "the check above must run while the listener is open"
        while not refused(server.url, signalled, delay):
            assert time.monotonic() - signalled < 30, server.output()
            time.sleep(0.05)
        closed = time.monotonic()
        assert closed - signalled >= delay * 0.9
        assert all(c.is_alive() for c in clients), "the requests must still be running when the listener closes"
        for client in clients:
            client.join(120)
        assert server.process.wait(60) == 0, server.output()
    for client in clients:
        assert client.error is None and client.status == 200, (client.error, server.output())
        assert client.tokens_and_reason == (tokens, "length")
        assert client.ended_at > closed
    assert all(c.done_marker for c in clients if c.stream)


def test_requests_past_the_deadline_end_cancelled_and_the_process_exits_0(model_folder, tmp_path):
    timeout = 1.5
    with ServerProcess(tmp_path, model=model_folder, dtype="float32", shutdown_timeout=timeout,
                       max_tokens_limit=4000, max_seq_len=4096) as server:
        clients = start_clients(server, max_tokens=4000)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for client in clients:
            client.join(60)
        assert server.process.wait(30) == 0, server.output()
        exited = time.monotonic()
    assert exited - signalled < timeout + 5, "exit soon after the deadline"
    for client in clients:
        assert client.error is None, (client.error, server.output())
        tokens, reason = client.tokens_and_reason
        assert client.status == 200 and reason == "cancelled" and 0 < tokens < 4000
        assert client.ended_at - signalled >= timeout * 0.9
    assert all(c.done_marker for c in clients if c.stream)
