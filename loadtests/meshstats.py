"""The numbers of the web UI's Mesh tab, as pure functions - no Locust import.

`loadtests.webui` wires them into Locust; everything here is testable alone:

* worker -> master histogram reports (`report_of`, `parse_report`): a
  worker's cumulative µs histogram of the current test in HdrHistogram's own
  compressed encoding, its failure count and the master's test number;
* `latency_block`: the exact merge of those histograms (or the local
  runner's own) as count, failures, mean, p50, p90, p99, p99.9, max in µs;
* `read_counters`: the stack's counters from the loopback status endpoint
  that ``run_bench.py serve --locust-ui`` runs (`harness.run.webui`), every
  field checked (`loadtests.counters.parse_traffic`), the body size capped;
* `snapshot`: the ``GET /mesh/stats`` document; `table_rows`: the same
  document as the rows of the tab's table (`TABLE` is its structure).
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtests import counters, latency
from loadtests.options import LoadOptions

#: The key of a worker's histogram report in Locust's worker -> master stats message.
REPORT_KEY = "dpumesh_hdr"
#: The tab's key in Locust's web UI (``?tab=mesh``) and its title.
TAB_KEY = "mesh"
TAB_TITLE = "Mesh"
#: A status-endpoint reply larger than this is refused (a reading is a few hundred bytes).
MAX_COUNTERS_BYTES = 1 << 20
#: The tab's columns: (key, title). Keys are snake_case: Locust's UI camel-cases both sides.
TABLE: tuple[tuple[str, str], ...] = (
    ("name", "Source"),
    ("requests", "Requests"),
    ("errors", "Errors (5xx / failures)"),
    ("p50", "p50 (µs)"),
    ("p90", "p90 (µs)"),
    ("p99", "p99 (µs)"),
    ("p999", "p99.9 (µs)"),
    ("mean", "Mean (µs)"),
    ("max", "Max (µs)"),
)


@dataclass(frozen=True)
class WorkerHdr:
    """One worker's latest report: its histogram of test `test` and its failures."""

    test: int
    hist: HdrHistogram
    failures: int


def report_of(test: int, hist: HdrHistogram, failures: int) -> dict[str, Any]:
    """A worker's report for the master (sent with every Locust stats message)."""
    return {"test": test, "hdr": latency.encode(hist), "failures": failures}


def parse_report(doc: Any) -> WorkerHdr:
    """A worker's report received by the master, checked (`ValueError` otherwise)."""
    if not isinstance(doc, dict):
        raise ValueError("report is not an object")
    test, failures = doc.get("test"), doc.get("failures")
    if type(test) is not int or test < 0:
        raise ValueError(f"report: bad test number {test!r:.20}")
    if type(failures) is not int or failures < 0:
        raise ValueError(f"report: bad failure count {failures!r:.20}")
    return WorkerHdr(test, latency.decode_checked(doc.get("hdr")), failures)


def latency_block(parts: Iterable[tuple[HdrHistogram, int]]) -> dict[str, Any]:
    """µs summary of every process's (histogram, failures), merged exactly."""
    parts = list(parts)
    summary = latency.summarize(latency.merge(h for h, _ in parts))
    return {
        **summary.as_dict(),
        "failures": sum(f for _, f in parts),
        "processes": len(parts),
    }


def read_counters(url: str, timeout_s: float) -> counters.Traffic:
    """The stack's counters from the status endpoint at `url` (checked).

    Raises `OSError`, `http.client.HTTPException` or `ValueError`.
    """
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        body = resp.read(MAX_COUNTERS_BYTES + 1)
    finally:
        conn.close()
    if len(body) > MAX_COUNTERS_BYTES:
        raise ValueError(f"counters: reply larger than {MAX_COUNTERS_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"counters: not JSON: {exc}") from None
    if resp.status != 200:
        why = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"counters: HTTP {resp.status}: {str(why)[:200]}")
    return counters.parse_traffic(doc)


def snapshot(
    state: str,
    latency_us: dict[str, Any],
    options: LoadOptions,
    mesh: counters.Traffic | None,
    mesh_error: str | None,
) -> dict[str, Any]:
    """The ``GET /mesh/stats`` document (`mesh`: counts since the test started)."""
    return {
        "state": state,
        "latency_us": latency_us,
        "load": {
            "loop": "open" if options.open_loop else "closed",
            "open_loop_rate": options.open_loop_rate,
            "request_mode": options.request_mode,
        },
        "mesh": None if mesh is None else {k: mesh[k] for k in counters.MESH_FIELDS},
        "mesh_error": mesh_error,
    }


def table_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The tab's rows for a `snapshot`: the load generator's latency, then the mesh's counts."""
    lat, load = doc["latency_us"], doc["load"]
    loop = (
        f"open loop at {load['open_loop_rate']:g} req/s"
        if load["loop"] == "open"
        else "closed loop"
    )
    processes = f"{lat['processes']} process" + ("es" if lat["processes"] != 1 else "")
    rows = [
        {
            "name": f"Locust ({loop}, {load['request_mode']}; {processes})",
            "requests": lat["count"] + lat["failures"],
            "errors": lat["failures"],
            "p50": lat["p50_us"],
            "p90": lat["p90_us"],
            "p99": lat["p99_us"],
            "p999": lat["p999_us"],
            "mean": _round(lat["mean_us"]),
            "max": lat["max_us"],
        }
    ]
    mesh = doc["mesh"]
    if mesh is None:
        return [*rows, {"name": f"mesh counters: {doc['mesh_error']}"}]
    rows.append({"name": "mesh: entry requests (public port)", "requests": mesh["entry_requests"]})
    for svc in sorted(mesh["per_service"]):
        rows.append(
            {
                "name": f"mesh: {svc}",
                "requests": mesh["per_service"][svc],
                "errors": mesh["errors"].get(svc, 0),
            }
        )
    rows.append({"name": "mesh: requests carried between nodes", "requests": mesh["cross_node"]})
    return rows


def _round(value: float) -> float:
    return round(value, 1) if math.isfinite(value) else 0.0
