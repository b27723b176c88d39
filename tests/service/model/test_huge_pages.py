"""The base weights collapsed onto transparent huge pages (service/model/huge_pages.py): the ranges asked for
cover every weight the kernels read, a collapse maps the pages huge without changing a value, the served model
gives the same logits and tokens bit for bit afterwards, and the service's setting decides whether it is done.
Where this kernel refuses MADV_COLLAPSE (Linux < 6.1, THP off for the process) the tests that need it skip."""

import contextlib
import ctypes
import errno
import mmap

import pytest
import torch

from service.app import build_state
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model import huge_pages, load_gguf
from service.model.decoder import Decoder
from service.model.huge_pages import collapse, huge_page_bytes, huge_ranges, weight_storages, weights_on_huge_pages
from service.model.quant_linear import QuantEmbedding, QuantGroup, QuantLinear, kernel
from service.settings import Settings

from _model_fixtures import gguf_path

HUGE = huge_page_bytes()


def anon_huge_kib(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


def collapse_or_skip(starts: list[int]) -> huge_pages.CollapseResult:
    result = collapse(starts)
    if result.collapsed == 0:
        pytest.skip(f"this kernel collapses no range into a huge page: {result.describe()}")
    return result


def test_ranges_are_the_huge_pages_each_large_weight_touches_rounded_outwards():
    base = 1000 * HUGE
    storages = [(base + 100, 3 * HUGE),            # starts inside page 1000, ends inside page 1003
                (base + 10 * HUGE, HUGE),           # exactly page 1010
                (base + 20 * HUGE, 4096),           # too small: left alone
                (0, 8 * HUGE)]                      # no address (an empty storage): left alone
    assert huge_ranges(storages, min_bytes=8192) == [base + k * HUGE for k in (0, 1, 2, 3, 10)]
    assert huge_ranges(storages, min_bytes=4096)[-1] == base + 20 * HUGE


@contextlib.contextmanager
def isolated_region(pages: int):
    """A tensor [pages * HUGE / 4] fp32 over an anonymous mapping of its own, starting on a huge-page boundary,
    with a PROT_NONE page on each side so that the kernel merges it with no neighbouring mapping (smaps'
    AnonHugePages is per mapping: a merged neighbour's huge pages would count)."""
    mapping = mmap.mmap(-1, (pages + 2) * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mapping)
    base = ctypes.addressof(anchor)
    start = (base + 4096 + HUGE - 1) // HUGE * HUGE                  # at least one page in front of it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (start - 4096, start + pages * HUGE):
        assert libc.mprotect(guard, 4096, 0) == 0, ctypes.get_errno()            # PROT_NONE
    tensor = torch.frombuffer(mapping, dtype=torch.float32, offset=start - base, count=pages * HUGE // 4)
    try:
        yield tensor
    finally:
        del tensor, anchor
        mapping.close()


def test_a_collapse_maps_huge_pages_and_changes_no_value():
    with isolated_region(3) as values:                                   # [1.5M] fp32: 6 MiB, 3 huge pages
        values.copy_(torch.randn(values.shape))
        expected = values.clone()
        address = values.data_ptr()
        starts = huge_ranges([(address, values.nbytes)])
        assert starts == [address + k * HUGE for k in range(3)]
        if "[always]" not in thp_mode():
            assert anon_huge_kib(address) == 0                           # 4 KiB pages until collapsed
        collapse_or_skip(starts[1:2])
        assert anon_huge_kib(address) >= HUGE // 1024
        result = collapse(starts)                                        # the others too; the done one again
        assert result.ranges == 3 and result.collapsed >= 1
        assert torch.equal(values, expected)


def test_a_kernel_without_madv_collapse_is_reported_not_raised(monkeypatch):
    calls = []

    def refusing(start, length, advice):
        calls.append(advice)
        monkeypatch.setattr(huge_pages.ctypes, "get_errno", lambda: errno.EINVAL)
        return -1

    monkeypatch.setattr(huge_pages, "libc_madvise", lambda: refusing)
    huge_pages.collapse_supported.cache_clear()
    try:
        result = collapse([k * HUGE for k in range(1, 101)])
    finally:
        huge_pages.collapse_supported.cache_clear()
    assert (result.collapsed, result.errors) == (0, {"unsupported": 100})
    assert calls == [huge_pages.MADV_COLLAPSE]                              # only the probe was asked
    assert "0 of 100" in result.describe() and "unsupported x100" in result.describe()


def test_a_refused_range_leaves_the_others_collapsed(monkeypatch):
    asked = []

    def some(start, length, advice):
        asked.append(start)
        if start == 3 * HUGE:
            monkeypatch.setattr(huge_pages.ctypes, "get_errno", lambda: errno.ENOMEM)
            return -1
        return 0

    monkeypatch.setattr(huge_pages, "libc_madvise", lambda: some)
    monkeypatch.setattr(huge_pages, "collapse_supported", lambda: True)
    result = collapse([k * HUGE for k in range(1, 6)])
    assert asked == [k * HUGE for k in range(1, 6)]
    assert (result.ranges, result.collapsed, result.errors) == (5, 4, {"ENOMEM": 1})


@pytest.mark.slow
@pytest.mark.skipif(kernel() is None, reason="the C++ kernel cannot be built here (no compiler)")
def test_the_served_model_is_the_same_bit_for_bit_on_huge_pages():
    loaded = load_gguf(gguf_path(), keep_stored=True)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, max_positions=256, stored=loaded.stored)
    storages = weight_storages(model)
    read = [m.stored.data for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding, QuantGroup))]
    assert read and all(t.untyped_storage().data_ptr() in storages for t in read)  # every weight the kernel reads
    starts = set(huge_ranges(storages.items()))
    assert all(a // HUGE * HUGE in starts for a in (t.data_ptr() for t in read if t.nbytes >= huge_pages.MIN_BYTES))

    prompts = [loaded.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    ids = torch.tensor([prompts[0]])

    def outputs():
        engine = Engine(model, EngineConfig(max_batch_size=2, max_seq_len=64), eos_token_ids=[])
        tokens = [o.token_ids for o in engine.generate(
            [GenerationRequest(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts])]
        with torch.inference_mode():
            return model(ids), tokens

    logits, tokens = outputs()
    result = weights_on_huge_pages(model)
    if result.collapsed == 0:
        pytest.skip(f"this kernel collapses no range into a huge page: {result.describe()}")
    # some weight the kernel reads now sits on huge pages (which ones: those the kernel found room for; beside
    # another busy process, a pytest-xdist worker, the largest range is not always among them)
    assert any(anon_huge_kib(t.data_ptr()) > 0 for t in read if t.nbytes >= huge_pages.MIN_BYTES)
    logits_after, tokens_after = outputs()
    assert torch.equal(logits_after, logits) and tokens_after == tokens


@pytest.mark.parametrize("setting", [True, False])
def test_the_setting_decides_whether_the_service_collapses_the_weights(monkeypatch, tmp_path, setting):
    seen = []
    monkeypatch.setattr("service.app.weights_on_huge_pages", seen.append)
    state = build_state(Settings(weight_huge_pages=setting, adapter_dir=str(tmp_path / "store"), max_seq_len=64,
                                 max_batch_size=2, weight_format="gguf" if kernel() else "dense"))
    assert seen == ([state.engine.model] if setting else [])
    state.registry.close()
