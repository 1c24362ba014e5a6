"""Locust's web UI with the mesh in it, and Locust's events as the runner's control flow.

Pure parts first: the Mesh tab's numbers (`loadtests.meshstats`: exact
histogram merges, worker reports checked, counter deltas, table rows), the
bounded histogram decoding, the slot assignment and the events file
(`harness.run.loadgen.EventsFile`: malformed lines rejected, never fatal).
Then the whole thing in headless Chromium: ``run_bench.py serve --locust-ui``,
a swarm started from the start form, the Mesh tab filling with percentiles
and the stack's counters, the test stopped from the UI, and a Ctrl-C that
leaves nothing behind; and a Locust killed while serving, which ends the
serve in one line. Real Locust runs of the events and of a distributed Mesh
tab are in `tests/test_locustfile.py`.
"""

from __future__ import annotations

import base64
import json
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import psutil
import pytest
from hdrh.histogram import HdrHistogram

from harness.names import REPO
from harness.ports import free_ports, port_is_free, release_ports
from harness.run.loadgen import EventsFile, parse_event
from loadtests import counters, latency, meshstats
from loadtests.options import LoadOptions
from loadtests.schedule import Assignment, parse_assignment
from tests.browser import LOCAL_SCHEMES, Page, chromium
from tests.conftest import require_external

# --- the Mesh tab's numbers -------------------------------------------------------------


def _hist(values) -> HdrHistogram:
    hist = latency.new_histogram()
    for v in values:
        hist.record_value(v)
    return hist


def test_worker_histograms_merge_exactly_once_each():
    a, b = list(range(100, 5000, 7)), list(range(3000, 90_000, 11))
    block = meshstats.latency_block([(_hist(a), 3), (_hist(b), 4)])
    whole = latency.summarize(_hist(a + b)).as_dict()
    assert {k: block[k] for k in whole} == whole  # the merge is the single-process histogram
    assert (block["failures"], block["processes"]) == (7, 2)
    empty = meshstats.latency_block([])
    assert (empty["count"], empty["p99_us"], empty["processes"]) == (0, 0, 0)


def _blob(payload: bytes) -> str:
    """A histoblob around an arbitrary (already laid out) payload."""
    compressed = zlib.compress(payload)
    return base64.b64encode(struct.pack(">II", 0x1C849304, len(compressed)) + compressed).decode()


def _header(
    digits=latency.SIGNIFICANT_DIGITS, lowest=latency.LOWEST_US, highest=latency.HIGHEST_US
):
    return struct.pack(">IIIIqqd", 0x1C849303, 0, 0, digits, lowest, highest, 1.0)


def test_worker_reports_are_checked():
    hist = _hist([120, 450, 9000])
    report = meshstats.parse_report(meshstats.report_of(4, hist, 2))
    assert (report.test, report.failures, report.hist.get_total_count()) == (4, 2, 3)
    good = meshstats.report_of(4, hist, 2)
    foreign = latency.encode(HdrHistogram(1, 1000, 2))
    bomb = _blob(_header() + bytes(latency.MAX_PAYLOAD_BYTES))  # inflates past any real one
    bad = [
        None,
        [good],
        {**good, "test": -1},
        {**good, "test": True},
        {**good, "failures": "2"},
        {**good, "hdr": 7},
        {**good, "hdr": ""},
        {**good, "hdr": "A" * (latency.MAX_BLOB_CHARS + 1)},
        {**good, "hdr": "not base64!"},
        {**good, "hdr": foreign},
        {**good, "hdr": bomb},
        {**good, "hdr": _blob(_header(digits=2))},
        {**good, "hdr": good["hdr"][:-8]},  # truncated
    ]
    for doc in bad:
        with pytest.raises(ValueError):
            meshstats.parse_report(doc)


def test_corrupted_histograms_raise_value_error_only():
    raw = bytearray(base64.b64decode(latency.encode(_hist(range(1, 2_000_000, 313)))))
    rnd = random.Random(16)
    for _ in range(500):
        mutated = bytearray(raw)
        for _ in range(rnd.randint(1, 3)):
            mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
        try:
            hist = latency.decode_checked(base64.b64encode(bytes(mutated)).decode())
        except ValueError:
            continue  # what a corrupt report must raise, and nothing else
        assert (hist.lowest_trackable_value, hist.highest_trackable_value) == (
            latency.LOWEST_US,
            latency.HIGHEST_US,
        )


def test_counters_since_the_test_start():
    before = counters.parse_traffic(
        {
            "entry_requests": 10,
            "per_service": {"s0": 10, "s1": 30},
            "errors": {"s0": 1, "s1": 0},
            "cross_node": 4,
        }
    )
    after = counters.parse_traffic(
        {
            "entry_requests": 25,
            "per_service": {"s0": 25, "s1": 5},
            "errors": {"s0": 1, "s1": 2},
            "cross_node": 10,
        }
    )
    delta = counters.since(after, before)
    assert delta["entry_requests"] == 15
    assert delta["per_service"] == {"s0": 15, "s1": 5}  # s1 restarted: all 5 are new
    assert delta["errors"] == {"s0": 0, "s1": 2}
    assert delta["cross_node"] == 6
    for doc in (
        [],
        {"entry_requests": -1, "per_service": {}, "errors": {}},
        {"entry_requests": 1.5, "per_service": {}, "errors": {}},
        {"entry_requests": True, "per_service": {}, "errors": {}},
        {"entry_requests": 1, "per_service": {"s0": "1"}, "errors": {}},
        {"entry_requests": 1, "per_service": {"": 1}, "errors": {}},
        {"entry_requests": 1, "per_service": [], "errors": {}},
        {"entry_requests": 1, "per_service": {}},
        {"entry_requests": 1, "per_service": {f"s{i}": 1 for i in range(2000)}, "errors": {}},
        {"entry_requests": 1, "per_service": {}, "errors": {}},  # no cross_node
        {"entry_requests": 1, "per_service": {}, "errors": {}, "cross_node": -2},
    ):
        with pytest.raises(ValueError):
            counters.parse_traffic(doc)


def test_table_rows_show_the_snapshot():
    block = meshstats.latency_block([(_hist([100, 200, 300, 400]), 1)])
    mesh = counters.parse_traffic(
        {
            "entry_requests": 5,
            "per_service": {"s1": 4, "s0": 5},
            "errors": {"s0": 1, "s1": 0},
            "cross_node": 3,
        }
    )
    options = LoadOptions(open_loop_rate=40.0, request_mode="trace")
    doc = meshstats.snapshot("running", block, options, mesh, None)
    assert json.loads(json.dumps(doc)) == doc  # what /mesh/stats answers
    assert doc["load"] == {"loop": "open", "open_loop_rate": 40.0, "request_mode": "trace"}
    rows = meshstats.table_rows(doc)
    assert [r["name"] for r in rows] == [
        "Locust (open loop at 40 req/s, trace; 1 process)",
        "mesh: entry requests (public port)",
        "mesh: s0",
        "mesh: s1",
        "mesh: requests carried between nodes",
    ]
    locust = rows[0]
    assert (locust["requests"], locust["errors"]) == (5, 1)  # 4 recorded + 1 failure
    assert [locust[k] for k in ("p50", "p90", "p99", "p999", "max")] == [
        block[k] for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")
    ]
    assert rows[2] == {"name": "mesh: s0", "requests": 5, "errors": 1}
    assert rows[-1] == {"name": "mesh: requests carried between nodes", "requests": 3}
    keys = {key for key, _ in meshstats.TABLE}
    assert all(set(r) <= keys for r in rows)  # every cell has a column
    down = meshstats.snapshot("ready", block, LoadOptions(), None, "unreadable (refused)")
    assert meshstats.table_rows(down)[-1] == {"name": "mesh counters: unreadable (refused)"}
    assert "closed loop" in meshstats.table_rows(down)[0]["name"]


def test_slot_assignments_are_checked():
    sent = Assignment(1, 2, 7, True)
    assert parse_assignment(sent.as_message()) == sent
    assert parse_assignment({"index": 0, "count": 1, "test": 0}) == Assignment(0, 1, 0, False)
    for data in (
        None,
        {"index": 2, "count": 2, "test": 0},
        {"index": -1, "count": 2, "test": 0},
        {"index": 0, "count": 2, "test": -3},
        {"index": "0", "count": 2, "test": 0},
        {"index": 0, "count": 10**9, "test": 0},
        {"index": 0, "count": 2, "test": 0, "report": "yes"},
    ):
        with pytest.raises(ValueError):
            parse_assignment(data)


# --- the events file ------------------------------------------------------------------------


def _line(event: str, t: float = 1.0, requests: int = 0, failures: int = 0, rps: float = 0.0):
    doc = {"event": event, "t": t, "requests": requests, "failures": failures, "rps": rps}
    return (json.dumps(doc) + "\n").encode()


def test_events_file_takes_complete_valid_lines_only(tmp_path):
    path = tmp_path / "x.events.jsonl"
    events = EventsFile(path)
    assert events.read() == []  # before Locust created it
    start, tick = _line("test_start"), _line("tick", 2.0, 40, 1, 19.5)
    path.write_bytes(start + tick[:10])  # the plugin is mid-write
    assert [e.name for e in events.read()] == ["test_start"]
    malformed = [
        b"not json\n",
        b"[1]\n",
        _line("test_started"),
        _line("tick", requests=-1),
        _line("tick", failures=2.5),
        _line("tick", rps=float("nan")),
        _line("tick", t=-1.0),
        b'{"event": "tick", "t": 1, "requests": 1, "failures": 0}\n',
        b"\xff\xfe\n",
    ]
    with path.open("ab") as fh:
        fh.write(tick[10:] + b"".join(malformed) + _line("test_stopping", 3.0, 60, 1))
    got = events.read()
    assert [(e.name, e.t) for e in got] == [("tick", 2.0), ("test_stopping", 3.0)]
    assert (got[0].live.requests, got[0].live.failures, got[0].live.rps) == (40, 1, 19.5)
    assert events.rejected == len(malformed)
    with path.open("ab") as fh:
        fh.write(b"x" * 5000)  # a line with no end in sight is dropped, not kept growing
    assert events.read() == [] and events.rejected == len(malformed) + 1
    with pytest.raises(ValueError):
        parse_event(b"{" + b" " * 5000 + b"}")


# --- the web UI in headless Chromium ---------------------------------------------------------

RATE = 40  # req/s set in the start form: the Mesh tab must say so
MESH_ROWS = """Array.from(document.querySelectorAll('table tr')).map(
  r => Array.from(r.cells).map(c => c.textContent.trim()))"""


class Served:
    """``run_bench.py serve --mesh nomesh --locust-ui`` on free ports, up to both URLs.

    Leaving the block stops serve if it still runs, then checks that every
    process it started is gone and both ports are free again.
    """

    def __init__(self, run_dir: Path) -> None:
        self.stack_port, self.ui_port = free_ports(2)
        release_ports([self.stack_port, self.ui_port])  # handed to serve, which binds them
        self.ui_url = f"http://127.0.0.1:{self.ui_port}"
        self.run_dir = run_dir
        self.popen = subprocess.Popen(
            [
                *(sys.executable, "run_bench.py", "serve", "--mesh", "nomesh", "--locust-ui"),
                *("--locust-port", str(self.ui_port), "--port", str(self.stack_port)),
                *("--scale", "0.01", "--run-dir", str(run_dir)),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.tree: list[psutil.Process] = []

    def __enter__(self) -> Served:
        try:
            self.lines = self._until_urls(timeout_s=45)
            self.tree = psutil.Process(self.popen.pid).children(recursive=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _until_urls(self, timeout_s: float) -> list[str]:
        """serve's stdout lines until both URLs are printed (the stack's, then Locust's)."""
        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("locust web UI at ") for line in lines):
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(timeout=left), f"no URLs from serve: {lines}"
            line = self.popen.stdout.readline()
            assert line, f"serve ended: {lines}"
            lines.append(line.strip())
        return lines

    def finish(self, sig: signal.Signals | None, timeout_s: float = 30) -> tuple[int, list[str]]:
        """Send `sig` (None: none) and wait: serve's exit status and its remaining output."""
        if sig is not None:
            self.popen.send_signal(sig)
        out, _ = self.popen.communicate(timeout=timeout_s)
        return self.popen.returncode, out.splitlines()

    def __exit__(self, *_exc: object) -> None:
        if self.popen.poll() is None:
            self.finish(signal.SIGTERM)  # serve tears everything down on SIGTERM too
        assert self.tree and not [p for p in self.tree if _alive(p)], "left behind"
        assert port_is_free(self.stack_port) and port_is_free(self.ui_port)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _mesh_table_filled(rows: list[list[str]]) -> bool:
    """The Locust row has percentiles and every mesh service row counted requests."""
    named = {row[0]: row for row in rows if row}
    locust = next((r for n, r in named.items() if n.startswith("Locust (")), None)
    services = [r for n, r in named.items() if n.startswith("mesh: s")]
    return bool(locust and locust[3].isdigit() and int(locust[3]) > 0 and services) and all(
        r[1].isdigit() and int(r[1]) > 0 for r in services
    )


@pytest.mark.browser
@pytest.mark.e2e
def test_mesh_tab_in_chromium(tmp_path: Path) -> None:
    """serve --locust-ui: start from the form, the Mesh tab fills, stop, Ctrl-C: nothing left."""
    require_external(shutil.which("chromium") is not None, "chromium")
    with Served(tmp_path / "run") as served:
        ui_url = served.ui_url
        assert any(f"ready at http://127.0.0.1:{served.stack_port}" in ln for ln in served.lines)
        assert served.lines[-1] == f"locust web UI at {ui_url}"
        with chromium(tmp_path) as cdp:
            page = Page(cdp)
            page.navigate(ui_url + "/")
            page.wait_until("!!document.querySelector('form button[type=submit]')", 20, "form")
            page.click("button", "Custom parameters")  # our options' accordion
            page.type_text("input[name=openLoopRate]", str(RATE))
            typed = page.evaluate("document.querySelector('input[name=openLoopRate]').value")
            assert typed == str(RATE)
            page.click("form button[type=submit]")
            page.wait_until(
                "Array.from(document.querySelectorAll('[role=tab]'))"
                ".some(t => t.textContent.trim() === 'Mesh')",
                20,
                "the tabs of a running test",
            )
            page.click("[role=tab]", "Mesh")
            deadline = time.monotonic() + 30
            while not _mesh_table_filled(rows := page.evaluate(MESH_ROWS)):
                assert time.monotonic() < deadline, f"the Mesh tab did not fill: {rows}"
                time.sleep(0.2)
            page.screenshot(tmp_path / "mesh-tab.png")
            with urllib.request.urlopen(ui_url + "/mesh/stats", timeout=10) as resp:
                doc = json.load(resp)
            page.click("button", "Stop")
            page.wait_until(
                "document.body.textContent.toLowerCase().includes('stopped')", 20, "stopped"
            )
            errors = page.errors()
            requests = page.requests()
        header, locust, entry = rows[0], rows[1], rows[2]
        assert header[:4] == ["Source", "Requests", "Errors (5xx / failures)", "p50 (µs)"]
        assert locust[0].startswith(f"Locust (open loop at {RATE} req/s, get;")
        p50, p90, p99, p999 = (int(c) for c in locust[3:7])
        assert 0 < p50 <= p90 <= p99 <= p999 <= int(locust[8])
        assert entry[0] == "mesh: entry requests (public port)" and int(entry[1]) > 0
        assert doc["load"] == {"loop": "open", "open_loop_rate": RATE, "request_mode": "get"}
        assert doc["mesh_error"] is None and set(doc["mesh"]["per_service"]) == {"s0", "s1", "s2"}
        assert errors == []
        assert [u for u in requests if not u.startswith((ui_url, *LOCAL_SCHEMES))] == []
        events = [e.name for e in EventsFile(served.run_dir / "locust.events.jsonl").read()]
        assert events[0] == "test_start" and events[-2:] == ["test_stopping", "test_stop"]
        status, out = served.finish(signal.SIGINT)
        assert status == 0, out
        assert out[-2:] == ["stopping the nomesh stack", "stopped"]


@pytest.mark.e2e
def test_a_locust_that_dies_ends_the_serve_in_one_line(tmp_path: Path) -> None:
    """Locust killed while serving: the stack is stopped, one error line, exit status 1."""
    with Served(tmp_path / "run") as served:
        (locust,) = [p for p in served.tree if "locust" in p.cmdline()[1:3]]
        locust.kill()
        status, out = served.finish(None)
        assert status == 1, out
        assert out[-2:] == [
            "stopping the nomesh stack",
            "error: Locust's web UI ended (signal 9) while serving; "
            f"its log: {(served.run_dir / 'locust.log').resolve()}",
        ]
