"""The fault-tolerance benchmark (`run_bench.py faults`, DESIGN §9).

Per stack: start it once, then for each fault of the list that applies to it,
one Locust run at a steady open-loop rate (the same for every stack):
`before_s` of normal load, the fault, then `after_s` (plus the pause) to watch
the recovery. Between faults the stack must answer its probe again (its
supervisor restarts what died: `restart = "always"`).

Faults are `<kind>:<target>`:

* kinds: `kill` (SIGKILL) and `pause` (SIGSTOP for `pause_s`, then SIGCONT);
* targets: `worker` (one worker process of the chosen service: a gunicorn
  worker, or a `dpumesh.server` child), `sidecar` (that service's Envoy
  sidecar), `gateway` (the Envoy ingress gateway), `dpu-daemon`, `dpa-daemon`
  (DPUmesh) and `nodeproxy` (the shared per-node proxy, when a stack has one).
  A fault whose target a stack does not have is reported as not applicable.

Per stack and fault (`faults.csv`): requests completed and failed (by status)
over the Locust run, the worst latency after the fault, the recovery time
(`harness.measure.recovery`), the blast radius (the services whose 5xx count
rose, `harness.measure.accounting`) and the supervisor's restarts. The
completion timeline of every fault goes to `faults.json` for the report.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from harness import deploy
from harness.deploy import RunningStack
from harness.measure import recovery
from harness.measure.accounting import Traffic, counted_since
from harness.measure.metrics import machine_metadata
from harness.names import REPO
from harness.output.results import (
    FAULTS_JSON,
    ResultsDir,
    link_latest,
    merge_histograms,
    new_run_dir,
)
from harness.ports import free_ports, release_ports
from harness.procs import StartError, http_ok
from harness.run import plan
from harness.run.config import BenchConfig
from harness.run.loadgen import LocustRun, LocustSpec
from harness.run.runner import (
    measure_level,
    on_cpus,
    prepare_placement,
    read_traffic,
    restart_policy,
    settings_of,
    wait_first_request,
)
from harness.stacks import describe
from harness.stacks.model import StackDescription
from loadtests import latency

KINDS = ("kill", "pause")
TARGETS = ("worker", "sidecar", "gateway", "nodeproxy", "dpu-daemon", "dpa-daemon")
#: The share of the slowest stack's calibrated closed-loop capacity the faults run at.
LOAD_FRACTION = 0.5
#: Open-loop users cover this many seconds of sends, so a stall does not starve the schedule.
USER_BUDGET_S = 2.0
HEALTHY_TIMEOUT_S = 60.0
COUNTERS_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Fault:
    """One fault to inject: what is done (`kind`) to which component (`target`)."""

    kind: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.target}"

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`kill:worker` -> Fault; ValueError naming the choices otherwise."""
        kind, sep, target = text.strip().partition(":")
        if not sep or kind not in KINDS or target not in TARGETS:
            raise ValueError(
                f"fault {text!r}: expected KIND:TARGET with KIND one of {', '.join(KINDS)} "
                f"and TARGET one of {', '.join(TARGETS)}"
            )
        return cls(kind, target)


ALL_FAULTS = tuple(Fault(k, t) for t in TARGETS for k in KINDS)


def parse_faults(text: str) -> list[Fault]:
    """A comma-separated fault list (`all` = every kind x target), duplicates refused."""
    if text.strip() == "all":
        return list(ALL_FAULTS)
    faults = [Fault.parse(item) for item in text.split(",") if item.strip()]
    if not faults:
        raise ValueError("no fault given")
    names = [f.name for f in faults]
    if len(set(names)) != len(names):
        raise ValueError(f"fault listed twice in {text!r}")
    return faults


def target_component(desc: StackDescription, fault: Fault, service: str) -> str | None:
    """The component of `desc` that `fault` hits (None: the stack has no such part): the
    service's first app or sidecar, or the first component of the role (node 1's, with
    nodes)."""
    role = {"worker": "app", "sidecar": "sidecar"}.get(fault.target, fault.target)
    matches = [
        c.name
        for c in desc.components
        if c.role == role and (fault.target not in ("worker", "sidecar") or c.service == service)
    ]
    return matches[0] if matches else None


def default_service(desc: StackDescription) -> str:
    """The service whose worker or sidecar is hit: the entry's first callee, else the entry."""
    callees = [s for s in desc.services if s != desc.entry]
    return callees[0] if callees else desc.entry


def victim(processes: Sequence[psutil.Process], fault: Fault) -> psutil.Process:
    """The process to signal: for `worker`, one child of the component's leader (a worker
    of its pool; the leader itself when it has none); otherwise the leader."""
    leader = processes[0]
    if fault.target == "worker":
        with contextlib.suppress(psutil.Error):
            children = sorted(leader.children(), key=lambda p: p.pid)
            if children:
                return children[0]
    return leader


@dataclass(frozen=True)
class Options:
    """The benchmark's own settings (the stack and load settings are the `BenchConfig`)."""

    faults: tuple[Fault, ...]
    rate: float | None = None  # None: LOAD_FRACTION of the slowest calibrated capacity
    pause_s: float = 3.0
    before_s: int = 3
    after_s: int = 10
    service: str | None = None  # None: `default_service`

    def run_s(self, fault: Fault) -> int:
        """Seconds of one fault's Locust run."""
        pause = math.ceil(self.pause_s) if fault.kind == "pause" else 0
        return self.before_s + pause + self.after_s


class FaultBench:
    """One `faults` run: calibration (unless a rate is given), then every stack's faults."""

    def __init__(self, config: BenchConfig, options: Options, console: Console, argv: list[str]):
        self.config = config
        self.options = options
        self.console = console
        self.argv = argv
        self.results = ResultsDir(new_run_dir(config.out))
        self.started_utc = datetime.now(UTC)
        self.machine = machine_metadata(REPO)
        self.rate = options.rate
        self.calibration: dict[str, float | None] = {}
        self.timelines: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.problems: list[str] = []

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Path:
        cfg = self.config
        self._write_meta(interrupted=True)
        interrupted = True
        try:
            with prepare_placement(cfg) as placement, on_cpus(placement.cpus("loadgen")):
                self.placement = placement
                descs = {m: describe(m, settings_of(cfg, placement.model)) for m in cfg.meshes}
                if self.rate is None:
                    for mesh in cfg.meshes:
                        self.calibration[mesh] = self._calibrate(descs[mesh])
                    sustained = [c for c in self.calibration.values() if c]
                    if not sustained:
                        raise RuntimeError("no stack completed a request in calibration")
                    self.rate = round(LOAD_FRACTION * min(sustained), 1)
                self.console.print(f"faults at {self.rate:g} req/s open loop, every stack")
                for mesh in cfg.meshes:
                    self._stack(descs[mesh])
            interrupted = False
        finally:
            self._write_meta(interrupted=interrupted)
            link_latest(self.results.path)
        return self.results.path

    @contextlib.contextmanager
    def _started(self, desc: StackDescription, name: str) -> Iterator[RunningStack]:
        """`desc` started under the run's placement, stopped (and its port released) after."""
        port = self.config.port or free_ports(1)[0]
        try:
            stack = deploy.start(
                self.config.mode,
                desc,
                run_dir=self.results.path / "stacks" / name,
                port=port,
                placement=self.placement,
                restart=restart_policy(self.config),
            )
            try:
                yield stack
            finally:
                stack.stop()
        finally:
            if not self.config.port:
                release_ports([port])

    def _calibrate(self, desc: StackDescription) -> float | None:
        """A short closed-loop level of a fresh stack: its capacity (None: it served nothing)."""
        cfg = self.config
        self.console.print(f"{desc.mesh}: calibrating ({cfg.calibrate} s closed loop)")
        try:
            with self._started(desc, f"{desc.mesh}-calibration") as stack:
                level = plan.closed(cfg)
                name = f"{desc.mesh}-calibration"
                spec = self._spec(stack, name, level, cfg.warmup, cfg.calibrate, level.users)
                m = measure_level(stack, spec)
        except StartError as exc:
            self.problems.append(f"{desc.mesh}: did not start: {str(exc).splitlines()[0]}")
            self.console.print(f"[red]{desc.mesh}: did not start:[/] {exc}")
            return None
        rps = float(m.sidecar.get("achieved_rps") or 0.0) if m.hist is not None else 0.0
        self.console.print(f"{desc.mesh}: {rps:.1f} req/s closed loop")
        return rps or None

    def _stack(self, desc: StackDescription) -> None:
        service = self.options.service or default_service(desc)
        if service not in desc.services:
            raise ValueError(f"--service {service!r} is not a service of the workmodel")
        plan_ = [(f, target_component(desc, f, service)) for f in self.options.faults]
        for fault, component in plan_:
            if component is None:
                self.skipped.append({"mesh": desc.mesh, "fault": fault.name})
                self.console.print(f"{desc.mesh}: {fault.name} not applicable (no {fault.target})")
        applicable = [(f, c) for f, c in plan_ if c is not None]
        if not applicable:
            return
        try:
            with self._started(desc, desc.mesh) as stack:
                for fault, component in applicable:
                    self._wait_healthy(stack, desc)
                    self._inject(stack, desc, fault, component, service)
                    self._write_meta(interrupted=True)
        except StartError as exc:
            self.problems.append(f"{desc.mesh}: did not start: {str(exc).splitlines()[0]}")
            self.console.print(f"[red]{desc.mesh}: did not start:[/] {exc}")

    def _wait_healthy(self, stack: RunningStack, desc: StackDescription) -> None:
        """Until the public URL answers its probe (after a fault, the restarted parts are up)."""
        answers = http_ok(stack.url + desc.probe_path)
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        delay = 0.05
        while not answers():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{desc.mesh}: not answering {HEALTHY_TIMEOUT_S:g} s after a fault"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _spec(
        self,
        stack: RunningStack,
        name: str,
        level: plan.Level,
        excluded: int,
        measured: int,
        users: int,
    ) -> LocustSpec:
        return LocustSpec(
            host=stack.url,
            users=users,
            rate=level.rate,
            excluded_s=excluded,
            measured_s=measured,
            hdr_out=self.results.path / "hist" / f"{name}.hdr",
            csv_prefix=self.results.path / "locust" / name,
            request_id_prefix=f"{name}-",
            request_mode=self.config.request_mode,
            processes=self.config.processes,
            cpus=self.placement.cpus("loadgen"),
            inside=stack.client_argv,
        )

    def _inject(
        self,
        stack: RunningStack,
        desc: StackDescription,
        fault: Fault,
        component: str,
        service: str,
    ) -> None:
        """One Locust run with `fault` injected `before_s` after its first request."""
        assert self.rate is not None
        opts = self.options
        name = f"{desc.mesh}-{fault.kind}-{fault.target}"
        level = plan.open_level(self.rate, self.config, "fault")
        users = max(level.users, math.ceil(self.rate * USER_BUDGET_S))
        spec = self._spec(stack, name, level, 0, opts.run_s(fault), users)
        before = read_traffic(stack)
        restarts_before = stack.restarts()
        self.console.print(f"{desc.mesh}: {fault.name} on {component} ({spec.run_s} s run)")
        with LocustRun(spec) as run:
            if not wait_first_request(stack, before, run, lambda: None):
                raise RuntimeError(f"{desc.mesh}: Locust sent no request")
            first_ns = time.time_ns()
            _sleep_until(run, time.monotonic() + opts.before_s)
            target = victim(stack.component_processes(component), fault)
            fault_ns = time.time_ns()
            if fault.kind == "kill":
                target.send_signal(signal.SIGKILL)
            else:
                target.send_signal(signal.SIGSTOP)
                try:
                    _sleep_until(run, time.monotonic() + opts.pause_s)
                finally:
                    with contextlib.suppress(psutil.Error):
                        target.send_signal(signal.SIGCONT)
            returncode = run.wait(spec.run_s + 60)
        hist_files = latency.histogram_files(spec.hdr_out)
        sidecar = merge_histograms(spec.hdr_out)[1] if hist_files else {}
        after = self._traffic_after(stack)
        timeline = recovery.Timeline.from_record(sidecar.get("timeline") or {})
        since_fault = recovery.after_fault(timeline, fault_ns)
        recovered = recovery.recovery_s(timeline, self.rate, fault_ns)
        restarts = {
            c: n - restarts_before.get(c, 0)
            for c, n in stack.restarts().items()
            if n > restarts_before.get(c, 0)
        }
        blast = _blast_radius(before, after)
        row = {
            "mesh": desc.mesh,
            "stack": desc.mesh,
            "mode": self.config.mode,
            "workmodel": self.config.workmodel.name,
            "fault": fault.name,
            "kind": fault.kind,
            "target": component,
            "service": service if fault.target in ("worker", "sidecar") else "",
            "pid": target.pid,
            "injected_at_s": round((fault_ns - first_ns) / 1e9, 3),
            "pause_s": opts.pause_s if fault.kind == "pause" else None,
            "offered_rps": self.rate,
            "run_s": spec.run_s,
            "requests": int(sidecar.get("requests", 0)),
            "failed": int(sidecar.get("failures", 0)),
            "failed_by_status": _by_status(sidecar.get("failures_by") or {}),
            "failed_after_fault": since_fault["failed"],
            "worst_ms": since_fault["worst_us"] / 1000 if timeline.completed else None,
            "recovery_s": recovered,
            "recovered": recovered is not None,
            "blast_radius": ";".join(blast),
            "restarts": ";".join(f"{c}={n}" for c, n in sorted(restarts.items())),
            "loadgen_ok": returncode == 0 and bool(hist_files),
        }
        self.results.append_fault(row)
        self.timelines.append(
            {
                "mesh": desc.mesh,
                "fault": fault.name,
                "target": component,
                "offered_rps": self.rate,
                "recovery_s": recovered,
                "pause_s": row["pause_s"],
                "bucket_ms": timeline.bucket_ns // 1_000_000,
                **recovery.series(timeline, fault_ns),
            }
        )
        self.results.write_json(FAULTS_JSON, {"timelines": self.timelines})
        shown = "not within the run" if recovered is None else f"{recovered:.2f} s"
        self.console.print(
            f"  {row['requests']} requests, {row['failed']} failed "
            f"({row['failed_by_status'] or 'none'}), worst {row['worst_ms'] or 0:.1f} ms, "
            f"recovered {shown}; blast radius {row['blast_radius'] or 'none'}; "
            f"restarts {row['restarts'] or 'none'}"
        )

    def _traffic_after(self, stack: RunningStack) -> Traffic:
        """The stack's counters once readable again (a restarted part may still be starting)."""
        deadline = time.monotonic() + COUNTERS_TIMEOUT_S
        while True:
            try:
                return read_traffic(stack)
            except (OSError, RuntimeError, ValueError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _write_meta(self, interrupted: bool) -> None:
        machine = dict(self.machine)
        self.results.write_meta(
            {
                "kind": "faults",
                "started_utc": self.started_utc.isoformat(),
                "written_utc": datetime.now(UTC).isoformat(),
                "interrupted": interrupted,
                "command": self.argv,
                "config": self.config.as_dict(),
                "faults": {
                    "list": [f.name for f in self.options.faults],
                    "rate": self.rate,
                    "rate_source": "option" if self.options.rate else "calibrated",
                    "load_fraction": LOAD_FRACTION,
                    "calibration": self.calibration,
                    "pause_s": self.options.pause_s,
                    "before_s": self.options.before_s,
                    "after_s": self.options.after_s,
                    "service": self.options.service,
                    "not_applicable": self.skipped,
                    "recovery_rule": recovery.__doc__,
                    "problems": self.problems,
                },
                "versions": machine.pop("packages"),
                "git": machine.pop("git", None),
                "machine": machine,
            }
        )


def _sleep_until(run: LocustRun, end: float) -> None:
    """Sleep to `end` (monotonic), or until Locust has ended."""
    while (left := end - time.monotonic()) > 0 and not run.exited():
        time.sleep(min(left, 0.05))


def _by_status(counts: dict[str, int]) -> str:
    """`503:12;connection:3`, most frequent first."""
    return ";".join(f"{k}:{n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _blast_radius(before: Traffic, after: Traffic) -> list[str]:
    """The services whose 5xx count rose over the run."""
    return sorted(
        svc
        for svc, n in after["errors"].items()
        if counted_since(n, before["errors"].get(svc, 0)) > 0
    )


def run(
    config: BenchConfig, options: Options, argv: list[str], console: Console | None = None
) -> Path:
    """Run the fault benchmark; its results directory (faults.csv, faults.json, report.html)."""
    console = console or Console()
    bench = FaultBench(config, options, console, argv)
    path = bench.run()
    from reports.render import write_report  # plotly only once there is something to draw

    report = write_report([path])
    console.print(f"results: {path}\nreport: {report}")
    return path
