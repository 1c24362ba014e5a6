"""The HTML report in a real headless Chromium, over the DevTools Protocol.

Every console error, uncaught exception and log error is collected
(Runtime.consoleAPICalled, Runtime.exceptionThrown, Log.entryAdded), every
request the page makes is recorded (Network.requestWillBeSent) and must be
file:, data:, blob: or about:, and every chart must have drawn its SVG. A
full-page screenshot is written next to the report.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--disable-quic",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
CHARTS_STATE = """JSON.stringify(Array.from(document.querySelectorAll('figure.chart')).map(f => ({
  id: (f.querySelector('.plotly-graph-div') || {}).id || null,
  svgs: f.querySelectorAll('svg.main-svg').length,
  traces: f.querySelectorAll('g.trace').length})))"""


@dataclass
class PageVisit:
    """What Chromium saw while loading a page."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one browser websocket (flat sessions)."""

    def __init__(self, url: str) -> None:
        import websocket  # websocket-client, installed with locust

        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = iter(range(1, 1_000_000))
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float) -> None:
        """Read events until `method` arrives (it may have arrived already)."""
        deadline = time.monotonic() + timeout_s
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def browse(report: Path, screenshot: Path, tmp: Path) -> PageVisit:
    """Load `report` in headless Chromium, collect errors/requests/charts, save a screenshot."""
    profile, log = tmp / "chromium-profile", tmp / "chromium.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            # A terminated Chromium can leave its singleton socket directory in TMPDIR.
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        cdp = DevTools(f"ws://127.0.0.1:{port}{path}")
        try:
            return _visit(cdp, report, screenshot)
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _viewport(cdp: DevTools, session: str, height: int) -> None:
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        session=session,
        width=1400,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )


def _visit(cdp: DevTools, report: Path, screenshot: Path) -> PageVisit:
    target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
    s = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        cdp.call(f"{domain}.enable", session=s)
    _viewport(cdp, s, height=1000)
    cdp.events.clear()  # only what the report's page does counts (not about:blank's load)
    cdp.call("Page.navigate", session=s, url=report.resolve().as_uri())
    cdp.wait_for("Page.loadEventFired", timeout_s=60)
    visit = PageVisit()
    deadline = time.monotonic() + 30
    while True:  # plotly draws asynchronously: wait until every chart has its traces
        state = cdp.call("Runtime.evaluate", session=s, expression=CHARTS_STATE, returnByValue=True)
        visit.charts = json.loads(state["result"]["value"])
        drawn = visit.charts and all(c["svgs"] and c["traces"] for c in visit.charts)
        if drawn or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    height = cdp.call("Page.getLayoutMetrics", session=s)["cssContentSize"]["height"]
    _viewport(cdp, s, height=min(int(height) + 1, 16_000))  # whole page in one screenshot
    time.sleep(1.0)  # responsive charts re-lay out after the resize
    shot = cdp.call("Page.captureScreenshot", session=s, format="png")
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    for e in cdp.events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            visit.errors.append("console: " + " ".join(str(a.get("value")) for a in p["args"]))
        elif e["method"] == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            visit.errors.append(f"exception: {text} at {details.get('url')}")
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            visit.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif e["method"] == "Network.requestWillBeSent":
            visit.requests.append(p["request"]["url"])
    return visit


def assert_renders(report: Path, tmp_path: Path, charts: int) -> None:
    """`report` in headless Chromium: no error, nothing fetched, every chart drawn."""
    visit = browse(report, report.with_suffix(".png"), tmp_path)
    assert visit.errors == []
    assert visit.requests, "the browser recorded no request at all: Network domain not working"
    assert [u for u in visit.requests if not u.startswith(LOCAL_SCHEMES)] == []
    assert len(visit.charts) >= charts
    assert [c for c in visit.charts if not (c["svgs"] and c["traces"])] == []
    assert report.with_suffix(".png").stat().st_size > 50_000
