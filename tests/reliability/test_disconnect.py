"""A client that goes away frees its batch slot within one engine step, over real HTTP through uvicorn.

Each case opens a request on a live server (a small random Llama from a real model folder), waits until the
engine holds it, drops the connection, and checks with a `StepProbe` that the first engine step to begin after
the server saw the disconnect (the server's `cancel`) is the one that frees the request: it is no longer
running or waiting after that step, its KV-cache slot is back, and it is counted as "cancelled" in the metrics.
Cases: streaming before any byte of the answer is read, streaming mid-stream, non-streaming (OpenAI and TGI
routes), and a request still waiting in the queue. A request beside the dropped one keeps running and ends
normally."""
from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from _load_model_folder import write_tiny_model
from _load_step_probe import StepProbe
from _load_live_server import LiveServer
from service.app import create_app
from service.metrics import BASE_LABEL
from service.settings import Settings

pytestmark = pytest.mark.slow

LONG = 3000                        # tokens: far more than any case waits for, so nothing ends by itself


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("disconnect")
    folder = write_tiny_model(root / "tiny")
    settings = Settings(model=str(folder), adapter_dir=str(root / "store"), dtype="float32", max_batch_size=2,
                        max_seq_len=LONG + 64, max_tokens_limit=LONG)
    app = create_app(settings)
    with LiveServer(app) as live:
        live.engine = app.state.serving.engine
        live.metrics = app.state.serving.metrics
        live.probe = StepProbe(live.engine)
        yield live


def raw_request(server, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return the socket without reading anything."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def cancelled_count(server) -> float:
    return server.metrics.registry.get_sample_value(
        "adapter_serve_requests_total", {"adapter": BASE_LABEL, "outcome": "cancelled"}) or 0.0


def assert_freed_within_one_step(server, request_id: str) -> None:
    freed = server.probe.step_freed(request_id)
    asked = server.probe.cancel_asked[request_id]
    assert freed <= asked + 1, f"cancel asked after step {asked}, request still held until step {freed}"


def completion(stream: bool, max_tokens: int = LONG) -> dict:
    return {"model": "tiny", "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


CASES = {
    "stream, nothing read": ("/v1/completions", completion(True)),
    "chat stream, nothing read": ("/v1/chat/completions",
                                  {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                   "max_tokens": LONG, "stream": True}),
    "non-streaming completion": ("/v1/completions", completion(False)),
    "non-streaming TGI generate": ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": LONG}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dropped_connection_frees_its_slot_at_the_next_step(server, case):
    path, body = CASES[case]
    before, cancelled = server.probe.held(), cancelled_count(server)
    sock = raw_request(server, path, body)
    request_id = server.probe.new_request(before)
    sock.close()
    assert_freed_within_one_step(server, request_id)
    assert server.probe.wait_for(lambda p: server.engine.cache.free_slots == server.engine.cache.num_slots)
    assert server.probe.wait_for(lambda p: cancelled_count(server) == cancelled + 1, timeout=10)


def test_mid_stream_disconnect_leaves_the_neighbour_running(server):
    before = server.probe.held()
    neighbour_text = []

    def neighbour():
        r = httpx.post(f"{server.url}/v1/completions", json=completion(False, max_tokens=300), timeout=60)
        neighbour_text.append(r.json()["choices"][0])

    thread = threading.Thread(target=neighbour)
    thread.start()
    neighbour_id = server.probe.new_request(before)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=completion(True)) as response:
            lines = response.iter_lines()
            chunks = []
            request_id = server.probe.new_request(before | {neighbour_id})
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                if len(chunks) == 5:
                    break
    # leaving both blocks closed the connection after five chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert_freed_within_one_step(server, request_id)
    thread.join(60)
    assert neighbour_text and neighbour_text[0]["finish_reason"] == "length"
    assert neighbour_id not in server.probe.cancel_asked


def test_disconnect_while_waiting_for_a_slot(server):
    """Two requests fill the batch (max_batch_size=2); a third waits in the queue and its client leaves."""
    before = server.probe.held()
    holders = [raw_request(server, "/v1/completions", completion(True))]
    first = server.probe.new_request(before)
    holders.append(raw_request(server, "/v1/completions", completion(True)))
    second = server.probe.new_request(before | {first})
    waiter = raw_request(server, "/v1/completions", completion(True))
    queued = server.probe.new_request(before | {first, second})
    assert queued in server.probe.waiting
    waiter.close()
    assert_freed_within_one_step(server, queued)
    assert {first, second} <= server.probe.held()         # the running two were not touched
    for sock in holders:
        sock.close()
    for request_id in (first, second):
        assert_freed_within_one_step(server, request_id)
