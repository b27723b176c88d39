"""`lets_the_gil_go`: whether a call gives up the GIL, for tests of code that must keep it (an adapter loader's
file calls, a request's set-up on the event loop): beside a busy server each give-up waits for another thread's
next forced switch, up to `sys.getswitchinterval()` (5 ms)."""
import gc
import sys
import threading
import time


def lets_the_gil_go(fn) -> bool:
    """Whether `fn()` let another thread take the GIL: that thread is made runnable (waiting for the GIL) and
    the switch interval huge, so it runs only when the caller gives the GIL up. A release too short for the
    waiter to wake in may go unseen (Python's read of a small cached file, torch's around one as_strided: seen
    in most tries, not all), so only "never" is asserted of a call; a call that keeps the GIL never shows one."""
    ready, go, ran = threading.Event(), threading.Event(), []

    def waiter():
        ready.set()
        go.wait()
        ran.append(True)

    interval = sys.getswitchinterval()
    gc.collect()                         # no collection mid-check (a finalizer closing a file lets the GIL go)
    gc.disable()
    thread = threading.Thread(target=waiter)
    thread.start()
    ready.wait()
    time.sleep(0.05)                     # the waiter is blocked in go.wait()
    sys.setswitchinterval(1000.0)
    try:
        go.set()                         # it wakes and waits for the GIL, which this thread holds
        for _ in range(5):
            fn()
        released = bool(ran)
    finally:
        sys.setswitchinterval(interval)
        gc.enable()
        thread.join()
    return released
