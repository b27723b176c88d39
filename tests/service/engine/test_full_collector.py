"""`FullCollector`: while one runs, Python starts no full collection of its own (generation 2's threshold);
its thread collects every `interval` seconds, but never while a step holds the gate, and finds garbage
cycles that had reached the oldest generation; the last one to stop gives the threshold back; the app starts
one by default and none with `gc_full_interval=0`."""
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


def test_thresholds_while_collectors_run_and_after():
    before = gc.get_threshold()
    first, second = FullCollector(StepGate(), 60), FullCollector(StepGate(), 60)
    first.start()
    second.start()
    try:
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**6
        first.stop()
        assert gc.get_threshold()[2] > 10**6              # the other one still runs
    finally:
        first.stop()
        second.stop()
    assert gc.get_threshold() == before
    with pytest.raises(ValueError, match="interval must be > 0"):
        FullCollector(StepGate(), 0)


def test_scheduled_collection_waits_for_the_step_and_frees_old_cycles():
    gate = StepGate()
    collector = FullCollector(gate, 0.05)
    collector.start()
    try:
        entered, leave = threading.Event(), threading.Event()

        def step():
            with gate.step():                     # a step without a C++ loop holds the gate throughout
                entered.set()
                leave.wait(5)
        stepper = threading.Thread(target=step)
        stepper.start()
        entered.wait(5)
        ref = _old_cycle()
        time.sleep(0.4)                           # several intervals: each collection waits for the gate
        for _ in range(20):                       # (young collections do not reach generation 2)
            [object() for _ in range(1000)]
        assert ref() is not None
        leave.set()
        stepper.join()
        deadline = time.monotonic() + 5
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ref() is None
    finally:
        collector.stop()


def test_collect_now_runs_inside_the_step_s_opened_window():
    """Inside a step, the gate opened around a GIL-free call lets a collection through."""
    gate = StepGate()
    collector = FullCollector(gate, 60)
    done = []
    with gate.step():
        ref = _old_cycle()
        with gate.opened():
            worker = threading.Thread(target=lambda: done.append(collector.collect_now()))
            worker.start()
            worker.join(5)
    assert done and done[0] >= 0 and ref() is None


@pytest.mark.parametrize("interval, runs", [(60.0, True), (0.0, False)])
def test_the_app_runs_one_unless_turned_off(tmp_path, interval, runs):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reliability"))
    from _rel_tiny import tiny_loaded

    default = gc.get_threshold()
    settings = Settings(adapter_dir=str(tmp_path), dtype="float32", max_seq_len=64, gc_full_interval=interval)
    with TestClient(create_app(settings, tiny_loaded())):
        assert (gc.get_threshold()[2] > 10**6) is runs
        assert any(t.name == "full-gc" for t in threading.enumerate()) is runs
    assert gc.get_threshold() == default
    assert Settings().gc_full_interval == 60.0
