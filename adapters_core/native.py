"""Optional C++ CPU kernels, compiled on first use with `torch.utils.cpp_extension` for the CPU at hand.

`NativeKernel(name, sources, env_switch)` builds the sources into one module once per process (from
torch's extension cache, `TORCH_EXTENSIONS_DIR`, after the first time; ~30 s to compile) with -O3,
OpenMP and -march=native, under a name that carries a hash of the CPU's feature flags, so a cache shared
by machines with other CPUs (a mounted home, a copied volume) never hands one machine another's build.
Where the build fails (no C++ compiler or `ninja`, a sandbox), or its environment switch is "0",
`module()` is None and callers use their torch path, which computes the same thing to rounding.
adapters_core's fused LoRA kernel (`sgmv.py`) and the service decoder's kernels (`service/model/cpu_ops.py`)
use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import threading
from typing import Optional

from .cpu_flags import ARCH_SWITCH, cpuinfo_flags_line

log = logging.getLogger("adapters_core")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def cpu_key() -> str:
    """A short hash of the CPU's architecture and feature flags (all of them: a native build uses them all)."""
    flags = platform.machine() + (cpuinfo_flags_line() or platform.processor())
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


class NativeKernel:
    """C++ sources built lazily into one extension module; `module()` is it, or None when unavailable."""

    def __init__(self, name: str, sources: str | list[str], env_switch: str, extra_cflags: tuple = (),
                 arch: str = "native", include_dirs: tuple = ()):
        """`arch` is gcc's -march: "native" (the default, this CPU) or a named level such as "x86-64-v3"
        (AVX2 + FMA) or "x86-64" (SSE2), which tests use to build and check a kernel's other code paths.
        `ADAPTERS_CORE_KERNEL_ARCH` replaces "native" for every kernel of the process: a fleet that shares
        one extension cache across CPU types, or a benchmark of the AVX2 path on an AVX-512 machine."""
        self.name, self.env_switch, self.extra_cflags = name, env_switch, list(extra_cflags)
        self.arch = (os.environ.get(ARCH_SWITCH) or "native") if arch == "native" else arch
        # adapters_core's csrc (spin_pool.h, the kernels' shared worker threads) is always on the path
        self.include_dirs = [CSRC] + list(include_dirs)
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        self._lock = threading.Lock()
        self._module = None
        self._tried = False

    def module(self) -> Optional[object]:
        if self._tried:
            return self._module
        with self._lock:
            if not self._tried:
                self._module = self._build()
                self._tried = True
        return self._module

    @property
    def full_name(self) -> str:
        """The module's name in the extension cache: the kernel's name and the CPU (or -march level)."""
        return f"{self.name}_{cpu_key() if self.arch == 'native' else self.arch.replace('-', '_')}"

    @property
    def enabled(self) -> bool:
        return os.environ.get(self.env_switch, "1") != "0"

    def cached(self) -> bool:
        """A build for this CPU of these sources is in the extension cache (loading it takes a moment, not a
        compile). A build of another checkout's files (its build.ninja names other paths) or one older than a
        source or header here is not: torch's `load` would compile it again (ninja's view, to file times)."""
        from torch.utils.cpp_extension import _get_build_directory
        folder = _get_build_directory(self.full_name, verbose=False)
        try:
            built = os.path.getmtime(os.path.join(folder, f"{self.full_name}.so"))
            with open(os.path.join(folder, "build.ninja"), encoding="utf-8") as handle:
                recipe = handle.read()
            if any(os.path.abspath(source) not in recipe for source in self.sources):
                return False
            return all(os.path.getmtime(path) <= built for path in self._inputs())
        except OSError:
            return False

    def _inputs(self) -> list[str]:
        """The sources and the headers they include with quotes, found beside the including file or on the
        include path, recursively (what a build reads of this tree, as ninja's dependencies list it; a header
        on the path that no source includes does not make a build stale: spin_pool.h's folder holds others)."""
        found: list[str] = []

        def visit(path: str) -> None:
            if path in found:
                return
            found.append(path)
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    names = _QUOTED_INCLUDE.findall(handle.read())
            except OSError:
                return
            for name in names:
                for folder in [os.path.dirname(path)] + self.include_dirs:
                    candidate = os.path.abspath(os.path.join(folder, name))
                    if os.path.isfile(candidate):
                        visit(candidate)
                        break

        for source in self.sources:
            visit(os.path.abspath(source))
        return found

    def _build(self) -> Optional[object]:
        if not self.enabled:
            return None
        try:
            from torch.utils.cpp_extension import load
            return load(self.full_name, self.sources,
                        extra_cflags=["-O3", f"-march={self.arch}", "-fopenmp"] + self.extra_cflags,
                        extra_ldflags=["-fopenmp"], extra_include_paths=self.include_dirs, verbose=False)
        except Exception as exc:  # no compiler, no ninja, a sandbox: the torch path still works
            log.warning("%s: the C++ kernel is unavailable (%s); using torch ops", self.name, exc)
            return None
