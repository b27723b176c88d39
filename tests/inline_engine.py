"""`inline_engine_call`: the registry's engine hook without an engine thread (shared by the registry and
store crash tests)."""
from __future__ import annotations

import concurrent.futures


def inline_engine_call(fn) -> concurrent.futures.Future:
    """`Engine.call_between_steps` without an engine thread: run `fn` now, hand the result in a future."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
    return future
