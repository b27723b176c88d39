"""The CPU's instruction-set flags as this process may use them. They come from /proc/cpuinfo; where
`ADAPTERS_CORE_KERNEL_ARCH` names an x86-64 micro-architecture level (x86-64, x86-64-v2, -v3, -v4), the vector
extensions above that level are left out, so that every choice made from the flags (the default dtype, which
kernel build a test expects) agrees with the kernels built for that level. On an AVX-512 machine,
`ADAPTERS_CORE_KERNEL_ARCH=x86-64-v3` with torch held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`,
`ONEDNN_MAX_CPU_ISA=AVX2`, as `make test-avx2-paths` sets them) gives the process an AVX2 + FMA machine's view:
bf16 is then not fast, and the default dtype is float32. Other -march names (znver4, haswell...) mask nothing."""

from __future__ import annotations

import os
import platform

ARCH_SWITCH = "ADAPTERS_CORE_KERNEL_ARCH"

# the vector-extension flags (as /proc/cpuinfo spells them) each x86-64 level allows; gcc's -march levels
_LEVEL_1 = frozenset({"sse", "sse2"})
_LEVEL_2 = _LEVEL_1 | {"pni", "ssse3", "sse4_1", "sse4_2"}            # (pni: SSE3)
_LEVEL_3 = _LEVEL_2 | {"avx", "avx2", "fma", "f16c"}
_LEVEL_4 = _LEVEL_3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
LEVELS = {"x86-64": _LEVEL_1, "x86-64-v2": _LEVEL_2, "x86-64-v3": _LEVEL_3, "x86-64-v4": _LEVEL_4}
# flags a level governs: those not in its set are left out (sse4a, avx512_bf16, amx_tile, avx_vnni, fma4...)
_GOVERNED_PREFIXES = ("sse", "ssse", "pni", "avx", "amx", "fma", "f16c")


def is_x86_64() -> bool:
    """This machine is an x86-64 one (the -march levels above name its builds)."""
    return platform.machine() in ("x86_64", "AMD64")


def cpuinfo_flags_line() -> str:
    """The first "flags" (x86) or "Features" (ARM) line of /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_flags(arch: str | None = None) -> frozenset[str]:
    """The flags this process may use: the CPU's, less the vector extensions above `arch`'s x86-64 level
    (default: `ADAPTERS_CORE_KERNEL_ARCH`; unset, "native" or another name: nothing left out)."""
    line = cpuinfo_flags_line()
    flags = frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()
    allowed = LEVELS.get(os.environ.get(ARCH_SWITCH, "") if arch is None else arch)
    if allowed is None or not is_x86_64():
        return flags
    return frozenset(f for f in flags if f in allowed or not f.startswith(_GOVERNED_PREFIXES))
