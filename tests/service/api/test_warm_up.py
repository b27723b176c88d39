"""The server resolves its routes and loads anyio's backend before it is ready, not on its first requests
(`service.api.warm_up`): FastAPI builds each router's route state on the first walk of that router, and the
first requests of a burst paid for it on the event loop."""
import asyncio
import contextlib
import sys
from pathlib import Path

import httpx

from service.api.warm_up import warm_up
from service.app import create_app
from service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reliability"))
from _rel_tiny import tiny_loaded  # noqa: E402


@contextlib.contextmanager
def calls_of(function: str):
    """Counts the calls of FastAPI functions named `function` made in this thread meanwhile."""
    seen = {"n": 0}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == function and "fastapi" in frame.f_code.co_filename:
            seen["n"] += 1
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def app(tmp_path):
    settings = Settings(adapter_dir=str(tmp_path), dtype="float32", max_batch_size=2, max_seq_len=64)
    return create_app(settings, tiny_loaded())


def test_the_first_walk_of_the_router_resolves_the_routes_and_a_second_walk_does_not(tmp_path):
    fresh = app(tmp_path)
    with calls_of("get_dependant") as first:           # what a first request would otherwise have paid
        status = asyncio.run(warm_up(fresh))
    with calls_of("get_dependant") as second:
        asyncio.run(warm_up(fresh))
    assert status == 404 and first["n"] > 0 and second["n"] == 0


def test_a_started_server_resolves_nothing_on_its_first_requests_and_notes_no_error(tmp_path):
    served = app(tmp_path)

    async def first_requests():
        async with served.router.lifespan_context(served):
            transport = httpx.ASGITransport(app=served)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                with calls_of("get_dependant") as built:
                    done = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                    streamed = await client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True})
                    models = await client.get("/v1/models")
            return done, streamed, models, built["n"], served.state.serving.metrics.recent_errors
    done, streamed, models, built, recent = asyncio.run(first_requests())
    assert (done.status_code, streamed.status_code, models.status_code) == (200, 200, 200), done.text
    assert "data: [DONE]" in streamed.text
    assert built == 0
    assert recent.latest() == []          # the warm-up's unmatched path went round the middleware: nothing noted
