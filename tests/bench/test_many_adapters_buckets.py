"""bench/many_adapters.py reads a window's adapter loads from two scrapes of the load-time histogram: the bucket
holding the median, and the share of loads within the issue's 20 ms (a bucket bound of service/metrics.py)."""

import importlib.util
import pathlib

from service.metrics import LOAD_BUCKETS


def _bench():
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "many_adapters.py"
    spec = importlib.util.spec_from_file_location("many_adapters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cumulative(times_ms: list[float]) -> dict[str, float]:
    """Prometheus' cumulative buckets (le -> count) of these load times."""
    out = {repr(float(bound)): float(sum(t / 1e3 <= bound for t in times_ms)) for bound in LOAD_BUCKETS}
    out["+Inf"] = float(len(times_ms))
    return out


def test_the_share_within_20_ms_and_the_median_bucket_count_only_the_window():
    bench = _bench()
    assert 0.02 in LOAD_BUCKETS
    before = _cumulative([1, 3, 50, 60])                         # loads before the window: not counted
    after = _cumulative([1, 3, 50, 60] + [12, 14, 19, 25, 35, 120])
    assert bench.bucket_share(before, after, 0.02) == 3 / 6
    assert bench.bucket_quantile(before, after) == (6, "<= 20 ms")
    assert bench.bucket_share(after, after, 0.02) is None       # no loads in the window
    assert bench.bucket_share(before, after, 0.021) is None     # not a bucket bound: no share to read
