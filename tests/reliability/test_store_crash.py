"""Crash safety of the adapter store: a process killed with SIGKILL in the middle of an upload, a replace,
an archive upload, a delete or a pin restarts with a consistent store.

A forked child runs store operations through a real `AdapterRegistry` on real files and is killed with
SIGKILL, first at every file-system mutation of a plan in turn (exhaustive: every rename, mkdir, unlink,
fsync and file creation of every operation), then at random moments by the parent while it loops over
uploads and deletes. After each kill a fresh registry scans the same folder, as a restarted server does,
and must show: every completed operation's effect, the operation in flight either wholly done or wholly
absent (never half an adapter), every stored weights file byte-identical (sha256) to what was sent and
loadable into the model, and no leftover temporary or trash files.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import signal
import tarfile
import time
from collections import Counter

import pytest

from service.registry import AdapterRegistry
from service.registry.store import SERVED_PREFIX

from _rel_crash_child import Op, done_count, fork_child
from _rel_tiny import inline_engine_call, make_adapter, sha256, tiny_decoder

pytestmark = pytest.mark.slow

CONFIG, WEIGHTS, META = "adapter_config.json", "adapter_model.safetensors", "registry.json"
CHILD_DEADLINE_S = 60            # a child that neither finishes nor dies by then has hung: fail, do not wait
RANDOM_ROUNDS = int(os.environ.get("REL_CRASH_ROUNDS", "15"))
RANDOM_BUDGET_S = float(os.environ.get("REL_CRASH_BUDGET_S", "15"))


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """(config, weights) bytes of six distinct LoRA adapters for the tiny model."""
    root = tmp_path_factory.mktemp("payloads")
    out = []
    for seed in range(6):
        folder = make_adapter(root / str(seed), seed=seed)
        out.append(((folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes()))
    return out


def _tgz(config: bytes, weights: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in ((CONFIG, config), (WEIGHTS, weights)):
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _registry(root) -> AdapterRegistry:
    return AdapterRegistry(tiny_decoder(), inline_engine_call, str(root))


def _apply(state: dict, op: Op) -> dict:
    """The store's content after `op`: name -> (sha256 of the weights, pinned)."""
    state = dict(state)
    if op.kind in ("upload", "replace", "archive"):
        state[op.name] = (sha256(op.weights), False)
    elif op.kind == "delete":
        del state[op.name]
    elif op.kind == "pin":
        state[op.name] = (state[op.name][0], True)
    return state


def _states(initial: dict, ops: list[Op]) -> list[dict]:
    states = [initial]
    for op in ops:
        states.append(_apply(states[-1], op))
    return states


def _wait(pid: int) -> int:
    """The child's wait status; kill it and fail if it hangs."""
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the child {pid} hung for {CHILD_DEADLINE_S} s")


def _restart_and_check(root, allowed: list[dict]) -> dict:
    """Scan `root` with a fresh registry and check it is consistent; return the state it holds."""
    async def restart():
        registry = _registry(root)
        await registry.scan()
        for record in registry.list():            # every adapter it lists really loads into the model
            registry.release(await registry.acquire(record.name))
        return registry

    registry = asyncio.run(restart())
    registry.close()                              # its loads' served files written (or dropped) before the listing
    state = {r.name: (r.sha256, r.pinned) for r in registry.list()}
    assert state in allowed, f"not a state before or after the interrupted operation: {state}"
    assert sorted(os.listdir(root)) == sorted(state), "leftover temporary, trash or half-written folders"
    for name, (sha, _) in state.items():
        folder = root / name
        files = [f for f in os.listdir(folder) if not f.startswith(SERVED_PREFIX)]   # (the loads' served files)
        assert sorted(files) == sorted([CONFIG, WEIGHTS, META]), name
        assert hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest() == sha, name    # byte-identical
        assert json.loads((folder / META).read_text())["sha256"] == sha, name
    return state


def _seed_store(root, payloads) -> dict:
    async def seed():
        registry = _registry(root)
        for name, (config, weights) in zip(("keep", "doomed", "other"), payloads):
            await registry.register_files(name, config, weights)
    asyncio.run(seed())
    return {name: (sha256(weights), False) for name, (_, weights) in zip(("keep", "doomed", "other"), payloads)}


def test_sigkill_at_every_mutation_of_every_operation(tmp_path, payloads):
    """Kill point k = 1, 2, ... until the child gets through the whole plan: each of the plan's
    file-system mutations is the one the process dies before, once."""
    (c3, w3), (c4, w4), (c5, w5) = payloads[3:6]
    ops = [Op("upload", "fresh", c3, w3), Op("replace", "keep", c4, w4), Op("delete", "doomed"),
           Op("archive", "zipped", weights=w5, archive=_tgz(c5, w5)), Op("pin", "other")]
    seeded = tmp_path / "seeded"
    states = _states(_seed_store(seeded, payloads), ops)
    kills_in: Counter = Counter()
    took_effect: Counter = Counter()
    kill_at = 0
    while True:
        kill_at += 1
        assert kill_at < 500, "the plan never finished"
        root, log, error = tmp_path / f"k{kill_at}", tmp_path / f"k{kill_at}.log", tmp_path / f"k{kill_at}.err"
        shutil.copytree(seeded, root)
        status = _wait(fork_child(lambda: _registry(root), ops, str(log), str(error), kill_at))
        assert not error.exists(), error.read_text()
        done = done_count(str(log))
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0 and done == len(ops)
            assert _restart_and_check(root, [states[-1]]) == states[-1]
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        state = _restart_and_check(root, states[done:done + 2])
        kills_in[ops[done].kind] += 1
        took_effect[ops[done].kind] += state == states[done + 1] != states[done]
        shutil.rmtree(root)
    print(f"\ncrash points: {kill_at - 1} SIGKILLs, per operation {dict(kills_in)}; "
          f"in-flight operation already in effect after the kill: {dict(took_effect)}")
    assert set(kills_in) == {op.kind for op in ops}     # every operation was interrupted, several times each
    assert min(kills_in.values()) >= 3
    # both outcomes of an interrupted write occur: before its commit rename (absent) and after it (present)
    assert took_effect["upload"] and took_effect["replace"] and took_effect["delete"]
    assert took_effect["upload"] < kills_in["upload"] and took_effect["delete"] < kills_in["delete"]


def test_sigkill_at_random_moments_over_many_restarts(tmp_path, payloads):
    """The parent kills a child looping over uploads, replaces and deletes after a random delay; the
    next round starts on whatever the previous one left, as a crashing and restarting server would."""
    rng = random.Random(6)
    root = tmp_path / "store"
    state = _seed_store(root, payloads)
    rounds = mid_plan = 0
    plan_s = None
    started = time.monotonic()
    while rounds < RANDOM_ROUNDS and time.monotonic() - started < RANDOM_BUDGET_S:
        ops = []
        for i in range(8):
            config, weights = payloads[rng.randrange(len(payloads))]
            existing = sorted(_states(state, ops)[-1])
            if i % 3 == 2 and existing:
                ops.append(Op("delete", rng.choice(existing)))
            elif i % 3 == 1 and existing:
                ops.append(Op("replace", rng.choice(existing), config, weights))
            else:
                ops.append(Op("upload", f"r{rounds}-{i}", config, weights))
        states = _states(state, ops)
        log, error = tmp_path / f"r{rounds}.log", tmp_path / f"r{rounds}.err"
        if plan_s is None:            # time the plan run to the end on copies, to aim the kills inside it
            runs = []
            for copy in range(2):
                shutil.copytree(root, tmp_path / f"timing{copy}")
                t0 = time.monotonic()
                _wait(fork_child(lambda: _registry(tmp_path / f"timing{copy}"), ops, os.devnull, str(error), None))
                runs.append(time.monotonic() - t0)
            plan_s = min(runs)
        pid = fork_child(lambda: _registry(root), ops, str(log), str(error), None)
        time.sleep(rng.uniform(0.0, plan_s))
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        assert not error.exists(), error.read_text()
        done = done_count(str(log))
        mid_plan += done < len(ops)
        state = _restart_and_check(root, states[done:done + 2])
        rounds += 1
    print(f"\nrandom SIGKILLs: {rounds} rounds in {time.monotonic() - started:.1f} s (a plan takes {plan_s:.2f} s), "
          f"{mid_plan} of them mid-plan; {len(state)} adapters stored at the end")
    assert rounds >= 3 and mid_plan >= 1


def test_trash_of_a_replace_cannot_come_back_after_a_delete(tmp_path, payloads):
    """The files a SIGKILL leaves when a replace has committed, `delete` has renamed the new folder to the
    trash, and neither trash has been removed yet: the deleted name must stay deleted (it used to come
    back as the old, replaced adapter, because the replace's trash still carried the name)."""
    (c0, w0), (c1, w1) = payloads[:2]
    root = tmp_path / "store"
    _seed_store(root, payloads)
    registry = _registry(root)
    staging = registry.store.new_staging()
    registry.store.stage_bytes(staging, c1, w1, WEIGHTS, 2**30)
    registry.store.write_meta(staging, {"source": {"type": "upload"}, "created_at": 0.0, "pinned": False,
                                        "served": True, "sha256": sha256(w1), "size": len(c1) + len(w1)})
    replaced = registry.store.commit("keep", staging)        # the old "keep" now waits in the trash
    deleted = registry.store.trash("keep")                   # and the new one is deleted
    assert os.path.isdir(replaced) and os.path.isdir(deleted)
    state = _restart_and_check(root, [{"doomed": (sha256(payloads[1][1]), False),
                                       "other": (sha256(payloads[2][1]), False)}])
    assert "keep" not in state
