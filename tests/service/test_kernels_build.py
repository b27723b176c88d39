"""`python -m service.kernels`: the kernels build side by side in worker processes, only those missing from the
extension cache, and each is then loaded in the calling process; `--arches` builds the other -march levels of
the kernels the tests check. (The workers here load builds that are already cached, as a compile would leave
them: compiling for real takes minutes, which `make install` and `make test` spend once.)"""

import os
import time

import pytest

from adapters_core.cpu_flags import is_x86_64
from adapters_core.native import NativeKernel
from service import kernels

pytestmark = pytest.mark.skipif(not is_x86_64(), reason="-march levels of x86-64")
ARCHES = ["x86-64-v3", "x86-64"]


def available(arches):
    built = kernels.arch_kernels(arches)
    if not all(k.enabled and k.module() is not None for k in built):
        pytest.skip("the C++ kernels cannot be built here (no compiler)")
    return built


def test_cached_builds_load_without_any_worker(monkeypatch):
    available(ARCHES)
    monkeypatch.setattr(kernels, "ProcessPoolExecutor", None)        # calling it would raise
    lines = []
    assert kernels.build_all(lines.append, arches=ARCHES)
    assert sorted(line.split(":")[0] for line in lines) == sorted(
        f"{name}_{arch.replace('-', '_')}" for arch in ARCHES for name in ("adapters_core_sgmv",
                                                                          "adapter_serve_quant_matmul"))
    assert all("ready" in line for line in lines)


def test_uncached_builds_go_to_worker_processes_side_by_side(monkeypatch):
    built = available(ARCHES)
    missing = {k.full_name for k in built[:2]}
    monkeypatch.setattr(NativeKernel, "cached", lambda self: self.full_name not in missing)
    pools = []
    real = kernels.ProcessPoolExecutor

    def counting(workers, **options):
        pools.append(workers)
        return real(workers, **options)

    monkeypatch.setattr(kernels, "ProcessPoolExecutor", counting)
    lines = []
    assert kernels.build_all(lines.append, arches=ARCHES, workers=2)
    assert pools == [2] and len(lines) == len(built) and all("ready" in line for line in lines)


def test_the_arch_builds_are_the_ones_the_tests_use():
    from adapters_core import sgmv
    from service.model import quant_linear

    assert kernels.arch_kernels(["x86-64-v3"]) == [sgmv.native_kernel("x86-64-v3"),
                                                   quant_linear.native_kernel("x86-64-v3")]
    assert [k.full_name for k in kernels.arch_kernels(["x86-64"])] == [
        "adapters_core_sgmv_x86_64", "adapter_serve_quant_matmul_x86_64"]


def test_a_build_of_other_files_or_older_than_a_source_is_not_cached(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source, header, inner = tmp_path / "src" / "k.cpp", tmp_path / "src" / "k.h", tmp_path / "src" / "inner.h"
    other = tmp_path / "src" / "other.h"                 # on the path, included by nothing
    source.parent.mkdir()
    source.write_text('#include "k.h"\n#include <vector>\nint k;')
    header.write_text('#pragma once\n#include "inner.h"')
    inner.write_text("#pragma once")
    other.write_text("#pragma once")
    kernel = NativeKernel("probe_kernel", str(source), "PROBE_KERNEL_SWITCH", arch="x86-64")
    assert not kernel.cached()                                   # nothing built
    folder = _get_build_directory(kernel.full_name, verbose=False)
    library = f"{folder}/{kernel.full_name}.so"
    open(library, "w").close()
    with open(f"{folder}/build.ninja", "w") as recipe:
        recipe.write("build k.o: compile /elsewhere/src/k.cpp\n")
    assert not kernel.cached()                                   # another checkout's build
    with open(f"{folder}/build.ninja", "w") as recipe:
        recipe.write(f"build k.o: compile {source}\n")
    now = time.time()                    # (adapters_core's own headers are on every kernel's include path)
    for path in (source, header, inner, other):
        os.utime(path, (now - 100, now - 100))
    os.utime(library, (now, now))
    assert kernel.cached()
    os.utime(other, (now + 100, now + 100))                      # a header no source includes: still cached
    assert kernel.cached()
    os.utime(inner, (now + 100, now + 100))                      # one it includes through another changed
    assert not kernel.cached()
    os.utime(inner, (now - 100, now - 100))
    os.utime(header, (now + 100, now + 100))                     # a header changed after the build
    assert not kernel.cached()
