"""Latency histograms: one format, exact merges, percentiles and CDFs (DESIGN §5, §6).

Every latency in this project is an integer number of **microseconds** recorded
into an HdrHistogram (`hdrhistogram` package, module `hdrh`) with the fixed
parameters below: trackable range 1 µs .. 60 s, 3 significant digits (every
value is kept to within 0.1 %). The load generator (`loadtests/`) writes one
histogram per Locust process; this module reads them back and merges them.

File format (``*.hdr``): one line of text, the histogram in the package's
standard V2 compressed + base64 encoding (`HdrHistogram.encode()`), the same
"histoblob" format HdrHistogram's Java/C tools read. Merging decodes each
file and adds the counts bucket by bucket, so a merge is *exact*: the merged
histogram is the one a single process would have recorded had it seen every
request.

Next to each histogram the load generator writes a JSON sidecar
(``<histogram>.json``, see `loadtests.recorder`) with request/failure counts
and the time window; `load_sidecar` / `merge_sidecars` read and combine them.

Percentiles follow HdrHistogram's convention: the reported value is the
highest value equivalent (within the 3-digit precision) to the recorded one,
so a percentile is never under-reported. The mean is computed from bucket
midpoints.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000  # 60 s
SIGNIFICANT_DIGITS = 3

#: The percentiles reported everywhere (results.csv columns p50_us .. p999_us).
REPORT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)

SIDECAR_SUFFIX = ".json"


def new_histogram() -> HdrHistogram:
    """An empty histogram with the project's parameters (µs, 1 µs .. 60 s, 3 digits)."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def clamp_us(value_us: float) -> tuple[int, bool]:
    """`value_us` rounded to a recordable integer; the flag says it had to be clamped."""
    v = round(value_us)
    if v < LOWEST_US:
        return LOWEST_US, value_us < 0
    if v > HIGHEST_US:
        return HIGHEST_US, True
    return v, False


def encode(hist: HdrHistogram) -> str:
    """The histogram as a base64 "histoblob" (compressed V2 encoding)."""
    blob = hist.encode()
    return blob.decode("ascii") if isinstance(blob, bytes) else str(blob)


def decode(blob: str | bytes) -> HdrHistogram:
    """The histogram a `encode` blob (or a ``.hdr`` file's text) holds."""
    if isinstance(blob, str):
        blob = blob.encode("ascii")
    blob = blob.strip()
    if not blob:
        raise ValueError("empty histogram blob")
    return HdrHistogram.decode(blob)


# The V2 wire format (HdrHistogram's "histoblob"): base64 of an 8-byte header (cookie,
# length) and a zlib stream holding a 40-byte payload header (cookie, payload length,
# normalizing offset, significant digits, lowest, highest, conversion ratio) and one
# LEB128/ZigZag varint of at most 9 bytes per counter.
_OUTER = struct.Struct(">II")
_PAYLOAD = struct.Struct(">IIIIqqd")
_MAX_VARINT_BYTES = 9
#: The largest payload a project histogram can inflate to (every counter at its widest).
MAX_PAYLOAD_BYTES = _PAYLOAD.size + new_histogram().counts_len * _MAX_VARINT_BYTES
#: The longest blob `decode_checked` takes: base64 (4/3) of zlib, which never grows much.
MAX_BLOB_CHARS = 2 * MAX_PAYLOAD_BYTES


def decode_checked(blob: object) -> HdrHistogram:
    """A histogram received from another process, checked before anything is allocated.

    Raises `ValueError` unless `blob` is a base64 histoblob of at most
    `MAX_BLOB_CHARS` whose zlib stream inflates to at most `MAX_PAYLOAD_BYTES`
    and whose parameters are the project's (µs, 1 µs .. 60 s, 3 digits): no
    decompression bomb, no foreign histogram, no exception but `ValueError`.
    """
    if not isinstance(blob, str) or not 0 < len(blob) <= MAX_BLOB_CHARS:
        raise ValueError(f"histogram: not a blob of 1 to {MAX_BLOB_CHARS} characters")
    try:
        raw = base64.b64decode(blob, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"histogram: bad base64: {exc}") from None
    if len(raw) < _OUTER.size:
        raise ValueError("histogram: shorter than its header")
    _cookie, length = _OUTER.unpack_from(raw)
    if length != len(raw) - _OUTER.size:
        raise ValueError("histogram: length field does not match the blob")
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(raw[_OUTER.size :], MAX_PAYLOAD_BYTES)
    except zlib.error as exc:
        raise ValueError(f"histogram: bad zlib stream: {exc}") from None
    if not inflater.eof or inflater.unconsumed_tail or len(payload) < _PAYLOAD.size:
        raise ValueError("histogram: payload truncated or larger than a project histogram")
    _, _, _, digits, lowest, highest, _ = _PAYLOAD.unpack_from(payload)
    if (digits, lowest, highest) != (SIGNIFICANT_DIGITS, LOWEST_US, HIGHEST_US):
        raise ValueError(f"histogram: parameters {(lowest, highest, digits)} are not the project's")
    try:
        return decode(blob)
    except Exception as exc:  # hdrh raises its own exception types for a corrupt payload
        raise ValueError(f"histogram: {exc}") from None


def dump_histogram(hist: HdrHistogram, path: str | Path) -> Path:
    """Write `hist` to `path` (one line, base64 histoblob); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(encode(hist) + "\n", encoding="ascii")
    tmp.replace(path)
    return path


def load_histogram(path: str | Path) -> HdrHistogram:
    """Read one ``.hdr`` file written by `dump_histogram` (or the load generator)."""
    return decode(Path(path).read_text(encoding="ascii"))


def worker_path(path: str | Path, index: int) -> Path:
    """The file a distributed Locust worker `index` writes for base path `path`.

    ``lat.hdr`` -> ``lat.w0.hdr``, ``lat`` -> ``lat.w0``.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.w{index}{path.suffix}")


def histogram_files(path: str | Path) -> list[Path]:
    """Every histogram file the load generator wrote for base path `path`.

    That is `path` itself (a single-process run) and/or the per-worker files
    ``<stem>.w<N><suffix>`` of a distributed run, ordered by worker index.
    Use a fresh directory per run: stale worker files from an earlier run with
    more processes would be picked up too.
    """
    path = Path(path)
    found = [path] if path.is_file() else []
    pattern = re.compile(re.escape(path.stem) + r"\.w(\d+)" + re.escape(path.suffix) + "$")
    workers = []
    if path.parent.is_dir():
        for cand in path.parent.iterdir():
            m = pattern.match(cand.name)
            if m and cand.is_file():
                workers.append((int(m.group(1)), cand))
    found.extend(p for _, p in sorted(workers))
    return found


def merge(hists: Iterable[HdrHistogram]) -> HdrHistogram:
    """Exact sum of histograms (bucket counts added). Inputs are not modified.

    Histograms with other parameters are re-recorded bucket by bucket; values
    beyond 60 s raise `IndexError` (they cannot exist in our own files).
    """
    out = new_histogram()
    for h in hists:
        if h.get_total_count() == 0:
            continue  # hdrh's add() would corrupt min_value with an empty operand
        out.add(h)
    return out


def load_merged(paths: Iterable[str | Path]) -> HdrHistogram:
    """Read and exactly merge every histogram file in `paths`."""
    return merge(load_histogram(p) for p in paths)


def percentiles(hist: HdrHistogram, pcts: Sequence[float] = REPORT_PERCENTILES) -> dict[float, int]:
    """Value (µs) at each percentile; all zeros for an empty histogram."""
    if hist.get_total_count() == 0:
        return {p: 0 for p in pcts}
    values = hist.get_percentile_to_value_dict(list(pcts))
    return {p: int(values[p]) for p in pcts}


def min_value(hist: HdrHistogram) -> int:
    """Smallest recorded value (lowest equivalent), 0 when empty.

    Computed from the counts rather than `hdrh`'s tracked minimum, which merges
    and decodes do not always keep right.
    """
    for item in hist.get_recorded_iterator():
        return int(hist.get_lowest_equivalent_value(item.value_iterated_to))
    return 0


@dataclass(frozen=True)
class LatencySummary:
    """The numbers a results row needs, all in µs (0 when there is no sample)."""

    count: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int
    min_us: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(hist: HdrHistogram) -> LatencySummary:
    """Count, mean, p50/p90/p99/p99.9, max and min of `hist` (µs)."""
    count = hist.get_total_count()
    pct = percentiles(hist)
    return LatencySummary(
        count=count,
        mean_us=round(hist.get_mean_value(), 3) if count else 0.0,
        p50_us=pct[50.0],
        p90_us=pct[90.0],
        p99_us=pct[99.0],
        p999_us=pct[99.9],
        max_us=int(hist.get_max_value()) if count else 0,
        min_us=min_value(hist),
    )


def cdf(hist: HdrHistogram, max_points: int | None = 2000) -> list[tuple[int, float]]:
    """Points ``(value_us, cumulative_fraction)`` for plotting a CDF.

    One point per non-empty bucket: the fraction of requests whose latency is
    at most that bucket's highest equivalent value. The last point's fraction
    is 1.0. With `max_points`, points are thinned evenly (first and last are
    always kept); the curve's shape is unchanged for plotting purposes.
    """
    total = hist.get_total_count()
    if total == 0:
        return []
    points: list[tuple[int, float]] = []
    for item in hist.get_recorded_iterator():
        value = int(hist.get_highest_equivalent_value(item.value_iterated_to))
        points.append((value, item.total_count_to_this_value / total))
    if max_points is not None and len(points) > max_points > 1:
        step = (len(points) - 1) / (max_points - 1)
        keep = sorted({round(i * step) for i in range(max_points)})
        points = [points[i] for i in keep]
    return points


# --- sidecars (counts and time window written next to each histogram) ---------


def sidecar_path(hist_path: str | Path) -> Path:
    """``lat.hdr`` -> ``lat.hdr.json``."""
    hist_path = Path(hist_path)
    return hist_path.with_name(hist_path.name + SIDECAR_SUFFIX)


def load_sidecar(hist_path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of one histogram file."""
    return json.loads(sidecar_path(hist_path).read_text(encoding="utf-8"))


def merge_sidecars(sidecars: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine the per-process sidecars of one run.

    Counts are summed. ``achieved_rps`` is the *sum of the per-process rates*
    (``requests / (last_done - first_send)`` each), which stays right when the
    processes' schedules did not start at exactly the same instant;
    ``window_s`` is the union of their windows. ``intended_rate`` is the
    whole test's offered rate (each process records the same value).
    """
    if not sidecars:
        return {"processes": 0, "requests": 0, "failures": 0, "achieved_rps": 0.0}
    count_keys = (
        "requests",
        "failures",
        "started_total",
        "completed_total",
        "in_flight_at_stop",
        "clamped",
        "failures_status",
        "failures_connection",
    )
    out: dict[str, Any] = {"processes": len(sidecars)}
    for key in count_keys:
        out[key] = sum(int(s.get(key, 0) or 0) for s in sidecars)
    firsts = [s["first_send_ns"] for s in sidecars if s.get("first_send_ns")]
    lasts = [s["last_done_ns"] for s in sidecars if s.get("last_done_ns")]
    out["first_send_ns"] = min(firsts) if firsts else None
    out["last_done_ns"] = max(lasts) if lasts else None
    out["window_s"] = (
        (out["last_done_ns"] - out["first_send_ns"]) / 1e9 if firsts and lasts else 0.0
    )
    out["achieved_rps"] = sum(float(s.get("achieved_rps", 0.0) or 0.0) for s in sidecars)
    rates = {float(s.get("intended_rate", 0.0) or 0.0) for s in sidecars}
    out["intended_rate"] = max(rates) if rates else 0.0
    if len(rates) > 1:
        out["warnings"] = [f"processes disagree on the intended rate: {sorted(rates)}"]
    out["failures_by"] = _sum_counts(s.get("failures_by") or {} for s in sidecars)
    out["timeline"] = merge_timelines(s.get("timeline") for s in sidecars)
    lags = [s.get("send_lag_us", {}) for s in sidecars]
    out["send_lag_p99_us_max"] = max((int(g.get("p99", 0) or 0) for g in lags), default=0)
    out["send_lag_max_us"] = max((int(g.get("max", 0) or 0) for g in lags), default=0)
    return out


def _sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for each in counts:
        for key, n in each.items():
            out[key] = out.get(key, 0) + int(n)
    return out


def merge_timelines(timelines: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Per-process completion timelines as one: counts summed, worst latency the max.

    Buckets are wall-clock 100 ms slots, the same on every process of one machine.
    """
    buckets: dict[int, list[int]] = {}
    bucket_ms = None
    for timeline in timelines:
        if not timeline:
            continue
        if bucket_ms is not None and timeline["bucket_ms"] != bucket_ms:
            raise ValueError(f"timelines of {bucket_ms} and {timeline['bucket_ms']} ms buckets")
        bucket_ms = timeline["bucket_ms"]
        for key, (done, failed, worst) in timeline["buckets"].items():
            into = buckets.setdefault(int(key), [0, 0, 0])
            into[0] += done
            into[1] += failed
            into[2] = max(into[2], worst)
    return {"bucket_ms": bucket_ms, "buckets": {str(k): v for k, v in sorted(buckets.items())}}


def load_run(path: str | Path) -> tuple[HdrHistogram, dict[str, Any]]:
    """Merged histogram and merged sidecar of every process of one run (base path `path`)."""
    files = histogram_files(path)
    if not files:
        raise FileNotFoundError(f"no histogram files for {path}")
    hist = load_merged(files)
    sidecars = [load_sidecar(f) for f in files if sidecar_path(f).is_file()]
    merged = merge_sidecars(sidecars)
    merged["files"] = [str(f) for f in files]
    if sidecars and merged["requests"] - merged["failures"] != hist.get_total_count():
        merged.setdefault("warnings", []).append(
            "histogram count differs from sidecar requests - failures"
        )
    return hist, merged
