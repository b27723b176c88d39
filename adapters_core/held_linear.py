"""`linear_holding`: the `nn.Linear` around given tensors that holds an adapter's factors (each LoRA's `lora_A` /
`lora_B` module), made cheaply and lightly.

nn.Linear's own constructor allocates and initialises new parameters (`reset_parameters` runs even on the
meta device, ~0.3 ms per layer of every adapter load); here the module's state is what `nn.Module.__init__`
and two parameter assignments leave, filled directly from a template of this torch version's fresh module
state (through Module's `__setattr__`, with its isinstance checks against Parameter's metaclass, the two
modules per layer were half of preparing an adapter). The modules are `HeldLinear`s: an nn.Linear whose hook
containers (ten OrderedDicts and a set, 11 of the 15 objects the garbage collector visits per module) are made
on first use. A server reads an adapter's factors through its slot rows and never hooks them, and each load
of a SmolLM2 adapter on q/v made 120 such modules: ~2,230 tracked objects an adapter before, ~790 now, for the
full collections that a rotation of 1,000 adapters sets off (`service/engine/full_collector.py`). Everything
that reads a hook container (a forward call, `state_dict`, registering a hook, pickling: `nn.Module.
__setstate__` restores them) finds it as on any module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Containers a module's own methods reach through `self.__dict__` (`__getattr__` / `__setattr__`): made at once.
_EAGER = ("_parameters", "_buffers", "_modules")


class _MadeOnFirstUse:
    """A non-data descriptor for one hook container: its first read on an instance stores a fresh empty one in
    the instance's `__dict__` (where every later read finds it, past this descriptor) and returns it."""

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.kind()
        return value


class HeldLinear(nn.Linear):
    """An nn.Linear made by `linear_holding` (see the module docstring); printed as a Linear."""

    def _get_name(self) -> str:
        return "Linear"


def _fresh_module_state() -> Optional[tuple]:
    """The attributes `nn.Module.__init__` gives a module (this torch version's), in its order, as (name,
    value, None) for a plain value and (name, None, type) for a container, all of which are empty: the
    template `linear_holding` fills a module's state from (a type known in advance, not an `isinstance` per
    attribute of every module); None if some container is not empty (then it is not used)."""
    module = nn.Module.__new__(nn.Module)
    nn.Module.__init__(module)
    state = module.__dict__
    if any(isinstance(v, (dict, set)) and v for v in state.values()):
        return None
    return tuple((k, None, type(v)) if isinstance(v, (dict, set)) else (k, v, None) for k, v in state.items())


def _made_at_construction() -> Optional[tuple]:
    """The template's entries a HeldLinear gets when it is made (plain values and the `_EAGER` containers),
    after giving HeldLinear a `_MadeOnFirstUse` descriptor for each other container; None (and no
    descriptors: every module then gets nn.Module's own `__init__`) without a usable template."""
    template = _fresh_module_state()
    if template is None:
        return None
    for name, _, kind in template:
        if kind is not None and name not in _EAGER:
            descriptor = _MadeOnFirstUse(kind)
            descriptor.__set_name__(HeldLinear, name)
            setattr(HeldLinear, name, descriptor)
    return tuple(entry for entry in template if entry[2] is None or entry[0] in _EAGER)


_TEMPLATE = _made_at_construction()


def _parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """`nn.Parameter(tensor, requires_grad)`: for a plain tensor, the one call its constructor makes (half its
    cost; a loader makes two per adapted layer)."""
    if type(tensor) is torch.Tensor:
        return torch.Tensor._make_subclass(nn.Parameter, tensor, requires_grad)
    return nn.Parameter(tensor, requires_grad=requires_grad)


def linear_holding(weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   requires_grad: bool = True) -> nn.Linear:
    """An nn.Linear (a `HeldLinear`) whose parameters are `weight` [out, in] (and `bias` [out]) as given."""
    lin = HeldLinear.__new__(HeldLinear)
    w = _parameter(weight, requires_grad)
    b = None if bias is None else _parameter(bias, requires_grad)
    if _TEMPLATE is None:                 # a torch whose fresh module state is not plain empty containers
        nn.Module.__init__(lin)
        lin.weight, lin.bias = w, b
    else:
        state = lin.__dict__
        for key, value, kind in _TEMPLATE:
            state[key] = value if kind is None else kind()     # in __init__'s order, fresh containers
        state["_parameters"]["weight"], state["_parameters"]["bias"] = w, b
    state = lin.__dict__
    state["in_features"], state["out_features"] = weight.shape[1], weight.shape[0]
    return lin
