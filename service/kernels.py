"""The service's C++ CPU kernels, built together at install (`make install` runs `python -m service.kernels`).

Three extensions, each compiled once per CPU feature set into torch's extension cache (see
`adapters_core.native`): adapters_core's fused LoRA (`sgmv`), the decoder's small ops (`cpu_ops`) and the
stored-weight matmul (`quant_linear`). Building them at install means the first `make serve` only loads
them; `adapter-serve` says "building CPU kernels (once)" when it must still compile one. Without a compiler
the build fails softly: the service runs on torch ops and logs why (`ADAPTERS_CORE_SGMV`,
`ADAPTER_SERVE_CPU_KERNELS`, `ADAPTER_SERVE_QUANT_KERNEL` set to 0 choose that path on purpose).
`python -m service.kernels` compiles the ones missing from the cache side by side, one process per core (on the
2-core Zen 4: 1 min 47 s against 2 min 26 s one after another; cpu_ops's seven sources already compile in
parallel under ninja). `--arches x86-64-v3,x86-64` builds the other -march levels of the two kernels that the
tests check on every path this CPU runs (`make test` does, before the suite, so that no test waits for a
compiler: the four took 65 s side by side, against ~140 s one after another inside the suite).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

from adapters_core import sgmv
from adapters_core.cpu_flags import is_x86_64
from adapters_core.native import NativeKernel

from .model import cpu_ops, quant_linear

# the kernels with builds for other -march levels than native, which the tests check (test_adapter_scales.py,
# test_quant_matmul.py, test_quant_interleaved.py); cpu_ops has one build, which ADAPTERS_CORE_KERNEL_ARCH picks
_ARCH_KERNELS: tuple[Callable[[str], NativeKernel], ...] = (sgmv.native_kernel, quant_linear.native_kernel)


def native_kernels() -> list[NativeKernel]:
    return [sgmv._KERNEL, cpu_ops._KERNEL, quant_linear.native_kernel()]


def arch_kernels(arches: list[str]) -> list[NativeKernel]:
    """The builds for the -march levels `arches` of the kernels that have them."""
    return [make(arch) for arch in arches for make in _ARCH_KERNELS]


def uncached() -> list[str]:
    """Names of the enabled kernels that this start would have to compile."""
    return [k.name for k in native_kernels() if k.enabled and not k.cached()]


def _kernels(arches: Optional[list[str]]) -> list[NativeKernel]:
    return native_kernels() if arches is None else arch_kernels(arches)


def _build(arches: Optional[list[str]], index: int) -> float:
    """Build (or load) kernel `index` of `_kernels(arches)` in this process (a worker's); returns the seconds."""
    start = time.monotonic()
    _kernels(arches)[index].module()
    return time.monotonic() - start


def build_all(report: Callable[[str], None] = print, arches: Optional[list[str]] = None, workers: int = 0) -> bool:
    """Build (or load) the native kernels, or with `arches` the tested kernels' builds for those -march levels;
    True when all are available. Those not yet cached compile in `workers` processes side by side (0: one per
    core), then every one loads here."""
    kernels = _kernels(arches)
    enabled = [i for i, k in enumerate(kernels) if k.enabled]
    for k in kernels:
        if not k.enabled:
            report(f"{k.name}: disabled by {k.env_switch}=0")
    to_compile = [i for i in enabled if not kernels[i].cached()]
    workers = min(len(to_compile), workers or os.cpu_count() or 1)
    compiled: dict[int, float] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(_build, arches, i) for i in to_compile}
            for i, future in futures.items():
                try:
                    compiled[i] = future.result()
                except Exception as exc:                # a worker that died: this process builds it below
                    report(f"{kernels[i].full_name}: the build worker failed ({exc}); building here")
    ok = True
    for i in enabled:
        start = time.monotonic()
        ready = kernels[i].module() is not None              # compiled by a worker: loads from the cache
        ok = ok and ready
        took = compiled.get(i, time.monotonic() - start)
        report(f"{kernels[i].full_name}: {'ready' if ready else 'UNAVAILABLE, torch ops will be used'} "
               f"({took:.0f} s)")
    return ok


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build the CPU kernels into torch's extension cache.")
    parser.add_argument("--arches", default="", help="comma-separated -march levels (e.g. x86-64-v3,x86-64) to "
                        "build the tested kernels for, instead of the native build the service uses")
    args = parser.parse_args(argv)
    arches = [a for a in args.arches.split(",") if a]
    if arches:
        if not is_x86_64():
            print(f"the -march levels {', '.join(arches)} are x86-64 ones; this machine is not")
            return
        print(f"building the tested kernels for {', '.join(arches)} (once per source change)", flush=True)
        build_all(arches=arches)
    else:
        print("building CPU kernels (once per CPU type; ~2 min on 2 cores)", flush=True)
        build_all()


if __name__ == "__main__":
    main()
    sys.exit(0)                             # a machine without a compiler still installs; the service says so
