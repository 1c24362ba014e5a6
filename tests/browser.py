"""Pages in a real headless Chromium, over the DevTools Protocol.

`chromium` starts the browser and connects; a `Page` is one tab: navigate,
evaluate, wait for a condition in the page, click and type like a user
(mouse and keyboard input events), screenshot. Every console error, uncaught
exception and log error is collected (Runtime.consoleAPICalled,
Runtime.exceptionThrown, Log.entryAdded: `Page.errors`) and every request the
page makes is recorded (Network.requestWillBeSent: `Page.requests`).

The HTML report (`assert_renders`): no error, every request file:, data:,
blob: or about:, every chart drawn as SVG, and a full-page screenshot next to
the report. Locust's web UI: `tests/test_locust_ui.py`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import stop_process

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

    def wait_for(self, method: str, timeout_s: float, session: str | None = None) -> None:
        """Read events until `method` arrives (it may have arrived already)."""
        deadline = time.monotonic() + timeout_s
        while not any(
            e["method"] == method and session in (None, e.get("sessionId")) for e in self.events
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[DevTools]:
    """A headless Chromium (profile and log under `tmp`), connected; stopped on leaving."""
    profile, log = tmp / "chromium-profile", tmp / "chromium.log"
    port_file = profile / "DevToolsActivePort"
    port_file.unlink(missing_ok=True)  # a profile used before: wait for this browser's port
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            # A terminated Chromium can leave its singleton socket directory in TMPDIR.
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        cdp = DevTools(f"ws://127.0.0.1:{port}{path}")
        try:
            yield cdp
        finally:
            cdp.close()
    finally:
        stop_process(proc)


class Page:
    """One tab of `cdp`'s browser, its console and network watched from the start."""

    def __init__(self, cdp: DevTools, width: int = 1400, height: int = 1000) -> None:
        self.cdp = cdp
        target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable")
        self.width = width
        self.resize(height)
        cdp.events.clear()  # only what the page does from here counts (not about:blank's load)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.cdp.call(method, session=self.session, **params)

    def resize(self, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def navigate(self, url: str, timeout_s: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.cdp.wait_for("Page.loadEventFired", timeout_s=timeout_s, session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of `expression` in the page (a thrown error raises here)."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression[:80]}: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    def wait_until(self, expression: str, timeout_s: float, what: str) -> Any:
        """Evaluate `expression` every 0.2 s until its value is truthy; that value."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} (after {timeout_s:g} s)")
            time.sleep(0.2)
        return value

    def _centre(
        self, selector: str, text: str | None, timeout_s: float = 10
    ) -> tuple[float, float]:
        """Where to click the element: its centre, once its box stopped moving (animations,
        re-renders) and the element (or a child) is what a click there would hit."""
        find = f"""(() => {{ const text = {json.dumps(text)};
            const e = Array.from(document.querySelectorAll({json.dumps(selector)}))
                .find(e => text === null || e.textContent.trim() === text);
            if (!e) return null; e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
            return [x, y, r.width, r.height, e.contains(document.elementFromPoint(x, y))];
            }})()"""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            box = self.evaluate(find)
            if box is not None and box[4] and box == last:
                return box[0], box[1]
            if time.monotonic() > deadline:
                raise LookupError(f"no stable, clickable {selector!r} (text {text!r}): {box}")
            last = box
            time.sleep(0.1)

    def click(self, selector: str, text: str | None = None) -> None:
        """A left click, as a mouse, in the middle of the first element matching `selector`
        (and whose text is `text`, if given)."""
        x, y = self._centre(selector, text)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            press = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **press)

    def type_text(self, selector: str, text: str) -> None:
        """Replace the text of the input matching `selector`, as a keyboard would."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        if full_page:
            height = self.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
            self.resize(min(int(height) + 1, 16_000))  # the whole page in one screenshot
            time.sleep(1.0)  # responsive charts re-lay out after the resize
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    def _events(self) -> list[dict[str, Any]]:
        return [e for e in self.cdp.events if e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Every console error, uncaught exception and error log entry so far."""
        found = []
        for e in self._events():
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value")) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                found.append(f"exception: {text} at {details.get('url')}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return found

    def requests(self) -> list[str]:
        """The URL of every request the page made so far."""
        return [
            e["params"]["request"]["url"]
            for e in self._events()
            if e["method"] == "Network.requestWillBeSent"
        ]


def browse(report: Path, screenshot: Path, tmp: Path) -> PageVisit:
    """Load `report` in headless Chromium, collect errors/requests/charts, save a screenshot."""
    with chromium(tmp) as cdp:
        page = Page(cdp)
        page.navigate(report.resolve().as_uri())
        visit = PageVisit()
        deadline = time.monotonic() + 30
        while True:  # plotly draws asynchronously: wait until every chart has its traces
            visit.charts = json.loads(page.evaluate(CHARTS_STATE))
            drawn = visit.charts and all(c["svgs"] and c["traces"] for c in visit.charts)
            if drawn or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        page.screenshot(screenshot, full_page=True)
        visit.errors, visit.requests = page.errors(), page.requests()
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
