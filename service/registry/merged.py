"""Merged adapters (LoRAX's `merged_adapters`): `MergeSpec` and the registry's `MergedMixin`.

A request may ask for a weighted merge of registered LoRA adapters instead of one adapter. The merge is PEFT's
`add_weighted_adapter` (adapters_core's, bit-identical): `linear`, `ties`, `dare_linear`, `dare_ties` or
`magnitude_prune` with `density` and `majority_sign_method`; DARE's random drops are drawn from a generator
seeded with 0, so one spec always gives the same adapter. The result is a derived adapter with its own slot
in the model, served and batched like any other: it is built once per spec (the sources' names, their
registration generations, the weights and the strategy's parameters), kept as a record outside the listed
adapters, and moves through the device and cpu tiers under the same LRU and leases as registered adapters
(it counts against `max_device_adapters` and `max_cpu_adapters`). At most `max_merged_adapters` merged
records exist at once: a new spec evicts the least recently used merged adapter that no request uses (429
when all are in use); one pushed out of the cpu tier, or whose source is deleted or replaced, is forgotten
and merged again on its next request. A spec that cannot be merged (unknown, deactivated or non-LoRA sources,
ranks the strategy cannot combine, bad parameters) is refused before anything changes, naming the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

import adapters_core as ac
from adapters_core.management import cast_adapter_factors
from adapters_core.packing import tensor_bytes
from adapters_core.task_arithmetic import FACTOR_STRATEGIES, NEEDS_DENSITY, SIGN_METHODS

from .adapter_dtype import held_dtype
from .record import DEVICE, AdapterRecord, Lease
from .errors import Conflict, Invalid, Unavailable

MERGED_PREFIX = "merged-"           # a merged record's name: this and a hash of its spec
DARE_SEED = 0


# |weight| of one merged adapter: adapter_scale's bound (engine/adapter_scale.py), far past any useful blend; a
# weight like 1e308 made the merged factors overflow, and every request on the merge failed on non-finite logits
MAX_MERGE_WEIGHT = 10.0


@dataclass(frozen=True)
class MergeSpec:
    """What to merge: registered adapter names, one weight each, PEFT's strategy and its parameters."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: Optional[float] = None
    majority_sign_method: str = "total"

    def check(self, field: str = "merged_adapters") -> None:
        """Invalid (422) naming the field when the spec is malformed (before any registry look-up)."""
        if not self.ids:
            raise Invalid(f"{field}.ids: name at least one adapter")
        if len(self.weights) != len(self.ids):
            raise Invalid(f"{field}.weights: {len(self.weights)} weights for {len(self.ids)} ids; give one weight "
                          "per adapter")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and abs(w) <= MAX_MERGE_WEIGHT
                   for w in self.weights):
            raise Invalid(f"{field}.weights: every weight must be a finite number in [-{MAX_MERGE_WEIGHT:g}, "
                          f"{MAX_MERGE_WEIGHT:g}]")
        if len(set(self.ids)) != len(self.ids):
            raise Invalid(f"{field}.ids: an adapter is named twice")
        if self.strategy not in FACTOR_STRATEGIES:
            raise Invalid(f"{field}.merge_strategy {self.strategy!r} is not supported ({', '.join(FACTOR_STRATEGIES)})")
        if self.strategy in NEEDS_DENSITY and self.density is None:
            raise Invalid(f"{field}.density: merge_strategy {self.strategy} needs a density in [0, 1]")
        if self.density is not None and not (math.isfinite(self.density) and 0 <= self.density <= 1):
            raise Invalid(f"{field}.density must be a number in [0, 1]")
        if self.majority_sign_method not in SIGN_METHODS:
            raise Invalid(f"{field}.majority_sign_method must be one of {', '.join(SIGN_METHODS)}")


class MergedMixin:
    """Merged adapters for `AdapterRegistry` (its state: `_merged`, `max_merged_adapters`, the tier machinery)."""

    async def acquire_merged(self, spec: MergeSpec) -> Lease:
        """A lease on the merged adapter of `spec` in the device tier, merging it first if needed."""
        self._bind()
        spec.check()
        while True:
            sources = self._merge_sources(spec)
            key = (tuple((r.name, r.generation) for r in sources), spec.weights, spec.strategy, spec.density,
                   spec.majority_sign_method)
            record = self._merged.get(key)
            if record is None:
                await self._shielded(self._merge_new(spec, key))
                continue
            lease = await self._lease_loaded(record)
            if lease is not None:
                return lease

    def _merge_sources(self, spec: MergeSpec) -> list[AdapterRecord]:
        sources = []
        for i, name in enumerate(spec.ids):
            record = self._usable(name)
            if not record.served:
                raise Conflict(f"merged_adapters.ids[{i}]: adapter {name!r} is deactivated")
            if record.kind != "LORA":
                raise Invalid(f"merged_adapters.ids[{i}]: adapter {name!r} is {record.kind}; only LoRA adapters merge")
            sources.append(record)
        ranks = {r.rank for r in sources}
        if len(ranks) > 1:
            raise Invalid(f"merged_adapters.ids: merge_strategy {spec.strategy} needs adapters of one rank; got "
                          f"ranks {[r.rank for r in sources]}")
        return sources

    async def _merge_new(self, spec: MergeSpec, key: tuple) -> None:
        """Merge `spec` into a new record in the device tier (the sources leased meanwhile)."""
        leases = []
        try:
            for name in spec.ids:
                leases.append(await self.acquire(name))
            await self._locked(self._merge_locked, spec, key, leases)
        finally:
            for lease in leases:
                self.release(lease)

    async def _merge_locked(self, spec: MergeSpec, key: tuple, leases: list[Lease]) -> None:
        if key in self._merged or any(lease.record.retired for lease in leases):
            return                              # merged meanwhile, or a source was replaced: look again
        for i, lease in enumerate(leases):
            config = getattr(self.model, "peft_config", {}).get(lease.model_name)
            if getattr(config, "use_dora", False):
                raise Invalid(f"merged_adapters.ids[{i}]: adapter {lease.name!r} uses DoRA, which does not merge")
        await self._make_merged_room()
        digest = hashlib.sha256(json.dumps([list(k) if isinstance(k, tuple) else k for k in key],
                                           default=list).encode()).hexdigest()
        record = AdapterRecord(name=MERGED_PREFIX + digest[:16], kind="LORA", rank=leases[0].record.rank,
                               alpha=leases[0].record.rank, targets=[], size=0, sha256=digest,
                               source={"type": "merged", "ids": list(spec.ids), "weights": list(spec.weights),
                                       "merge_strategy": spec.strategy, "density": spec.density,
                                       "majority_sign_method": spec.majority_sign_method},
                               created_at=time.time(), generation=next(self._generations), busy=True)
        try:
            await self._evict(self._take_device_room(record))
            names = [lease.model_name for lease in leases]
            config, tensors = await self._on_engine(lambda: _merge(self.model, names, spec, record.model_name,
                                                                   self.adapter_dtype.factor_dtype))
        except ac.AdapterError as exc:
            raise Invalid(f"merged_adapters: {exc}") from exc
        finally:
            record.busy = False
        record.config, record.tensors, record.tier = config, tensors, DEVICE
        record.targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
        record.size = record.resident_size = tensor_bytes(tensors)
        record.dtype = held_dtype(tensors)
        self._merged[key] = record

    async def _make_merged_room(self) -> None:
        while len(self._merged) >= self.max_merged_adapters:
            idle = [r for r in self._merged.values() if r.in_use == 0 and not r.busy]
            if not idle:
                raise Unavailable(f"all {self.max_merged_adapters} merged adapters (max_merged_adapters) are in use; "
                                  "retry later")
            victim = min(idle, key=lambda r: r.tick)
            if victim.tier == DEVICE:
                await self._unload_from_model(victim)
            self._forget_merged(victim)

    def _forget_merged(self, record: AdapterRecord) -> None:
        """Drop a merged record (no request uses it, it is not in the model): it is merged again when asked."""
        self._merged = {k: r for k, r in self._merged.items() if r is not record}
        record.drop_tensors()
        record.retired = True

    def _retire_merged_of(self, source: AdapterRecord) -> None:
        """A source was deleted or replaced: its merged adapters are freed like a deleted adapter."""
        for key, record in list(self._merged.items()):
            if any(name == source.name and generation == source.generation for name, generation in key[0]):
                del self._merged[key]
                self._retire(record)


def _merge(model, sources: list[str], spec: MergeSpec, name: str,
           factor_dtype: Optional[torch.dtype] = None) -> tuple[ac.AdapterConfig, dict]:
    """Engine thread: build the merged adapter `name` in the model (its factors in `factor_dtype`, adapter_dtype's,
    when given, as a loaded adapter's); its config and PEFT-format tensors."""
    try:
        ac.add_weighted_adapter(model, sources, list(spec.weights), name, spec.strategy, density=spec.density,
                                majority_sign_method=spec.majority_sign_method,
                                generator=torch.Generator().manual_seed(DARE_SEED))
        if factor_dtype is not None:
            cast_adapter_factors(model, name, factor_dtype)
        ac.set_adapter(model, [])
        tensors = {k: v.detach().clone() for k, v in ac.get_peft_model_state_dict(model, adapter_name=name).items()}
        return copy.deepcopy(model.peft_config[name]), tensors
    except BaseException:
        if name in getattr(model, "peft_config", {}):
            ac.set_adapter(model, [])
            ac.delete_adapter(model, name)
        raise

