"""Per-process latency recording: µs HdrHistogram + counts sidecar - no Locust import.

One `Recorder` per Locust process (local runner or worker). Users call
`sent` just before a request goes out and `done` when its response (or
error) is complete. At test stop `write` produces:

* ``<path>``: the latency histogram (µs, `loadtests.latency` format): successful
  requests only, latency measured from `schedule.reference_ns` (the intended
  send time in open loop when the send was late);
* ``<path>.json``: the sidecar::

    {"requests": completed requests in the window (successes + failures),
     "failures": ..., "failures_status": ..., "failures_connection": ...,
     "histogram_count": requests - failures,
     "first_send_ns": wall-clock ns of the first recorded request's reference,
     "last_done_ns": wall-clock ns of the last recorded completion,
     "achieved_rps": requests / (last_done - first_send),
     "intended_rate": the whole test's offered rate (0 = closed loop),
     "started_total", "completed_total", "in_flight_at_stop": over the whole test,
        warm-up included. A request counts as started just before the HTTP
        client takes a connection; one killed at test stop may never have left
        the process (geventhttpclient yields while checking the pooled socket),
        so the stack's own count lies between completed_total and
        started_total,
     "send_lag_us": {"p50", "p99", "max", "early"}: how late the generator
        sent open-loop requests relative to their slots (generator health),
     "service_time_hdr": base64 histogram of actual-send -> done (µs),
     "clamped": values outside 1 µs .. 60 s, clamped into range,
     "failures_by": {"<status>" or "connection": count} of the window's failures,
     "timeline": {"bucket_ms": 100, "buckets": {"<wall ns // 100 ms>": [completed,
        failed, worst latency µs]}}: every completion of the whole test (warm-up
        included) by the wall-clock 100 ms it completed in, for fault timelines,
     ... plus metadata (pid, worker index, slots, mode, options)}

Failures (HTTP status >= 400, a JSON-protocol status >= 400 or a malformed
reply, connection errors and timeouts) are counted, not put in the histogram.
Requests whose reference time falls inside the warm-up (``warmup_s`` after the
first request) are counted in ``*_total`` only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests import latency

FAIL_STATUS = "status"
FAIL_CONNECTION = "connection"
TIMELINE_BUCKET_NS = 100_000_000


class Recorder:
    """Latency histogram and counters of one load-generator process."""

    def __init__(
        self,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._clock = clock_ns
        self._wall = wall_ns
        self.reset()

    def reset(self, *, intended_rate: float = 0.0, warmup_s: float = 0.0, **meta: Any) -> None:
        """Start a new test: empty histograms and counters."""
        self.hist = latency.new_histogram()
        self.service = latency.new_histogram()
        self.lag = latency.new_histogram()
        self.intended_rate = float(intended_rate)
        self.warmup_ns = round(warmup_s * 1e9)
        self.meta = dict(meta)
        self.started_total = 0
        self.completed_total = 0
        self.requests = 0
        self.failures = 0
        self.clamped = 0
        self.early = 0
        self.failures_by: dict[str, int] = {}
        self.timeline: dict[int, list[int]] = {}
        self.origin_ns: int | None = None
        self.first_ref_ns: int | None = None
        self.last_done_ns: int | None = None
        self.started_wall_ns = self._wall()
        self._mono_to_wall = self._wall() - self._clock()
        self.dirty = False

    def set_origin(self, origin_ns: int) -> None:
        """The schedule's start (monotonic ns); warm-up counts from here."""
        if self.origin_ns is None:
            self.origin_ns = origin_ns

    def sent(self, intended_ns: int | None, send_ns: int) -> None:
        """A request starts now (`send_ns`); `intended_ns` is its slot (open loop)."""
        self.dirty = True
        self.started_total += 1
        if self.origin_ns is None:
            self.origin_ns = intended_ns if intended_ns is not None else send_ns
        if intended_ns is not None:
            lag_ns = send_ns - intended_ns
            if lag_ns < 0:
                self.early += 1
            value, _ = latency.clamp_us(max(lag_ns, 0) / 1000)
            self.lag.record_value(value)

    def in_window(self, ref_ns: int) -> bool:
        origin = self.origin_ns if self.origin_ns is not None else ref_ns
        return ref_ns >= origin + self.warmup_ns

    def done(
        self,
        ref_ns: int,
        send_ns: int,
        done_ns: int,
        failure: str | None = None,
        status: int = 0,
    ) -> float:
        """A request completed; returns its latency in µs (from `ref_ns`).

        `status` is the HTTP (or JSON-protocol) status of a `FAIL_STATUS` failure.
        """
        self.dirty = True
        self.completed_total += 1
        latency_us = (done_ns - ref_ns) / 1000
        bucket = (done_ns + self._mono_to_wall) // TIMELINE_BUCKET_NS  # warm-up included
        counts = self.timeline.get(bucket)
        if counts is None:
            counts = self.timeline[bucket] = [0, 0, 0]
        counts[0] += 1
        if failure is not None:
            counts[1] += 1
        if latency_us > counts[2]:
            counts[2] = int(latency_us)
        if not self.in_window(ref_ns):
            return latency_us
        self.requests += 1
        if self.first_ref_ns is None or ref_ns < self.first_ref_ns:
            self.first_ref_ns = ref_ns
        if self.last_done_ns is None or done_ns > self.last_done_ns:
            self.last_done_ns = done_ns
        if failure is not None:
            self.failures += 1
            key = FAIL_CONNECTION if failure == FAIL_CONNECTION else str(status)
            self.failures_by[key] = self.failures_by.get(key, 0) + 1
            return latency_us
        value, clamped = latency.clamp_us(latency_us)
        self.clamped += clamped
        self.hist.record_value(value)
        service, _ = latency.clamp_us((done_ns - send_ns) / 1000)
        self.service.record_value(service)
        return latency_us

    def wall(self, mono_ns: int | None) -> int | None:
        return None if mono_ns is None else mono_ns + self._mono_to_wall

    def summary(self) -> dict[str, Any]:
        """The sidecar document (see module docstring)."""
        first = self.wall(self.first_ref_ns)
        last = self.wall(self.last_done_ns)
        window_s = (last - first) / 1e9 if first is not None and last is not None else 0.0
        lag = latency.percentiles(self.lag, (50.0, 99.0))
        unreached = self.failures_by.get(FAIL_CONNECTION, 0)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "failures_status": self.failures - unreached,
            "failures_connection": unreached,
            "histogram_count": self.hist.get_total_count(),
            "first_send_ns": first,
            "last_done_ns": last,
            "window_s": window_s,
            "achieved_rps": self.requests / window_s if window_s > 0 else 0.0,
            "intended_rate": self.intended_rate,
            "warmup_s": self.warmup_ns / 1e9,
            "started_total": self.started_total,
            "completed_total": self.completed_total,
            "in_flight_at_stop": self.started_total - self.completed_total,
            "clamped": self.clamped,
            "failures_by": dict(self.failures_by),
            "timeline": {
                "bucket_ms": TIMELINE_BUCKET_NS // 1_000_000,
                "buckets": {str(k): v for k, v in sorted(self.timeline.items())},
            },
            "send_lag_us": {
                "count": self.lag.get_total_count(),
                "p50": lag[50.0],
                "p99": lag[99.0],
                "max": int(self.lag.get_max_value()) if self.lag.get_total_count() else 0,
                "early": self.early,
            },
            "latency_us": latency.summarize(self.hist).as_dict(),
            "service_time_hdr": latency.encode(self.service),
            "unit": "us",
            "hdr": {
                "lowest_us": latency.LOWEST_US,
                "highest_us": latency.HIGHEST_US,
                "significant_digits": latency.SIGNIFICANT_DIGITS,
            },
            "pid": os.getpid(),
            "started_wall_ns": self.started_wall_ns,
            "written_wall_ns": self._wall(),
            **self.meta,
        }

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """Write the histogram to `path` and the sidecar next to it."""
        hist_path = latency.dump_histogram(self.hist, path)
        side = latency.sidecar_path(hist_path)
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1, sort_keys=True) + "\n", "utf-8")
        tmp.replace(side)
        self.dirty = False
        return hist_path, side
