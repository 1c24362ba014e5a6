"""loadtests.latency: histogram files, exact merges, percentiles, CDFs, sidecars."""

from __future__ import annotations

import json
import random

import pytest

from loadtests import latency


def _hist(values):
    h = latency.new_histogram()
    for v in values:
        assert h.record_value(v)
    return h


def _counts(h):
    return [h.get_count_at_index(i) for i in range(h.counts_len)]


def test_parameters():
    h = latency.new_histogram()
    assert h.lowest_trackable_value == 1
    assert h.highest_trackable_value == 60_000_000
    assert h.significant_figures == 3
    assert h.record_value(60_000_000)
    assert not h.record_value(60_000_000 * 3)  # beyond range: callers clamp


def test_clamp_us():
    assert latency.clamp_us(0.2) == (1, False)
    assert latency.clamp_us(-5) == (1, True)
    assert latency.clamp_us(1234.6) == (1235, False)
    assert latency.clamp_us(61e6) == (60_000_000, True)


def test_encode_decode_roundtrip_is_exact(tmp_path):
    rnd = random.Random(1)
    values = [int(rnd.lognormvariate(7, 1.5)) + 1 for _ in range(5000)]
    h = _hist(values)
    back = latency.decode(latency.encode(h))
    assert back.get_total_count() == 5000
    assert _counts(back) == _counts(h)
    path = latency.dump_histogram(h, tmp_path / "sub" / "a.hdr")
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert _counts(latency.load_histogram(path)) == _counts(h)


def test_merge_is_exact_sum():
    rnd = random.Random(2)
    parts = [[rnd.randint(1, 2_000_000) for _ in range(3000)] for _ in range(3)]
    single = _hist(v for p in parts for v in p)
    hists = [latency.decode(latency.encode(_hist(p))) for p in parts]
    merged = latency.merge(hists)
    assert merged.get_total_count() == sum(h.get_total_count() for h in hists) == 9000
    assert _counts(merged) == _counts(single)
    assert latency.summarize(merged) == latency.summarize(single)
    # inputs untouched
    assert [h.get_total_count() for h in hists] == [3000, 3000, 3000]


def test_merge_with_empty_keeps_min():
    h = _hist([500, 700])
    merged = latency.merge([latency.new_histogram(), h, latency.new_histogram()])
    assert merged.get_total_count() == 2
    s = latency.summarize(merged)
    assert s.min_us == 500
    assert 700 <= s.max_us <= 701


def test_percentiles_and_summary():
    h = _hist(range(1, 10_001))  # 1 .. 10000 µs, once each
    s = latency.summarize(h)
    assert s.count == 10_000
    for got, want in [(s.p50_us, 5000), (s.p90_us, 9000), (s.p99_us, 9900), (s.p999_us, 9990)]:
        assert want <= got <= want * 1.001 + 1  # highest equivalent value, 3 digits
    assert 10_000 <= s.max_us <= 10_010
    assert s.min_us == 1
    assert s.mean_us == pytest.approx(5000.5, rel=1e-3)
    assert s.p50_us <= s.p90_us <= s.p99_us <= s.p999_us <= s.max_us
    assert latency.percentiles(h, (50.0,)) == {50.0: s.p50_us}


def test_summary_of_empty_histogram():
    s = latency.summarize(latency.new_histogram())
    assert s.as_dict() == {
        "count": 0,
        "mean_us": 0.0,
        "p50_us": 0,
        "p90_us": 0,
        "p99_us": 0,
        "p999_us": 0,
        "max_us": 0,
        "min_us": 0,
    }
    assert latency.cdf(latency.new_histogram()) == []


def test_cdf_points():
    rnd = random.Random(3)
    h = _hist(int(rnd.expovariate(1 / 800)) + 1 for _ in range(20_000))
    full = latency.cdf(h, max_points=None)
    values = [v for v, _ in full]
    fractions = [f for _, f in full]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert 0 < fractions[0] < 0.01
    thin = latency.cdf(h, max_points=50)
    assert len(thin) <= 50
    assert thin[0] == full[0] and thin[-1] == full[-1]
    # the fraction at the median value is about one half
    p50 = latency.summarize(h).p50_us
    at = max(f for v, f in full if v <= p50)
    assert 0.49 <= at <= 0.51


def test_worker_paths_and_discovery(tmp_path):
    assert latency.worker_path("x/lat.hdr", 3).as_posix() == "x/lat.w3.hdr"
    assert latency.worker_path("x/lat", 0).as_posix() == "x/lat.w0"
    base = tmp_path / "lat.hdr"
    assert latency.histogram_files(base) == []
    for i in (10, 2, 0):
        latency.dump_histogram(_hist([i + 1]), latency.worker_path(base, i))
    (tmp_path / "lat.w1.hdr.json").write_text("{}")  # a sidecar is not a histogram
    (tmp_path / "other.w5.hdr").write_text("x")
    names = [p.name for p in latency.histogram_files(base)]
    assert names == ["lat.w0.hdr", "lat.w2.hdr", "lat.w10.hdr"]
    latency.dump_histogram(_hist([1]), base)
    assert latency.histogram_files(base)[0] == base


def _sidecar(requests, failures, first, last, rate):
    window = (last - first) / 1e9
    return {
        "requests": requests,
        "failures": failures,
        "started_total": requests + 1,
        "completed_total": requests,
        "in_flight_at_stop": 1,
        "first_send_ns": first,
        "last_done_ns": last,
        "achieved_rps": requests / window,
        "intended_rate": rate,
        "send_lag_us": {"p50": 10, "p99": 100, "max": 1000},
    }


def test_merge_sidecars():
    a = _sidecar(500, 2, 1_000_000_000, 6_000_000_000, 200.0)  # 100 rps
    b = _sidecar(480, 0, 1_200_000_000, 6_000_000_000, 200.0)  # 100 rps
    m = latency.merge_sidecars([a, b])
    assert m["processes"] == 2
    assert m["requests"] == 980 and m["failures"] == 2
    assert m["started_total"] == 982 and m["in_flight_at_stop"] == 2
    assert m["achieved_rps"] == pytest.approx(200.0)
    assert m["window_s"] == pytest.approx(5.0)
    assert m["intended_rate"] == 200.0
    assert m["send_lag_max_us"] == 1000
    assert "warnings" not in m
    assert latency.merge_sidecars([])["requests"] == 0


def test_load_run(tmp_path):
    base = tmp_path / "lat.hdr"
    for i, values in enumerate([[100, 200, 300], [400, 500]]):
        path = latency.dump_histogram(_hist(values), latency.worker_path(base, i))
        side = _sidecar(len(values) + 1, 1, 0, 1_000_000_000, 5.0)
        latency.sidecar_path(path).write_text(json.dumps(side))
    hist, merged = latency.load_run(base)
    assert hist.get_total_count() == 5
    assert merged["requests"] == 7 and merged["failures"] == 2
    assert len(merged["files"]) == 2
    assert "warnings" not in merged
    # a sidecar that disagrees with its histogram is flagged
    latency.sidecar_path(latency.worker_path(base, 1)).write_text(
        json.dumps(_sidecar(9, 0, 0, 1_000_000_000, 5.0))
    )
    assert latency.load_run(base)[1]["warnings"]
    with pytest.raises(FileNotFoundError):
        latency.load_run(tmp_path / "none.hdr")
