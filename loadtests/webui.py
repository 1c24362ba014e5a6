"""The ``Mesh`` tab of Locust's web UI: µs HDR percentiles and the stack's own counters.

`loadtests.locustfile` calls `install` from its ``init`` listener whenever
the process has a web UI (a local runner or a master), so a by-hand
``locust -f loadtests/locustfile.py`` gets the tab too. It adds, through
Locust 2.x's web UI extension points:

* ``GET /mesh/stats``: the `loadtests.meshstats.snapshot` document (the
  running test's µs percentiles, the open-loop rate and request mode in
  effect, the stack's counters since the test started);
* a tab (``template_args["extended_tabs"]``) whose table
  (``extended_tables``) gets its rows from the ``extended_stats`` field this
  module adds to every ``/stats/requests`` reply, the JSON the UI polls while
  a test runs: one snapshot per poll, the same numbers as ``/mesh/stats``.

Latency: a local runner shows its own `LoadState.recorder`. A master runs no
users: each worker adds its cumulative histogram of the current test to its
Locust stats message (``report_to_master``, every 3 s, only when the master
asked for it in the slot assignment); the master keeps the latest per worker
(so nothing is counted twice), drops reports of other tests, checks every
field (`meshstats.parse_report`, size-capped and bounded decoding) and merges
them exactly.

Counters: with ``--mesh-status-url`` (``run_bench.py serve --locust-ui`` sets
it) the tab reads the stack's counters at each test start (the baseline)
and at each poll, and shows `loadtests.counters.since`; a reading that fails
or times out (1 s) shows as an error in the tab, never as an HTTP 500.
"""

from __future__ import annotations

import http.client
import json
import logging
from typing import Any

import gevent
from flask import Response, jsonify, request
from locust.runners import MasterRunner

from loadtests import counters, meshstats

logger = logging.getLogger("loadtests")

STATS_ROUTE = "/mesh/stats"
#: Locust's endpoint name of ``/stats/requests`` (blueprint ``locust``), whose reply the UI polls.
POLLED_ENDPOINT = "locust.request_stats"
READ_TIMEOUT_S = 1.0
#: Workers whose reports a master keeps at once (only the current test's are kept).
MAX_WORKERS = 256


class MeshTab:
    """The tab's state in one Locust process: baseline counters and the workers' reports."""

    def __init__(self, environment: Any, state: Any) -> None:
        self.environment = environment
        self.state = state  # this process's `loadtests.locustfile.LoadState`
        self.url = state.options.mesh_status_url  # checked by the locustfile's init (not in the UI)
        self.baseline: counters.Traffic | None = None
        self.baseline_error = "from the next test start"
        self.reports: dict[str, meshstats.WorkerHdr] = {}
        self._warned: set[str] = set()

    def on_test_start(self, **_: Any) -> None:
        """Read the baseline before any user starts (the listener runs before the spawn)."""
        if not self.url:
            return
        try:
            self.baseline = self._read()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.baseline = None
            self.baseline_error = f"no reading at the test start ({exc})"

    def on_worker_report(self, client_id: str, data: Any, **_: Any) -> None:
        """Keep a worker's latest histogram report (master only)."""
        doc = data.get(meshstats.REPORT_KEY) if isinstance(data, dict) else None
        if doc is None:
            return
        key = str(client_id)
        try:
            report = meshstats.parse_report(doc)
        except ValueError as exc:
            if key not in self._warned:  # once per worker: a bad worker would flood the log
                self._warned.add(key)
                logger.warning("Mesh tab: ignoring worker %s's histogram report: %s", key, exc)
            return
        if report.test != self.state.test:
            return  # a report of an earlier test, sent before the worker heard of this one
        self.reports = {k: r for k, r in self.reports.items() if r.test == report.test}
        if key in self.reports or len(self.reports) < MAX_WORKERS:
            self.reports[key] = report

    def snapshot(self) -> dict[str, Any]:
        """The ``/mesh/stats`` document, now."""
        st = self.state
        if isinstance(self.environment.runner, MasterRunner):
            parts = [(r.hist, r.failures) for r in self.reports.values() if r.test == st.test]
        else:
            parts = [(st.recorder.hist, st.recorder.failures)]
        mesh, error = self._mesh()
        state = getattr(self.environment.runner, "state", "missing")
        return meshstats.snapshot(state, meshstats.latency_block(parts), st.options, mesh, error)

    def _mesh(self) -> tuple[counters.Traffic | None, str | None]:
        if not self.url:
            return None, "no --mesh-status-url (run_bench.py serve --locust-ui sets it)"
        if self.baseline is None:
            return None, self.baseline_error
        try:
            return counters.since(self._read(), self.baseline), None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            return None, f"unreadable ({exc})"

    def _read(self) -> counters.Traffic:
        # The whole exchange within READ_TIMEOUT_S (http.client's timeout is per operation).
        with gevent.Timeout(READ_TIMEOUT_S, TimeoutError(f"no reply within {READ_TIMEOUT_S:g} s")):
            return meshstats.read_counters(self.url, READ_TIMEOUT_S)

    def add_rows(self, response: Response) -> Response:
        """Add the tab's rows to a ``/stats/requests`` reply (`extended_stats`)."""
        if request.endpoint != POLLED_ENDPOINT or response.status_code != 200:
            return response
        doc = response.get_json(silent=True)
        if not isinstance(doc, dict):
            return response
        rows = meshstats.table_rows(self.snapshot())
        doc["extended_stats"] = [{"key": meshstats.TAB_KEY, "data": rows}]
        response.set_data(json.dumps(doc))
        return response


def install(environment: Any, state: Any) -> MeshTab:
    """Add the Mesh tab and ``/mesh/stats`` to `environment`'s web UI."""
    web_ui = environment.web_ui
    tab = MeshTab(environment, state)
    environment.events.test_start.add_listener(tab.on_test_start)
    if isinstance(environment.runner, MasterRunner):
        environment.events.worker_report.add_listener(tab.on_worker_report)
    web_ui.template_args["extended_tabs"] = [
        {"title": meshstats.TAB_TITLE, "key": meshstats.TAB_KEY}
    ]
    web_ui.template_args["extended_tables"] = [
        {
            "key": meshstats.TAB_KEY,
            "structure": [{"key": key, "title": title} for key, title in meshstats.TABLE],
        }
    ]

    @web_ui.app.route(STATS_ROUTE)
    @web_ui.auth_required_if_enabled
    def mesh_stats() -> Response:
        return jsonify(tab.snapshot())

    web_ui.app.after_request(tab.add_rows)
    return tab
