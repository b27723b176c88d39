"""The adapter registry: every adapter the service knows, from the store on disk through the cpu tier to the
device tier, with LRU eviction, pins, leases, validation and archives.

One noun per module: `registry.py` (`AdapterRegistry`: look-ups, leases, admin verbs), `registration.py`
(uploads, paths, hub ids, store scans and rescans), `tiers.py` (tiers and eviction), `reads.py` (where and how a
load reads its files), `merged.py` (LoRAX's merged adapters, `MergeSpec`), `record.py` (`AdapterRecord`,
`Lease`), `store.py` (`AdapterStore`, the atomic directory), `validation.py` (`AdapterValidator`), `archive.py`
(safe `.zip` / `.tar.gz` extraction), `hub.py`
(fetching from the Hugging Face hub with a deadline) and `errors.py` (`RegistryError` and its HTTP statuses).
The rest of the service imports the names below from `service.registry`.
"""

from .errors import Conflict, GenerationFailed, Invalid, NotFound, RegistryError, TooLarge, Unavailable
from .merged import MergeSpec
from .record import CPU, DEVICE, STORED, TIERS, AdapterRecord, Lease
from .registry import AdapterRegistry

__all__ = [
    "CPU", "DEVICE", "STORED", "TIERS", "AdapterRecord", "AdapterRegistry", "Conflict", "GenerationFailed",
    "Invalid", "Lease", "MergeSpec", "NotFound", "RegistryError", "TooLarge", "Unavailable",
]
