"""Turns for the device slots (`TurnMixin` of `AdapterRegistry`): popular adapters do not starve rare ones.

When every device slot holds an adapter that requests are using, a request for another adapter waits (`SlotWait`)
until one of them is released by its last request. An adapter with requests always in flight is never released:
under steady traffic on popular adapters a request for a rare one would wait out `adapter_wait_seconds` and be
refused while the popular ones kept taking new requests. As LoRAX's scheduler does (`adapter_cycle_time_s`: active
adapters give way to queued ones after a time slice), a request that has waited `adapter_turn_seconds` for a slot
makes one adapter on the device *yield*: the one with the fewest requests in flight (it drains soonest; the least
recently used among equals), never a pinned one. A yielding adapter takes no new lease: a new request for it waits
for a slot as a request for an adapter off the device does (a caller that cannot wait, a merged adapter's build, is
refused: 429); the requests it already has finish as usual, and its last release frees its slot for the adapter it
yields to. Each adapter that requests wait for past their turn gets one adapter yielding to it; a yield ends when
the yielding adapter leaves the device, or when the one it yields to is on the device or wanted no more (its
requests got in another way, gave up or were refused): its own waiting requests then take leases at once.
`adapter_turn_seconds` 0 turns this off (the order of releases alone decides, as before).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from .errors import Unavailable
from .record import DEVICE, AdapterRecord

log = logging.getLogger("service.registry")


class TurnMixin:
    """Yields of device slots for `AdapterRegistry` (whose `_slots`, records and `turn_seconds` it uses)."""

    def _yield_refusal(self, record: AdapterRecord) -> Optional[Unavailable]:
        """Why a new request for `record` cannot have a lease now: it is on the device and yielding its slot."""
        if record.yielding_to is not None and record.tier == DEVICE:
            return Unavailable(f"adapter {record.name!r} is giving its device slot to adapter {record.yielding_to!r}, "
                               f"whose requests waited {self.turn_seconds:g} s (adapter_turn_seconds) for one; retry "
                               f"later")
        return None

    def _turns_changed(self) -> None:
        """SlotWait's hook (a request starts or stops waiting, or waits past its turn): `_give_turns` once the
        callbacks ready now have run (a request that stops waiting has taken its next lease attempt by then)."""
        if self.turn_seconds and not self._turns_due:
            self._turns_due = True
            asyncio.get_running_loop().call_soon(self._give_turns)

    def _give_turns(self) -> None:
        """Event loop. End the yields no longer needed (the adapter yielded to is on the device, or nothing wants
        it any more: no request waits for it or holds a lease on it) and make one adapter yield to each adapter
        that requests wait for past their turn and that no adapter yields to yet."""
        self._turns_due = False
        residents = list(self._residents())
        ended = False
        for record in residents:
            target = self._records.get(record.yielding_to) if record.yielding_to is not None else None
            if record.yielding_to is not None and (
                    record.tier != DEVICE or record.retired or target is None or target.tier == DEVICE
                    or (target.in_use == 0 and not self._slots.names.get(target.name))):
                record.yielding_to = None
                ended = ended or (record.tier == DEVICE and not record.retired)
        if ended:
            self._slots.changed()                 # the yielding adapters' own waiting requests take leases now
        given = {r.yielding_to for r in residents if r.yielding_to is not None}
        for name in sorted(self._slots.overdue()):
            target = self._records.get(name)
            if name in given or target is None or target.tier == DEVICE:
                continue                          # (requests for an adapter on the device wait for its yield)
            candidates = [r for r in residents if r.tier == DEVICE and r.in_use > 0 and r.yielding_to is None
                          and not r.pinned and not r.busy and not r.retired and r.pending is None]
            victim = min(candidates, key=lambda r: (r.in_use, r.tick), default=None)
            if victim is None:
                return
            victim.yielding_to = name
            log.info("adapter %r yields its device slot to adapter %r, whose requests waited %g s for one (%d "
                     "requests in flight on it)", victim.name, name, self.turn_seconds, victim.in_use)
            self._emit("adapter_yielded", victim.name)
