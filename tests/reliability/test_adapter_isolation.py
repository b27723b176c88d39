"""One request failing in the engine hurts no other request, over real HTTP (finding 1 of round 2).

An adapter whose weights are finite (so it passes validation) but so large that its rows overflow to inf
and NaN in the forward is served beside good adapters. The engine is held between two steps (a call that
waits on an event) while every request is sent, so all of them start in the same engine step. Then: each
good request, streaming or not, greedy or seeded sampling, gets exactly its reference text (taken alone
before); each request on the overflowing adapter fails alone: a stream ends with an error event
and `data: [DONE]`, a non-streaming request gets 500 in the error shape (greedy ones too, never empty
text with 200); and the server then answers normally.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import torch
from safetensors.torch import load_file, save_file

from _rel_live import T, WEIGHTS, settings, still_serving, upload_folder
from _rel_tiny import make_adapter, tiny_loaded
from _server import LiveServer
from service.app import create_app

GOOD = [("good0", "the cat"), ("good1", "a dog ran"), ("good2", "hello there"), (None, "base prompt")]


def overflowing_adapter(folder):
    make_adapter(folder, seed=99)
    tensors = load_file(str(folder / WEIGHTS))
    save_file({k: torch.full_like(v, 1e30) for k, v in tensors.items()}, str(folder / WEIGHTS))
    return folder


def body(model, prompt, stream, sampled):
    extra = {"temperature": 0.9, "seed": 7} if sampled else {"temperature": 0}
    return {"model": model, "prompt": prompt, "max_tokens": 12, "stream": stream, "ignore_eos": True, **extra}


async def call(client, url, payload):
    """(status, text or error json, finish reason, saw [DONE])."""
    if not payload["stream"]:
        r = await client.post(f"{url}/v1/completions", json=payload)
        data = r.json()
        if r.status_code != 200:
            return r.status_code, data, None, False
        return 200, data["choices"][0]["text"], data["choices"][0]["finish_reason"], False
    text, reason, done = [], None, False
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:                 # a failed sequence's event, as vLLM's streams end
                    text, reason = [json.dumps(chunk["error"])], "error"
                    continue
                choice = chunk["choices"][0]
                text.append(choice["text"])
                reason = choice["finish_reason"] or reason
        return r.status_code, "".join(text), reason, done


def test_failing_adapter_requests_fail_alone_in_a_shared_batch(tmp_path):
    app = create_app(settings(tmp_path / "store", max_batch_size=24, max_waiting=32,
                                   max_tokens_limit=16), tiny_loaded())
    with LiveServer(app) as live:
        url, model_id = live.url, app.state.serving.model_id
        for i in range(3):
            assert upload_folder(url, f"good{i}", make_adapter(tmp_path / f"g{i}", seed=i)).status_code == 201
        r = upload_folder(url, "overflow", overflowing_adapter(tmp_path / "bad"))
        assert r.status_code == 201, r.text              # finite weights: nothing to refuse at upload
        # on the device before the engine is held (loading an adapter is itself a call between steps)
        assert httpx.post(f"{url}/admin/adapters/overflow/activate", timeout=T).status_code == 200

        cases = [(a or model_id, p, stream, sampled) for a, p in GOOD for stream in (False, True)
                 for sampled in (False, True)]
        bad_cases = [("overflow", "x y z", stream, sampled) for stream in (False, True) for sampled in (False, True)]

        async def run(batch):
            async with httpx.AsyncClient(timeout=T) as client:
                return await asyncio.gather(*(call(client, url, body(*c)) for c in batch))

        reference = [asyncio.run(run([c]))[0] for c in cases]
        assert all(s == 200 and reason == "length" for s, _, reason, _ in reference), reference

        engine, gate = app.state.serving.engine, threading.Event()
        engine.call_between_steps(lambda: gate.wait(40))     # hold the engine between two steps
        everything = cases + bad_cases
        results = {}
        thread = threading.Thread(target=lambda: results.update(out=asyncio.run(run(everything))))
        thread.start()
        deadline = time.monotonic() + 20
        while engine.num_waiting < len(everything) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_waiting == len(everything)          # all queued: they start in one step
        gate.set()
        thread.join(60)
        out = results["out"]

        assert out[:len(cases)] == reference
        for (model, _, stream, sampled), (status, data, reason, done) in zip(bad_cases, out[len(cases):]):
            if stream:
                assert status == 200 and reason == "error" and done, (sampled, status, data, reason)
                error = json.loads(data)
                assert error["code"] == 500 and "non-finite logits" in error["message"], error
            else:
                assert status == 500, (sampled, status, data)
                assert data["error"]["code"] == 500 and "non-finite logits" in data["error"]["message"]
        still_serving(url, model_id)
        still_serving(url, "good0")
