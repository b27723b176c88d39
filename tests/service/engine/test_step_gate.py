"""`StepGate`: another thread gets in between steps and while a step has it opened (its C++ loop), never
during the rest of a step; `opened` outside a step, or in another thread, changes nothing."""
import copy
import threading

from service.engine.step_gate import StepGate


def _enters(gate: StepGate, timeout: float = 0.2) -> bool:
    """Whether another thread takes the gate within `timeout` seconds (it lets go at once)."""
    got = []

    def take():
        if gate._lock.acquire(timeout=timeout):
            got.append(True)
            gate._lock.release()
    t = threading.Thread(target=take)
    t.start()
    t.join()
    return bool(got)


def test_others_enter_between_steps_and_while_opened_only():
    gate = StepGate()
    assert _enters(gate)
    with gate.step():
        assert not _enters(gate)
        with gate.opened():
            assert _enters(gate)
            with gate:                      # and the context manager form holds it off the step meanwhile
                pass
        assert not _enters(gate)
    assert _enters(gate)


def test_opened_outside_a_step_or_in_another_thread_does_nothing():
    gate = StepGate()
    with gate.opened():                     # no step: nothing to release
        assert _enters(gate)
    with gate.step():
        done = threading.Event()

        def other():
            with gate.opened():             # not the step's thread: it must not release the step's hold
                done.set()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert done.is_set() and not _enters(gate)


def test_a_copied_gate_is_its_own_and_free():
    gate = StepGate()
    with gate.step():
        twin = copy.deepcopy(gate)
        assert twin is not gate and _enters(twin)
