"""The service's C++ CPU kernels, built together at install (`make install` runs `python -m service.kernels`).

Three extensions, each compiled once per CPU feature set into torch's extension cache (see
`adapters_core.native`): adapters_core's fused LoRA (`sgmv`), the decoder's small ops (`cpu_ops`) and the
stored-weight matmul (`quant_linear`). Building them at install means the first `make serve` only loads
them; `adapter-serve` says "building CPU kernels (once)" when it must still compile one. Without a compiler
the build fails softly: the service runs on torch ops and logs why (`ADAPTERS_CORE_SGMV`,
`ADAPTER_SERVE_CPU_KERNELS`, `ADAPTER_SERVE_QUANT_KERNEL` set to 0 choose that path on purpose).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from adapters_core import sgmv
from adapters_core.native import NativeKernel

from .model import cpu_ops, quant_linear


def native_kernels() -> list[NativeKernel]:
    return [sgmv._KERNEL, cpu_ops._KERNEL, quant_linear.native_kernel()]


def uncached() -> list[str]:
    """Names of the enabled kernels that this start would have to compile."""
    return [k.name for k in native_kernels() if k.enabled and not k.cached()]


def build_all(report: Callable[[str], None] = print) -> bool:
    """Build (or load) every kernel; True when all are available."""
    ok = True
    for k in native_kernels():
        if not k.enabled:
            report(f"{k.name}: disabled by {k.env_switch}=0")
            continue
        start = time.monotonic()
        ready = k.module() is not None
        ok = ok and ready
        report(f"{k.name}: {'ready' if ready else 'UNAVAILABLE, torch ops will be used'} "
               f"({time.monotonic() - start:.0f} s)")
    return ok


if __name__ == "__main__":
    print("building CPU kernels (once per CPU type; ~1-2 min on 2 cores)", flush=True)
    build_all()
    sys.exit(0)                             # a machine without a compiler still installs; the service says so
