"""`AdapterRecord`, the registry's one entry per adapter, and `Lease`, one request's hold on it.

A record carries what the admin API shows (kind, rank, alpha, targets, virtual tokens, size, sha256, source,
tier, served, pinned, times, counters, the dtype its weights are held in and the bytes they take in memory,
which differ from the stored ones under `adapter_dtype`: adapter_dtype.py) and, apart from that, the runtime
state the registry needs: the parsed config and tensors while the adapter is in the cpu or device tier, the
name it has inside the model, and an LRU tick.
The model-level name is `<name>__<generation>` (with characters adapters_core does not allow replaced),
distinct per registration, so a name that is deleted or replaced and registered again never collides
with the old adapter that running requests still use. A stored adapter that cannot be loaded (a config
or weights that fail today's checks, unreadable metadata) is *quarantined*: its record carries the error,
is listed with `state` "quarantined" and is never served until it is replaced or deleted. `to_dict` is
always valid JSON (non-finite numbers become null), so no record can break the admin routes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Tier = Literal["stored", "cpu", "device"]
STORED: Tier = "stored"
CPU: Tier = "cpu"
DEVICE: Tier = "device"
TIERS: tuple[Tier, ...] = (STORED, CPU, DEVICE)


def model_adapter_name(name: str, generation: int) -> str:
    """The adapter's name inside the model: adapters_core allows only letters, digits, '_' and '-'."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)}__{generation}"


@dataclass
class AdapterRecord:
    name: str
    kind: str                                  # peft_type: LORA, IA3, ADALORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING
    rank: Optional[int]                        # None for IA3 and prompt learning
    alpha: Optional[float]                     # None for IA3 and prompt learning
    targets: list[str]
    size: int                                  # bytes of the stored config + weights
    sha256: str                                # of the stored weights file
    source: dict[str, Any]                     # {"type": "upload" | "local" | "hub", "path" | "repo_id", "revision"}
    created_at: float                          # unix seconds
    generation: int = 0
    tier: Tier = STORED
    served: bool = True
    pinned: bool = False
    last_used_at: Optional[float] = None       # unix seconds of the last acquire
    requests_served: int = 0
    in_use: int = 0                            # leases not yet released
    error: Optional[str] = None                # set: quarantined (why it cannot be loaded)
    virtual_tokens: Optional[int] = None       # prompt learning: virtual tokens before every prompt
    # once its weights were read (None before): the dtype most of their bytes are held in by the registry
    # (adapter_dtype's, or the checkpoint's under auto, which a dense base model then casts to its own), and
    # `size` with the weights counted in the dtypes they are held in: what the cpu and device tiers count
    dtype: Optional[str] = None
    resident_size: Optional[int] = None
    # what the stored files were when this record was made, not shown: the weights file's identity its sha256 was
    # taken from (kept in registry.json: `AdapterStore.digest`) and the config's sha256; a rescan that finds
    # either changed (a file edited or renamed over in place) replaces the record
    weights_file: str = field(default="", repr=False)
    config_sha256: str = field(default="", repr=False)
    # runtime state, not shown
    config: Any = field(default=None, repr=False)          # adapters_core config while in cpu / device tier
    tensors: Optional[dict] = field(default=None, repr=False)
    tick: int = field(default=0, repr=False)                # LRU order: larger = used more recently
    busy: bool = field(default=False, repr=False)           # a load or unload is under way: never evict
    pending: Any = field(default=None, repr=False)          # asyncio future of the load under way, if any
    retired: bool = field(default=False, repr=False)        # deleted or replaced: freed at the last release
    yielding_to: Optional[str] = field(default=None, repr=False)   # the adapter it gives its device slot to

    @property
    def model_name(self) -> str:
        return model_adapter_name(self.name, self.generation)

    @property
    def memory_size(self) -> int:
        """Bytes it takes in the cpu / device tiers (the memory budget's unit): `resident_size` once known."""
        return self.size if self.resident_size is None else self.resident_size

    @property
    def quarantined(self) -> bool:
        return self.error is not None

    def drop_tensors(self) -> None:
        self.config, self.tensors = None, None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "rank": self.rank, "alpha": _finite(self.alpha),
            "targets": list(self.targets), "size": self.size, "sha256": self.sha256, "source": dict(self.source),
            "tier": self.tier, "served": self.served, "pinned": self.pinned, "created_at": _finite(self.created_at),
            "last_used_at": _finite(self.last_used_at), "requests_served": self.requests_served,
            "in_use": self.in_use, "state": "quarantined" if self.quarantined else "ok", "error": self.error,
            "virtual_tokens": self.virtual_tokens, "dtype": self.dtype, "resident_size": self.resident_size,
        }

    def serialisable(self) -> bool:
        """Whether `to_dict()` is strict JSON (the source dict comes from a file and may hold anything)."""
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return False
        return True


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is None or math.isfinite(value) else None


@dataclass
class Lease:
    """One request's hold on an adapter: pass `model_name` to the engine, give the lease back with
    `registry.release(lease)` when the request ends (releasing twice is harmless)."""

    name: str
    model_name: str
    record: AdapterRecord = field(repr=False)
    released: bool = False
