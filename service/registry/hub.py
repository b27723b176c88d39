"""Fetching a PEFT adapter folder from the Hugging Face hub (or its local cache) with a deadline.

`huggingface_hub`'s shared HTTP client has no timeout of its own, so a hub that accepts the connection and
never answers (a proxy, a black-holed route) held a registration for as long as the socket lived, and a
missing network took 20 s+ of DNS retries. Here every lookup gets `timeout` seconds as each HTTP request's
connect/read timeout (`_bound`) *and* as a deadline on the whole call (the worker thread of a call past its deadline is
left to end by the client timeout; it only ever writes into the hub cache). A commit hash already in the
cache is served from it without asking the hub. Errors are the registry's: 404 (repo, revision or files not
found; offline and not cached), 503 (the hub cannot be reached or did not answer in time).
"""

from __future__ import annotations

import asyncio
import re
from typing import Optional

from adapters_core.config import CONFIG_NAME
from adapters_core.io import BIN_NAME, SAFETENSORS_NAME

from .errors import NotFound, Unavailable

PATTERNS = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _bound(client, timeout: float) -> None:
    """Give every request of `client` (huggingface_hub's shared httpx client) `timeout` seconds to connect
    and per read. huggingface_hub passes `timeout=None` on its calls, which overrides a client default, so
    the timeout is set on each request by a request hook (installed once, the latest value wins)."""
    hooks = client.event_hooks.setdefault("request", [])
    hook = next((h for h in hooks if getattr(h, "adapter_serving", False)), None)
    if hook is None:
        def hook(request) -> None:
            t = hook.seconds
            request.extensions["timeout"] = {"connect": t, "read": t, "write": t, "pool": t}
        hook.adapter_serving = True
        hooks.append(hook)
        client.event_hooks = {**client.event_hooks, "request": hooks}
    hook.seconds = timeout


def _download(repo_id: str, revision: Optional[str], timeout: float) -> str:
    """Worker thread: the snapshot folder holding the adapter's files."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.utils import get_session

    what = f"hub adapter {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if revision and _COMMIT.fullmatch(revision):           # immutable: a cached copy is the answer
        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS, local_files_only=True)
        except Exception:  # not cached (huggingface_hub raises several kinds): ask the hub below
            pass
    offline = bool(constants.HF_HUB_OFFLINE)
    if not offline:
        _bound(get_session(), timeout)
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS)
    except LocalEntryNotFoundError as exc:             # (a subclass of EntryNotFoundError: first)
        if offline:
            raise NotFound(f"{what} is not available: the hub is offline (HF_HUB_OFFLINE) and the adapter is "
                           f"not in the local cache") from exc
        cause = exc.__cause__ or exc.__context__
        if cause is not None and "Timeout" in type(cause).__name__:     # the request's own bound, not refusal:
            raise Unavailable(_no_answer(repo_id, timeout)) from exc      # the same as fetch_adapter's wait
        raise Unavailable(f"{what}: the hub cannot be reached and the adapter is not in the local cache"
                          + (f" ({type(cause).__name__})" if cause else "")) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise NotFound(f"{what} is not available: {type(exc).__name__}") from exc
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available"
        raise NotFound(f"{what} is not available: {type(exc).__name__}: {str(exc)[:300]}") from exc


async def fetch_adapter(repo_id: str, revision: Optional[str], timeout: float) -> str:
    """The local folder of `repo_id` at `revision`, within `timeout` seconds (503 past it)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_download, repo_id, revision, timeout), timeout)
    except asyncio.TimeoutError:
        raise Unavailable(_no_answer(repo_id, timeout)) from None


def _no_answer(repo_id: str, timeout: float) -> str:
    """A hub that took the connection and said nothing within `timeout` (whichever bound saw it first: the
    request's read timeout in the worker or the wait for the worker)."""
    return (f"hub adapter {repo_id!r}: the hub did not answer within {timeout:g} s (hub_timeout); check the "
            f"network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache only")
