"""`Watched`: a count of changes to the modules a decode plan is built from, so the plan can be kept.

A step that runs a model's layers as one straight call (the service's direct step) must first know that every
layer is still what that call computes: its submodules' types, no hooks, no disabled or merged adapter, the
same stored weights. Checking all of that object by object before each step cost ~0.4 ms on a 30-layer model:
the weights streamed through the caches in the step before have evicted every Python object the checks read,
so each read is a trip to memory. Instead the plan records `generation()` before it walks the model and is
kept while the number stays the same. The number moves, after the change is in place, on every attribute set
or deleted on an instance of a class that mixes in `Watched` or `WatchedAttributes`, and on every parameter,
buffer, submodule or forward hook registered on a `Watched` module and every conversion of one (`.to()`, which
may put new parameter objects straight into its `_parameters`); `bump()` moves it for changes made in place
(an adapter merged into its layer appends to `merged_adapters`). A class lists in `_unwatched` the scratch
attributes it sets on every call (a group's outputs of the last matmul), which no plan reads. Writes straight
into an instance's `__dict__`, `_modules`, `_parameters` or hook dicts go unseen: nothing here makes them, and
code that does must call `bump()`. A tensor's values are not part of a plan (kernels read them at each step)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_generation = 0


def generation() -> int:
    """The number of changes so far (one read of a module global: atomic under the GIL)."""
    return _generation


def bump() -> None:
    """Count a change; call it after the change is in place, so a plan that reads the new number sees it."""
    global _generation
    with _lock:                # `+= 1` from two threads could lose one of them, or even move the number back
        _generation += 1


class WatchedAttributes:
    """Mixin: setting or deleting an attribute (other than the class's `_unwatched` ones) counts a change."""

    _unwatched: frozenset = frozenset()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name not in self._unwatched:
            bump()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name not in self._unwatched:
            bump()


class Watched(WatchedAttributes):
    """Mixin for `nn.Module` subclasses (listed before `nn.Module`): attributes as `WatchedAttributes`, and
    every parameter, buffer, submodule or forward hook registered through torch's methods."""

    def register_parameter(self, name, param) -> None:
        super().register_parameter(name, param)
        bump()

    def register_buffer(self, name, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        bump()

    def add_module(self, name, module) -> None:
        super().add_module(name, module)
        bump()

    def register_module(self, name, module) -> None:
        super().register_module(name, module)
        bump()

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.float()`, `.cuda()`...: torch may put new parameter objects straight into `_parameters`."""
        result = super()._apply(fn, *args, **kwargs)
        bump()
        return result

    def register_forward_hook(self, *args, **kwargs):
        handle = super().register_forward_hook(*args, **kwargs)
        bump()
        return handle

    def register_forward_pre_hook(self, *args, **kwargs):
        handle = super().register_forward_pre_hook(*args, **kwargs)
        bump()
        return handle
