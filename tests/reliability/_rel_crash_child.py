"""The child side of the crash tests: a forked process that runs a plan of store operations through a real
`AdapterRegistry` and dies by SIGKILL, either at the k-th file-system mutation (`kill_at=k`: every point of
every operation can be hit in turn) or whenever the parent kills it (`kill_at=None`).

Each finished operation appends one line to a log through a file descriptor opened before the operations
(plain `os.write`, which SIGKILL cannot undo), so the parent knows which operations completed and which
one was in flight. The mutation hooks wrap the real calls (`os.rename`, `os.replace`, `os.mkdir`,
`os.unlink`, `os.remove`, `os.rmdir`, `os.fsync` and `open` for writing); they only count and, at the
chosen point, kill the process before the call happens. They are installed in the child only.
"""
from __future__ import annotations

import asyncio
import builtins
import os
import signal
import traceback
from dataclasses import dataclass
from typing import Optional

from service.registry import AdapterRegistry

MUTATIONS = ("rename", "replace", "mkdir", "unlink", "remove", "rmdir", "fsync")


@dataclass(frozen=True)
class Op:
    """One store operation: upload (files), replace (files over an existing name), archive, delete, pin."""

    kind: str
    name: str
    config: bytes = b""
    weights: bytes = b""
    archive: bytes = b""


def _install_killer(kill_at: int) -> None:
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn):
        def wrapper(*args, **kwargs):
            tick()
            return fn(*args, **kwargs)
        return wrapper

    for name in MUTATIONS:
        setattr(os, name, counted(getattr(os, name)))
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_


async def _run(registry: AdapterRegistry, ops: list[Op], log_fd: int, kill_at: Optional[int]) -> None:
    await registry.scan()
    if kill_at is not None:
        _install_killer(kill_at)
    for i, op in enumerate(ops):
        if op.kind in ("upload", "replace"):
            await registry.register_files(op.name, op.config, op.weights, replace=op.kind == "replace")
        elif op.kind == "archive":
            await registry.register_archive(op.name, op.archive, f"{op.name}.tar.gz")
        elif op.kind == "delete":
            await registry.delete(op.name)
        elif op.kind == "pin":
            await registry.pin(op.name)
        else:
            raise ValueError(op.kind)
        os.write(log_fd, f"{i}\n".encode())


def fork_child(make_registry, ops: list[Op], log_path: str, error_path: str, kill_at: Optional[int]) -> int:
    """Fork a child that runs `ops` on `make_registry()`; return its pid. The child never returns."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        asyncio.run(_run(make_registry(), ops, log_fd, kill_at))
    except BaseException:
        fd = os.open(error_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)   # not a counted mutation
        os.write(fd, traceback.format_exc().encode())
        code = 1
    finally:
        os._exit(code)


def done_count(log_path: str) -> int:
    try:
        with open(log_path) as fh:
            return len(fh.read().split())
    except FileNotFoundError:
        return 0
