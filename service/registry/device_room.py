"""Room in the device tier (`DeviceRoomMixin` of `AdapterRegistry`): the adapters a load makes leave, chosen on
the event loop before it goes in. Least recently used ones until the new adapter fits `max_device_adapters` and
`adapter_memory_budget` (never pinned, in use or busy), and the ones it cannot share the model with (a
`modules_to_save` copy of a module the other adapts: `ac.conflicting_adapters`). Their tier drops at once; they
leave the model in the engine call (or eviction) that follows, and `_settle_victims` puts back those whose
removal failed."""

from __future__ import annotations

import asyncio

import adapters_core as ac

from .errors import Conflict, Unavailable
from .record import CPU, DEVICE, STORED, AdapterRecord
from .tiers import _evictable_first


class DeviceRoomMixin:
    """Choosing the victims of a load, for `AdapterRegistry` (whose state and plumbing it uses)."""

    def _take_conflicting(self, record: AdapterRecord) -> list[AdapterRecord]:
        """The resident adapters `record` cannot share the model with (`ac.conflicting_adapters`: one keeps a
        `modules_to_save` copy of a module the other adapts); they leave as `_take_device_room`'s victims do,
        in the same engine call that adds `record`. Unavailable (429) while one is in use, Conflict (409) when
        one is pinned: the two are never in the model together, so a request for either waits its turn."""
        holders = ac.conflicting_adapters(self.model, record.config)
        if not holders:
            return []
        holding = [r for r in self._residents() if r.model_name in holders and r is not record]
        if len(holding) < len(holders) or any(r.tier != DEVICE or r.retired for r in holding):
            # one is leaving the model already (another load's victim, a deleted adapter): its turn ends soon
            raise Unavailable(f"cannot load adapter {record.name!r} now: an adapter holding a module it needs the "
                              f"other way (a modules_to_save copy beside a LoRA / IA3 on one module) is leaving "
                              f"the model; retry later")
        victims = holding
        pinned = next((r for r in victims if r.pinned), None)
        if pinned is not None:
            raise Conflict(f"cannot load adapter {record.name!r}: adapter {pinned.name!r} is pinned and holds a module "
                           f"it needs the other way (a modules_to_save copy beside a LoRA / IA3 on one module); "
                           f"unpin it to serve both in turn")
        busy = next((r for r in victims if r.in_use or r.busy), None)
        if busy is not None:
            raise Unavailable(f"cannot load adapter {record.name!r} now: adapter {busy.name!r}, in use, holds a module "
                              f"it needs the other way (a modules_to_save copy beside a LoRA / IA3 on one module; "
                              f"the two take turns); retry later")
        for victim in victims:         # (the caller says they were evicted once the load's room is taken too)
            _leaving(victim)
        return victims

    def _room_for(self, record: AdapterRecord, size: int) -> list[AdapterRecord] | Unavailable:
        """The device-tier adapters that would leave so that `record`, `size` bytes, fits both
        `max_device_adapters` and `adapter_memory_budget` (least recently used first, deleted ones before them,
        never pinned, in use or busy), or the Unavailable to raise when not enough can go. Changes nothing."""
        on_device = [r for r in self._residents() if r.tier == DEVICE]     # (one pass over every record)
        candidates = _evictable_first(r for r in on_device if r is not record)
        victims: list[AdapterRecord] = []
        count, used = len(on_device), sum(r.memory_size for r in on_device)
        # (an adapter larger than the whole budget still loads once the device tier is empty)
        while count >= self.max_device_adapters or (count > 0 and used + size > self.memory_budget):
            if len(victims) == len(candidates):
                if count >= self.max_device_adapters:
                    return Unavailable(
                        f"cannot load adapter {record.name!r}: all {self.max_device_adapters} device slots "
                        f"(max_device_adapters={self.max_device_adapters}) hold pinned or in-use adapters; retry later")
                return Unavailable(
                    f"cannot load adapter {record.name!r} ({size} bytes): the device tier's memory "
                    f"(adapter_memory_budget={self.memory_budget} bytes, {used} in use) holds pinned or in-use "
                    f"adapters; retry later")
            victim = candidates[len(victims)]
            victims.append(victim)
            count, used = count - 1, used - victim.memory_size
        return victims

    def _take_device_room(self, record: AdapterRecord) -> list[AdapterRecord]:
        """The device-tier adapters to remove so that `record` fits (`_room_for`); their tier drops at once, the
        engine removes them in the same call that adds `record`. Unavailable when not enough can go."""
        victims = self._room_for(record, record.memory_size)
        if isinstance(victims, Unavailable):
            raise victims
        for victim in victims:
            _leaving(victim)
            if not victim.retired:
                self._emit("adapter_evicted", victim.name, DEVICE)
        return victims

    def _settle_victims(self, victims: list[AdapterRecord], failed: list[str]) -> None:
        """After the engine call: a victim whose removal failed (or never ran) is on the device again; loads of
        the others, which waited for their removal, go on, and so do requests waiting for a slot."""
        if any(v.model_name not in failed for v in victims):      # (a refused load's victims all stay)
            self._slots.changed()
        for victim in victims:
            victim.busy = False
            if victim.pending is not None:
                victim.pending.set_result(None)
                victim.pending = None
            if victim.model_name in failed:
                victim.tier = DEVICE


def _leaving(victim: AdapterRecord) -> None:
    """A victim's tier drops now (an adapter whose only copy is the model's goes back to the store); it leaves
    the model in the engine call (or eviction) that follows, and a new load of it waits for that (`pending`)."""
    victim.tier, victim.busy = (STORED if victim.tensors is None else CPU), True
    victim.pending = asyncio.get_running_loop().create_future()

