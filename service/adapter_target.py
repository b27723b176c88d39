"""`AdapterTarget`: what a request runs on, as the routes resolve it and `TextGenerator` leases it.

The base model (no name), one registered adapter (`name`, leased with `registry.acquire`) or LoRAX's merge of
several (`merge`, leased with `registry.acquire_merged`), and `scale`, the request's `adapter_scale`, which
multiplies the LoRA delta in the engine (1 = the adapter as trained; `service/engine/adapter_scale.py` says
where it applies). Routes may still pass a plain adapter name (or None) wherever a target is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .registry import MergeSpec

MERGED_LABEL = "__merged__"        # the metrics label of every merged-adapter request (bounded cardinality)


@dataclass(frozen=True)
class AdapterTarget:
    name: Optional[str] = None
    merge: Optional[MergeSpec] = None
    scale: float = 1.0

    @property
    def label(self) -> Optional[str]:
        """The adapter label for metrics: the name, one label for all merges, None for the base model."""
        return MERGED_LABEL if self.merge is not None else self.name

    @property
    def is_base(self) -> bool:
        return self.name is None and self.merge is None


def as_target(adapter: Union[str, AdapterTarget, None]) -> AdapterTarget:
    return adapter if isinstance(adapter, AdapterTarget) else AdapterTarget(adapter)
