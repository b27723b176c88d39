"""A full queue answers 429 with Retry-After, streaming or not, instead of queueing without bound."""
import threading
import time

import httpx
import pytest

from _server import LiveServer
from service.app import create_app
from service.model import load_model
from service.settings import Settings

pytestmark = pytest.mark.slow


def test_full_queue_gets_429_with_retry_after(tmp_path):
    settings = Settings(adapter_dir=str(tmp_path), dtype="float32", max_batch_size=1, max_waiting=1,
                        max_seq_len=512, max_tokens_limit=300)
    with LiveServer(create_app(settings, load_model(None))) as server:
        long = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Count: 1, 2, 3,", "max_tokens": 120,
                "temperature": 1.0, "stream": True}
        opened = []

        def hold():
            with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=120) as r:
                opened.append(r.status_code)
                for _ in r.iter_lines():
                    pass
        threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
        for t in threads:          # one runs, one waits: the queue (max_waiting=1) is now full
            t.start()
            time.sleep(1.0)
        for stream in (True, False):
            r = httpx.post(f"{server.url}/v1/completions", json={**long, "stream": stream, "max_tokens": 5},
                           timeout=60)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        for t in threads:
            t.join(120)
        assert opened == [200, 200]
