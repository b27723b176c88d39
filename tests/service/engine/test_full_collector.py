"""`FullCollector`: while one runs, Python starts no full collection of its own (generation 2's threshold);
its thread runs one when Python's own count says one is due, never while a step holds the gate, and so finds
garbage cycles that had reached the oldest generation; survivors are frozen, and a cycle among them is found by
the next collection of everything; the last one to stop gives the threshold back and unfreezes; the app
starts one by default and none with `gc_beside_step=false`."""
import gc
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from service.engine.full_collector import FullCollector
from service.engine.step_gate import StepGate


class Node:
    def __init__(self):
        self.me = self                            # a cycle: only the cyclic collector frees it


def _old_cycle() -> weakref.ref:
    """A garbage cycle already in the oldest generation (it lived through a generation-1 collection)."""
    node = Node()
    gc.collect(1)                                 # survivors of a generation-1 collection move to generation 2
    ref = weakref.ref(node)
    del node
    return ref


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()                                 # what a test's collections froze is collectable again


def _freed(ref: weakref.ref, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    return ref() is None


def test_thresholds_while_collectors_run_and_after():
    before = gc.get_threshold()
    first, second = FullCollector(StepGate()), FullCollector(StepGate())
    first.start()
    second.start()
    try:
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**6
        assert first.due_after == second.due_after == before[2]        # Python's own, not ours
        first.stop()
        assert gc.get_threshold()[2] > 10**6              # the other one still runs
    finally:
        first.stop()
        second.stop()
    assert gc.get_threshold() == before
    for bad in ({"poll": 0}, {"full_interval": 0}):
        with pytest.raises(ValueError, match="poll and full_interval must be > 0"):
            FullCollector(StepGate(), **bad)


def test_a_due_collection_waits_for_the_step_and_frees_old_cycles():
    gate = StepGate()
    collector = FullCollector(gate, poll=0.02)
    collector.start()
    try:
        gc.collect()                              # nothing due
        ref = _old_cycle()
        time.sleep(0.2)
        assert ref() is not None                  # not due yet: no full collection ran
        entered, leave = threading.Event(), threading.Event()

        def step():
            with gate.step():                     # a step without a C++ loop holds the gate throughout
                entered.set()
                leave.wait(5)
        stepper = threading.Thread(target=step)
        stepper.start()
        entered.wait(5)
        for _ in range(collector.due_after + 1):
            gc.collect(1)                         # each counts towards generation 2, as Python's own do
        assert collector.due()
        time.sleep(0.3)                           # several polls: the collection waits for the gate
        assert ref() is not None
        leave.set()
        stepper.join()
        assert _freed(ref)
        assert not collector.due()
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0             # the last collector to stop unfroze everything


def test_survivors_are_frozen_until_a_collection_of_everything():
    collector = FullCollector(StepGate())
    node = Node()
    ref = weakref.ref(node)
    collector.collect_now()
    assert gc.get_freeze_count() > 0              # the survivors, `node` among them, left out from now on
    del node                                      # garbage now, but frozen: later collections skip it
    collector.collect_now()
    gc.collect()
    assert ref() is not None
    collector.collect_now(everything=True)        # unfrozen first, then collected
    assert ref() is None


def test_collect_now_runs_inside_the_step_s_opened_window():
    """Inside a step, the gate opened around a GIL-free call lets a collection through."""
    gate = StepGate()
    collector = FullCollector(gate)
    done = []
    with gate.step():
        ref = _old_cycle()
        with gate.opened():
            worker = threading.Thread(target=lambda: done.append(collector.collect_now()))
            worker.start()
            worker.join(5)
    assert done and done[0] >= 0 and ref() is None


@pytest.mark.parametrize("beside", [True, False])
def test_the_app_runs_one_unless_turned_off(tmp_path, monkeypatch, beside):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.registry import AdapterRegistry
    from service.settings import Settings

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reliability"))
    from _rel_tiny import tiny_loaded

    default = gc.get_threshold()
    settings = Settings(adapter_dir=str(tmp_path), dtype="float32", max_seq_len=64, gc_beside_step=beside)
    frozen_at_scan = []
    scan = AdapterRegistry.scan

    async def watched_scan(registry):           # the model is frozen before the scan's garbage collections
        frozen_at_scan.append(gc.get_freeze_count())
        return await scan(registry)
    monkeypatch.setattr(AdapterRegistry, "scan", watched_scan)
    gc.unfreeze()                               # nothing frozen by an earlier app in this process
    with TestClient(create_app(settings, tiny_loaded())):
        assert frozen_at_scan and frozen_at_scan[0] > 1000
        assert (gc.get_threshold()[2] > 10**6) is beside
        assert any(t.name == "full-gc" for t in threading.enumerate()) is beside
    assert gc.get_threshold() == default
    assert Settings().gc_beside_step is True
