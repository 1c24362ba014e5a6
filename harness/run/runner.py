"""`run_bench.py run`: the side-by-side comparison, measured honestly (DESIGN §5, §6).

The plan (`harness.run.plan`): unless the config names its rates, a
calibration start of every stack sets the common open-loop ladder
(`harness.run.ladder`). Then per repetition, per stack (interleaved A B C A B
C ...), time the host CPUs (`harness.measure.speed`), start the stack once,
and run its load levels one Locust process each: the closed-loop level (which
carries the warm-up), the ladder from its lowest rate until two rates in a row
were not clean, and the refinement probes between its highest clean and lowest
unclean rate; then stop the stack. The harness itself runs on the load
generator's CPUs, never on the host set the stacks are compared on.

A what-if sweep (`run(..., compared=plan.whatif_stacks(...))`) is the same
run with one stack per DPU model value: each such stack gets its own
placement (its DPU speed as its own cgroup) and settings (its DMA cost).

One level (`measure_level`):

1. read the stack's own request counters (`stack.traffic()`);
2. start Locust with ``-t`` = excluded + measured seconds; its histogram
   (`--warmup-s`) drops requests whose send time falls in the excluded
   seconds after its first request;
3. poll the stack's counters every 20 ms until the first request arrives,
   then wait the excluded seconds;
4. open the CPU window: read the counters, start the per-role sampler on
   the stack's processes plus the Locust process tree (role ``loadgen``);
5. close it when Locust fires ``test_stopping`` (``-t`` expired; the
   `harness.run.locust_live` plugin's events file, polled every 50 ms), and
   read the counters again; CPU-ms per request = the window's CPU over the
   entry requests the *stack* counted inside the window, so the window's
   exact alignment with Locust's does not bias the ratio. Locust's start-up
   and shutdown are outside the window; its CPU while sending is inside;
6. when Locust has exited, read the counters a last time, merge the
   histograms and run the self-checks (`harness.measure.checks`) with Locust's
   totals against the stack's count over the whole level.

Each stack is described once per run (`harness.stacks.describe`) and
started by the deployer of ``--mode`` (`harness.deploy.start`), which hands
back a `harness.deploy.RunningStack`: the runner never knows which deployer
ran it. The fairness checklist reads every start's `stack.json`, which every
deployer writes the same way (`harness.deploy.manifest`).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from harness import deploy
from harness.deploy import RunningStack
from harness.measure import checks as chk
from harness.measure.accounting import Traffic, since
from harness.measure.callgraph import CycleError, expected_calls
from harness.measure.metrics import CPU_CLASSES_TEXT, WindowUsage, machine_metadata
from harness.measure.speed import loop_rate
from harness.names import ENVOY_MESHES, REPO
from harness.output.results import (
    ResultsDir,
    link_latest,
    merge_histograms,
    new_run_dir,
    result_row,
    role_rows,
)
from harness.output.schema import RESULTS, ResultsError
from harness.placement.apply import Placement, prepare
from harness.placement.profiles import DpuModel
from harness.ports import free_ports, release_ports
from harness.procs import RestartPolicy, StartError
from harness.run import ladder, plan
from harness.run.config import BenchConfig
from harness.run.loadgen import Live, LocustRun, LocustSpec
from harness.run.plan import Level, Segment, Stack
from harness.run.progress import RunProgress
from harness.stacks import describe
from harness.stacks.cell import Cell, load_cell
from harness.stacks.model import Settings, StackDescription
from loadtests import latency
from loadtests.options import DEFAULT_TRACE

FIRST_REQUEST_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
POLL_S = 0.05
COUNTER_POLL_S = 0.02

WINDOW_METHOD = (
    "CPU window: opens the excluded seconds (warm-up or settle) after the stack counted the "
    "level's first request (counters polled every 20 ms) and closes at Locust's test_stopping "
    "event, its run time expired (polled every 50 ms); start-up and shutdown are outside it. "
    "CPU-ms per request = role CPU in the window / entry requests the stack counted in the "
    "window. Latency: Locust's µs histograms, requests sent in the excluded seconds dropped; "
    "open loop measured from each request's intended send time."
)

SPEED_METHOD = (
    "host_mloops_per_s: millions of empty Python loop iterations per second on the host "
    "CPUs, timed for 0.5 s before each stack start (harness.measure.speed)"
)


@dataclass
class Measurement:
    """What one level produced, before judging it."""

    returncode: int | None
    hist: HdrHistogram | None
    sidecar: dict[str, Any]
    usage: WindowUsage | None
    window_requests: int
    level_traffic: Traffic  # counted by the stack over the whole Locust run


def read_traffic(stack: RunningStack) -> Traffic:
    """The stack's counters, retried briefly (a stats endpoint can be slow under load)."""
    for _ in range(2):
        try:
            return stack.traffic()
        except (OSError, RuntimeError, ValueError, http.client.HTTPException):
            time.sleep(0.2)
    return stack.traffic()


def wait_first_request(
    stack: RunningStack, before: Traffic, run: LocustRun, tick: Callable
) -> bool:
    """Poll the stack's entry counter until Locust's first request arrives (False: it never did)."""
    deadline = time.monotonic() + FIRST_REQUEST_TIMEOUT_S
    while time.monotonic() < deadline and not run.exited():
        if read_traffic(stack)["entry_requests"] > before["entry_requests"]:
            return True
        tick()
        time.sleep(COUNTER_POLL_S)
    return False


def _sleep(seconds: float, tick: Callable, run: LocustRun) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not run.exited():
        tick()
        time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))


def measure_level(
    stack: RunningStack, spec: LocustSpec, on_live: Callable[[Live | None], None] = lambda _: None
) -> Measurement:
    """Run one Locust level against `stack` and measure it (see the module docstring)."""
    start = read_traffic(stack)
    usage: WindowUsage | None = None
    window_requests = 0
    with LocustRun(spec) as run:
        last_tick = [0.0]

        def tick() -> None:
            if time.monotonic() - last_tick[0] >= 0.5:
                last_tick[0] = time.monotonic()
                on_live(run.live())

        if wait_first_request(stack, start, run, tick):
            _sleep(spec.excluded_s, tick, run)
            before = read_traffic(stack)
            sampler = stack.sampler({"loadgen": [run.process]})
            sampler.start()
            try:
                deadline = time.monotonic() + spec.measured_s + 30
                while not (run.stopping() or run.exited()) and time.monotonic() < deadline:
                    tick()
                    time.sleep(POLL_S)
            finally:
                usage = sampler.stop()
            window_requests = read_traffic(stack)["entry_requests"] - before["entry_requests"]
        returncode = run.wait(spec.run_s + EXIT_TIMEOUT_S)
        on_live(run.live())
    level_traffic = since(read_traffic(stack), start)
    hist: HdrHistogram | None = None
    sidecar: dict[str, Any] = {}
    if latency.histogram_files(spec.hdr_out):
        hist, sidecar = merge_histograms(spec.hdr_out)
    return Measurement(returncode, hist, sidecar, usage, window_requests, level_traffic)


def downstream_per_request(traffic: Traffic, entry: str) -> float | None:
    """Calls between services per entry request, as the stack counted them."""
    entries = traffic["entry_requests"]
    if entries <= 0:
        return None
    return sum(chk.observed_calls(traffic, entry).values()) / entries


def cross_node_per_request(traffic: Traffic) -> float | None:
    """Requests the stack carried from one node to another per entry request."""
    entries = traffic["entry_requests"]
    return traffic["cross_node"] / entries if entries > 0 else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_of(config: BenchConfig, model: DpuModel | None = None) -> Settings:
    """The stack settings a run's configuration implies (the same for every stack).

    The DMA cost is the DPU model's (`Placement.model`, with the config's overrides);
    without a model the DMA is free.
    """
    return Settings(
        workmodel=config.workmodel,
        seed=config.seed,
        scale=config.scale,
        functions_dir=config.functions_dir,
        envoy_concurrency=config.envoy_concurrency,
        dma_latency_us=model.dma_latency_us if model else 0.0,
        dma_gbps=model.dma_gbps if model else 0.0,
        mtls=config.mtls,
        nodes=config.nodes,
        place=config.place,
    )


def restart_policy(config: BenchConfig) -> RestartPolicy:
    """The components' restart policy of a run (bench.toml `restart`, `restart_backoff`)."""
    return RestartPolicy(
        mode=config.restart,
        initial_backoff_s=config.restart_backoff,
        max_backoff_s=max(RestartPolicy.max_backoff_s, config.restart_backoff),
    )


def prepare_placement(config: BenchConfig, stack: Stack | None = None) -> Placement:
    """The placement and DPU model of a run, or of one what-if `stack` (`PlacementError`)."""
    overrides = model_overrides(config)
    if stack is not None:
        overrides.update((k, int(v) if k == "dpu_cores" else v) for k, v in stack.overrides)
    return prepare(config.placement, config.dpu_profile, overrides)


def model_overrides(config: BenchConfig) -> dict[str, float | None]:
    """The DPU model values the config sets over its profile's (None: the profile's)."""
    return {key: getattr(config, key) for key in ("dpu_speed", "dma_latency_us", "dma_gbps")}


class Runner:
    """One run: a results directory, the plan, and everything measured so far."""

    def __init__(
        self,
        config: BenchConfig,
        console: Console,
        argv: list[str],
        placement: Placement,
        placements: dict[str, Placement],
        compared: Sequence[Stack],
        whatif: dict[str, Any] | None = None,
    ) -> None:
        """`placement`: the run's; `placements`: one per stack label (stacks without
        overrides share the run's)."""
        self.config = config
        self.console = console
        self.argv = argv
        self.compared = list(compared)
        self.placements = placements
        self.placement = placement  # the run's model; every stack has its layout
        self.models = {label: p.record() for label, p in placements.items()}
        self.whatif = whatif
        # A bad workmodel is a WorkmodelError before any start.
        base = load_cell(settings_of(config, self.placement.model))
        self.workmodel = base.workmodel
        self.descriptions: dict[str, StackDescription] = {
            s.label: describe(s.mesh, *self._cell(base, s)) for s in self.compared
        }
        self.results = ResultsDir(new_run_dir(config.out))
        self.checks: list[dict[str, Any]] = []
        self.mesh_configs: dict[str, dict[str, str]] = {}
        self.manifests: dict[str, list[dict[str, Any]]] = {}
        self.ladder: list[float] = list(config.rates or ())
        self.calibration: dict[str, float | None] = {}
        self.max_clean: dict[str, dict[int, ladder.MaxClean]] = {}
        self.skipped: dict[str, dict[int, list[float]]] = {}
        self.speed: list[dict[str, Any]] = []
        self.expected: dict[str, float] | None = None
        self.expected_error: str | None = None
        self.started_utc = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.machine = machine_metadata(REPO)  # at the start: load average, free memory
        self.progress: RunProgress | None = None
        self.summary: Any = None  # `reports.summary.RunSummary` once printed (reports: lazy)

    def _cell(self, base: Cell, stack: Stack) -> tuple[Settings, Cell]:
        """A stack's settings (its DMA cost) and the run's one loaded cell under them."""
        settings = settings_of(self.config, self.placements[stack.label].model)
        return settings, replace(base, settings=settings)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Path:
        """Calibrate, measure every segment, write everything, print the summary."""
        cfg = self.config
        self._print_config()
        self._write_meta(interrupted=True)  # a killed run still says what it was
        interrupted = True
        try:
            with RunProgress(
                self.console, plan.estimate_s(cfg, self.compared), cfg.repeat
            ) as self.progress:
                calibrations = plan.calibrations(cfg, self.compared)
                for seg in calibrations:
                    self._calibrate(seg)
                if calibrations:
                    self._set_ladder()
                for seg in plan.segments(cfg, self.compared):
                    self._segment(seg)
            interrupted = False
        finally:
            self._write_meta(interrupted=interrupted)
            link_latest(self.results.path)
        self._print_summary()
        self._render_report()
        return self.results.path

    @property
    def checks_ok(self) -> bool:
        return all(c["ok"] or c["info"] for c in self.checks)

    def _start(self, seg: Segment, port: int) -> RunningStack | None:
        """Start the segment's stack; None (recorded, printed) when it did not start."""
        assert self.progress is not None
        self.progress.step("starting stack", seg.label, seg.rep, plan.stack_start_s(seg.mesh))
        try:
            return deploy.start(
                self.config.mode,
                self.descriptions[seg.label],
                run_dir=self.results.stack_dir(seg.label, seg.rep),
                port=port,
                placement=self.placements[seg.label],
                restart=restart_policy(self.config),
            )
        except StartError as exc:
            self._record(seg, "-", [chk.Check("stack_start", False, str(exc).splitlines()[0])])
            self.progress.print(f"[red]{seg.label} rep {seg.rep}: stack did not start:[/] {exc}")
            return None

    def _stop(self, seg: Segment, stack: RunningStack, port: int) -> None:
        try:
            stack.stop()
        except RuntimeError as exc:  # e.g. a port still bound after teardown
            self._record(seg, "-", [chk.Check("stack_stop", False, str(exc))])
        if not self.config.port:
            release_ports([port])

    def _calibrate(self, seg: Segment) -> None:
        """One short closed-loop level of a fresh stack: its throughput for the ladder."""
        cfg = self.config
        assert self.progress is not None
        port = cfg.port or free_ports(1)[0]
        self.calibration[seg.label] = None
        stack = self._start(seg, port)
        if stack is None:
            return
        try:
            level = plan.closed(cfg)
            self.progress.step(
                f"calibration {level.name}",
                seg.label,
                seg.rep,
                plan.calibration_s(cfg, seg.mesh) - plan.stack_start_s(seg.mesh),
            )
            spec = self._spec(stack, seg, level, plan.excluded_s(cfg, True), cfg.calibrate)
            m = measure_level(stack, spec, self.progress.live)
            rps = float(m.sidecar.get("achieved_rps") or 0.0) if m.hist is not None else 0.0
            ok = m.returncode == 0 and rps > 0
            self.calibration[seg.label] = rps if ok else None
            detail = f"{rps:.1f} req/s closed loop" if ok else "no request completed"
            self._record(seg, level.name, [chk.Check("calibration", ok, detail)])
            self.progress.print(f"{seg.label} calibration: {detail}")
        except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
            why = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._record(seg, "-", [chk.Check("calibration", False, why)])
        finally:
            self._stop(seg, stack, port)

    def _set_ladder(self) -> None:
        """The common ladder from the calibrated capacities (none: open loop is skipped)."""
        assert self.progress is not None
        capacities = {k: v for k, v in self.calibration.items() if v}
        self.ladder = ladder.build(capacities, self.config.ladder_rates) if capacities else []
        rates = ", ".join(f"{r:g}" for r in self.ladder) or "none (no stack calibrated)"
        self.progress.print(f"ladder (req/s, every stack): {rates}")
        unused = plan.ladder_size(self.config) - len(self.ladder)
        self.progress.skip(unused * len(self.compared) * self.config.repeat * self._level_s())
        self._write_meta(interrupted=True)

    def _level_s(self) -> float:
        return plan.level_s(self.config, first=False)

    def _segment(self, seg: Segment) -> None:
        cfg = self.config
        assert self.progress is not None
        self.speed.append(
            {
                "rep": seg.rep,
                "stack": seg.label,
                "host_mloops_per_s": round(loop_rate(self.placement.cpus("host")), 2),
            }
        )
        port = cfg.port or free_ports(1)[0]
        stack = self._start(seg, port)
        if stack is None:
            return
        try:
            self._note_stack(seg.label, stack)
            self._level(stack, seg, plan.closed(cfg), first=True)
            self._climb(stack, seg)
            self.progress.step("stopping stack", seg.label, seg.rep, plan.STACK_STOP_S)
        except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
            # The stack broke mid-segment (a process died, counters unreadable): record it,
            # keep what was measured, and go on with the next segment.
            why = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._record(seg, "-", [chk.Check("segment_error", False, why)])
            self.progress.print(f"[red]{seg.label} rep {seg.rep}: segment aborted:[/] {why}")
        finally:
            self._stop(seg, stack, port)
        self._write_meta(interrupted=True)

    def _climb(self, stack: RunningStack, seg: Segment) -> None:
        """The ladder up to the knee, then refinement; the repetition's max clean throughput."""
        cfg = self.config
        assert self.progress is not None
        if not self.ladder:
            return
        climb = ladder.Climb(self.ladder)
        results = climb.results
        steps = cfg.refine
        try:
            while (rate := climb.next_rate()) is not None:
                climb.record(rate, self._clean(self._level(stack, seg, self._open(rate, "open"))))
            results = dict(climb.results)
            while steps and (rate := ladder.refine(results)) is not None:
                results[rate] = self._clean(self._level(stack, seg, self._open(rate, "refine")))
                steps -= 1
        finally:  # a stack that broke mid-climb still has what it measured recorded
            self._record_max_clean(seg, results, climb.skipped)
        self.progress.skip((len(climb.skipped) + steps) * self._level_s())

    def _record_max_clean(
        self, seg: Segment, results: dict[float, bool], skipped: list[float]
    ) -> None:
        assert self.progress is not None
        best = ladder.max_clean(results, self.ladder[-1])
        self.max_clean.setdefault(seg.label, {})[seg.rep] = best
        self.skipped.setdefault(seg.label, {})[seg.rep] = skipped
        shown = "none" if best.rps is None else f"{'>= ' if best.at_top else ''}{best.rps:g} req/s"
        past = f"; skipped {', '.join(f'{r:g}' for r in skipped)}" if skipped else ""
        self.progress.print(f"{seg.label} rep {seg.rep}: max clean throughput {shown}{past}")

    def _open(self, rate: float, prefix: str) -> Level:
        return plan.open_level(rate, self.config, prefix)

    def _clean(self, row: dict[str, Any]) -> bool:
        """DESIGN §5's clean level (`checks.is_clean`, the report's rule too) of a results row,
        judged as results.csv will hold it (rounded), so the report, judging the file, agrees."""
        row = RESULTS.decode(RESULTS.encode(row), "a results row")
        return chk.is_clean(
            row["offered_rps"],
            row["achieved_rps"] or 0.0,
            chk.failure_rate(row["requests"], row["failures"]),
            row["p99_us"] if row["p99_us"] is not None else float("inf"),
            self.config.slo_p99_ms,
            row["checks_ok"],
        )

    def _spec(
        self, stack: RunningStack, seg: Segment, level: Level, excluded: int, measured: int
    ) -> LocustSpec:
        return LocustSpec(
            host=stack.url,
            users=level.users,
            rate=level.rate,
            excluded_s=excluded,
            measured_s=measured,
            hdr_out=self.results.hist_path(seg.label, seg.rep, level.name),
            csv_prefix=self.results.locust_prefix(seg.label, seg.rep, level.name),
            request_id_prefix=plan.request_id_prefix(seg.rep, level),
            request_mode=self.config.request_mode,
            processes=self.config.processes,
            cpus=self.placement.cpus("loadgen"),
            inside=stack.client_argv,
        )

    def _level(
        self, stack: RunningStack, seg: Segment, level: Level, first: bool = False
    ) -> dict[str, Any]:
        """Measure one level, judge it, append its rows; the results row."""
        cfg = self.config
        assert self.progress is not None
        excluded = plan.excluded_s(cfg, first)
        phase = f"{level.name}" + (f" (incl. {excluded} s warm-up)" if first else "")
        self.progress.step(phase, seg.label, seg.rep, plan.level_s(cfg, first))
        spec = self._spec(stack, seg, level, excluded, cfg.duration)
        restarts_before = stack.restarts()
        m = measure_level(stack, spec, self.progress.live)
        restarted = chk.no_restarts(restarts_before, stack.restarts())
        placement = self.placements[seg.label]
        placed = placement.verify(stack.pids_by_set())
        summ = latency.summarize(m.hist if m.hist is not None else latency.new_histogram())
        derived = m.usage.derive(requests=m.window_requests) if m.usage is not None else None
        checks = self._judge(stack, level, m, derived)
        checks.append(chk.placement(placed, placement.layout.as_text()))
        checks.append(restarted)
        ok, failed = chk.verdict(checks)
        row = result_row(
            mesh=seg.mesh,
            stack=seg.label,
            mode=cfg.mode,
            workmodel=cfg.workmodel.name,
            rep=seg.rep,
            level=level.name,
            users=level.users,
            offered_rps=level.rate,
            summary=summ,
            sidecar=m.sidecar,
            usage=derived,
            downstream_calls_per_req=downstream_per_request(m.level_traffic, stack.entry),
            cross_node_per_req=cross_node_per_request(m.level_traffic),
            nodes=cfg.nodes,
            mtls=self.descriptions[seg.label].mtls,
            dpu_model=self.models[seg.label],
            checks_ok=ok,
            failed_checks=failed,
        )
        self.results.append_result(row)
        if derived is not None:
            self.results.append_roles(role_rows(seg.mesh, seg.label, seg.rep, level.name, derived))
        self._record(seg, level.name, checks)
        self._print_level(seg, row, checks)
        return row

    def _judge(
        self, stack: RunningStack, level: Level, m: Measurement, derived: dict[str, Any] | None
    ) -> list[chk.Check]:
        checks = [chk.loadgen_ran(m.returncode, int(m.sidecar.get("processes", 0)))]
        if m.hist is None:
            return checks
        requests, failures = int(m.sidecar["requests"]), int(m.sidecar["failures"])
        # Errors past a stack's knee are what the ladder looks for: information, not failure.
        overload = level.open_loop
        checks.append(chk.counts_match(m.sidecar, m.level_traffic["entry_requests"]))
        checks.append(chk.error_rate(requests, failures, info=overload))
        if m.usage is not None and derived is not None:
            loadgen = derived["roles"]["loadgen"]["cpu_s"]
            checks.append(chk.loadgen_cpu(loadgen, m.usage.window_s, self.config.processes))
        else:
            checks.append(chk.Check("cpu_window", False, "no request arrived: nothing measured"))
        expected = self._expected(stack.entry)
        if expected is not None:
            checks.append(chk.mesh_crossed(m.level_traffic, stack.entry, expected))
        if level.rate is not None:
            checks.append(chk.open_loop_delivery(level.rate, float(m.sidecar["achieved_rps"])))
        return checks

    def _expected(self, entry: str) -> dict[str, float] | None:
        """Expected calls per service per entry request (None if the workmodel has a cycle)."""
        if self.expected is None and self.expected_error is None:
            try:
                self.expected = expected_calls(
                    self.workmodel, entry, self.config.request_mode, DEFAULT_TRACE
                )
            except CycleError as exc:
                self.expected_error = str(exc)
        return self.expected

    def _record(self, seg: Segment, level: str, checks: list[chk.Check]) -> None:
        self.checks += [c.record(seg.label, seg.rep, level) for c in checks]

    def _note_stack(self, label: str, stack: RunningStack) -> None:
        """Keep the stack's manifest; publish the first start's configs under configs/<label>/."""
        files = {name: Path(path) for name, path in stack.configs.items()}
        manifest = Path(stack.manifest)
        if manifest.is_file():
            self.manifests.setdefault(label, []).append(json.loads(manifest.read_text()))
            files["stack"] = manifest
        if label not in self.mesh_configs:
            self.mesh_configs[label] = self.results.copy_configs(label, files)

    # -- meta.json -------------------------------------------------------------------------

    def _nodes(self) -> dict[str, Any]:
        """Where the services ran (DESIGN §8): the one topology every stack shares."""
        topology = next((d.topology for d in self.descriptions.values()), None)
        return {
            **(topology.as_dict() if topology is not None else {}),
            "count": self.config.nodes,
            "share_cores": True,  # every node's processes run on the run's one set of CPU sets
        }

    def _write_meta(self, interrupted: bool) -> None:
        cfg = self.config
        machine = dict(self.machine)
        calls = sum(self.expected.values()) if self.expected is not None else None
        meta = {
            "started_utc": self.started_utc.isoformat(),
            "written_utc": datetime.now(UTC).isoformat(),
            "wall_s": round(time.monotonic() - self.t0, 1),
            "interrupted": interrupted,
            "command": self.argv,
            "config": {**cfg.as_dict(), "downstream_calls_per_req": calls},
            "plan": {
                "levels": [lv.name for lv in plan.sweep(cfg, self.ladder)],
                "order": [f"rep{s.rep}:{s.label}" for s in plan.segments(cfg, self.compared)],
                "estimate_s": round(plan.estimate_s(cfg, self.compared)),
                "request_ids": "r<rep>-<level>-<n>: the same in every stack",
            },
            "ladder": {
                "rates": self.ladder,
                "top": self.ladder[-1] if self.ladder else None,
                "source": "config" if cfg.rates is not None else "calibrated",
                "calibration": self.calibration,
                "refine_steps": cfg.refine,
                "stop_after_dirty": ladder.STOP_AFTER_DIRTY,
                "skipped": {k: {str(r): v for r, v in d.items()} for k, d in self.skipped.items()},
                "method": ladder.METHOD,
            },
            "max_clean_throughput": self._max_clean_record(),
            "machine_speed": {"probe": SPEED_METHOD, "segments": self.speed},
            "versions": machine.pop("packages"),
            "git": machine.pop("git", None),
            "machine": machine,
            "method": {
                "cpu_window": WINDOW_METHOD,
                "histograms": "hist/<stack>-rep<r>-<level>.hdr: merged over Locust processes; "
                "per-process files of distributed runs moved to hist/parts/",
                "cpu_classes": f"{CPU_CLASSES_TEXT}; MB = MiB",
            },
            "downstream_calls_per_req": calls,
            "expected_calls_per_service": self.expected,
            "expected_calls_error": self.expected_error,
            "dpu_model": {
                **self.placement.record(),
                "per_stack": {
                    mesh: [m.get("placement") for m in ms] for mesh, ms in self.manifests.items()
                },
            },
            "mesh_configs": self.mesh_configs,
            "nodes": self._nodes(),
            "fairness": self._fairness(),
            "checks_ok": self.checks_ok,
            "checks": self.checks,
        }
        if self.whatif is not None:
            meta["whatif"] = {
                **self.whatif,
                "models": {s.label: self.models[s.label] for s in self.compared if s.overrides},
            }
        self.results.write_meta(meta)

    def _max_clean_record(self) -> dict[str, Any]:
        """Per stack: the median over repetitions, whether it is the top, each repetition's."""
        out = {}
        for label, reps in self.max_clean.items():
            median = ladder.median_max_clean(list(reps.values()))
            out[label] = {
                "rps": median.rps,
                "at_top": median.at_top,
                "per_rep": {str(r): {"rps": m.rps, "at_top": m.at_top} for r, m in reps.items()},
            }
        return out

    def _fairness(self) -> dict[str, Any]:
        """What every stack had in common, checked from the stacks' own manifests."""
        first = {mesh: ms[0] for mesh, ms in self.manifests.items()}
        every = [m for ms in self.manifests.values() for m in ms]
        codes = {json.dumps(m.get("app_code"), sort_keys=True) for m in every}
        plans = {mesh: m.get("plan") for mesh, m in first.items()}
        seeds = {m.get("seed") for m in every}
        workmodels = {m.get("workmodel") for m in every}
        fairness: dict[str, Any] = {
            "same_app_code": {
                "ok": len(codes) == 1 and None not in (m.get("app_code") for m in every),
                "app_code": sorted(json.loads(c) for c in codes),
            },
            "workmodel": {
                "ok": workmodels == {str(self.config.workmodel)},
                "path": str(self.config.workmodel),
                "sha256": _sha256(self.config.workmodel),
            },
            "seed": {"ok": seeds == {self.config.seed}, "value": self.config.seed},
            "worker_counts": {
                "ok": len({json.dumps(p, sort_keys=True) for p in plans.values()}) == 1,
                "per_stack": plans,
            },
            "same_load": {
                "ok": True,
                "detail": "same locustfile, users, rates, durations and request ids per level",
            },
            "same_host_cores": self._same_host_cores(every),
            "load_generator": self._loadgen_isolation(),
        }
        for mesh in ENVOY_MESHES:  # each Envoy stack's tuning, read back from what ran
            if mesh in first:
                from baselines.envoy.config import tuning

                envoy = first[mesh]
                gateway = [c["argv"] for c in envoy["components"] if c["role"] == "gateway"]
                bootstraps = {
                    name: json.loads(Path(p).read_text()) for name, p in envoy["configs"].items()
                }
                asked = bool(envoy.get("settings", {}).get("mtls"))  # what the run asked for
                fairness[f"{mesh}_tuning"] = tuning(gateway[0], bootstraps, mtls=asked)
        return fairness

    def _same_host_cores(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        """Every stack start ran its host roles on the layout's host set, as read back."""
        layouts = {
            json.dumps((m.get("placement") or {}).get("layout"), sort_keys=True) for m in manifests
        }
        mismatches = [p for m in manifests for p in (m.get("placement") or {}).get("readback", [])]
        return {
            "ok": len(layouts) == 1 and not mismatches,
            "host": self.models[self.compared[0].label]["layout"]["host"],
            "placement": self.placement.layout.as_text(),
            "mismatches": mismatches[:20],
        }

    def _loadgen_isolation(self) -> dict[str, Any]:
        """Whether Locust had cores of its own, or which sets it shared (the report says so)."""
        model = self.placement.record()
        pairs = [pair for pair in model["overlaps"] if "loadgen" in pair]
        shared = sorted({s for pair in pairs for s in pair} - {"loadgen"})
        cpus = model["layout"]["loadgen"]
        if self.placement.layout.shared:
            detail = "shared: every role and the load generator on every CPU"
        elif shared:
            detail = f"load generator on cpu {cpus}, shared with {' and '.join(shared)}"
        else:
            detail = f"load generator isolated on cpu {cpus}"
        return {"ok": "host" not in shared, "shared_with": shared, "detail": detail}

    # -- output ----------------------------------------------------------------------------

    def _print_config(self) -> None:
        cfg = self.config
        table = Table.grid(padding=(0, 2))
        for key, value in cfg.as_dict().items():
            table.add_row(key, str(value))
        self.console.print(f"[bold]DPUmesh bench[/] → {self.results.path}")
        self.console.print(table)
        shown = {"model": self.placement.record()}
        shown.update(
            (f"model {s.label}", self.models[s.label]) for s in self.compared if s.overrides
        )
        for prefix, model in shown.items():
            self.console.print(f"{prefix}: {model['sentence']}", highlight=False)
            for line in model["unmet"]:
                self.console.print(f"[yellow]note:[/] {line}", highlight=False)
        labels = ", ".join(s.label for s in self.compared)
        ladder_text = (
            f"open loop at {', '.join(f'{r:g}' for r in cfg.rates)} req/s"
            if cfg.rates is not None
            else f"a calibration start of each, then a common ladder of {cfg.ladder_rates} rates"
        )
        self.console.print(
            f"plan: {labels}; {ladder_text}; {cfg.repeat} rep(s) interleaved, each a closed-loop "
            f"level then the ladder to two unclean rates and {cfg.refine} refinement(s); "
            f"at most {plan.estimate_s(cfg, self.compared) / 60:.1f} min",
            highlight=False,
        )

    def _print_level(self, seg: Segment, row: dict[str, Any], checks: list[chk.Check]) -> None:
        assert self.progress is not None
        p50, p99 = row["p50_us"], row["p99_us"]
        latencies = f"p50 {p50 / 1000:.2f} ms, p99 {p99 / 1000:.2f} ms" if p50 else "no latency"
        failed = [c for c in checks if not c.ok]
        verdict = (
            "checks ok"
            if not failed
            else "; ".join(
                f"{'[yellow]' if c.info else '[red]'}{c.name}[/]: {c.detail}" for c in failed
            )
        )
        self.progress.print(
            f"{seg.label} rep {seg.rep} {row['level']}: {row['achieved_rps'] or 0:.1f} req/s, "
            f"{latencies}, {row['failures']} failures; {verdict}"
        )

    def _print_summary(self) -> None:
        """The report's headline of the directory just written (`reports.terminal`: the same
        code as report.html's), then the failed self-checks and the wall time."""
        wall = time.monotonic() - self.t0
        try:  # harness never imports reports at module level (reports imports harness)
            terminal = importlib.import_module("reports.terminal")
            self.summary = terminal.print_summary(self.results.path, self.console)
        except ResultsError as exc:  # e.g. no level finished: nothing to summarise
            self.console.print(f"[yellow]no summary:[/] {exc}", highlight=False)
        except Exception as exc:  # the results are written; a summary bug must not lose the report
            self.console.print(f"[red]summary not printed:[/] {type(exc).__name__}: {exc}")
        failed = [c for c in self.checks if not c["ok"] and not c["info"]]
        if failed:
            self.console.print(f"[red bold]self-checks FAILED ({len(failed)}):[/]")
            for c in failed[:20]:
                self.console.print(
                    f"  {c['mesh']} rep {c['rep']} {c['level']} {c['name']}: {c['detail']}",
                    highlight=False,
                )
        else:
            self.console.print(f"[green]self-checks: all {len(self.checks)} passed[/]")
        self.console.print(f"wall time {wall / 60:.1f} min ({wall:.0f} s)", highlight=False)

    def _render_report(self) -> None:
        try:
            render = importlib.import_module("reports.render")
            # The summary just printed, so the directory is read and bootstrapped once.
            summaries = [self.summary] if self.summary is not None else None
            path = render.write_report([self.results.path], summaries=summaries)
        except Exception as exc:  # the results are written; a report bug must not lose them
            self.console.print(f"[red]report not rendered:[/] {type(exc).__name__}: {exc}")
            return
        self.console.print(f"report: {path}")


def run(
    config: BenchConfig,
    argv: list[str],
    console: Console | None = None,
    *,
    compared: Sequence[Stack] | None = None,
    whatif: dict[str, Any] | None = None,
) -> tuple[Path, bool]:
    """Run the comparison; (results directory, whether every self-check passed).

    `compared` defaults to one stack per configured mesh; a what-if sweep passes
    `plan.whatif_stacks(...)` and describes itself in `whatif` (meta.json).
    """
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: no wrapping of the summary table
            console = Console(width=200)
    compared = list(compared or plan.stacks(config))
    with ExitStack() as placements_stack:
        base = placements_stack.enter_context(prepare_placement(config))
        placements = {
            s.label: placements_stack.enter_context(prepare_placement(config, s))
            if s.overrides
            else base
            for s in compared
        }
        for placement in placements.values():
            deploy.check_placement(config.mode, placement)
        runner = Runner(config, console, argv, base, placements, compared, whatif)
        with on_cpus(base.cpus("loadgen")):
            path = runner.run()
    return path, runner.checks_ok


@contextmanager
def on_cpus(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the harness itself on `cpus` (the load generator's), restoring its affinity after.

    The runner polls counters, samples /proc and redraws the progress panel; on the
    host set that would be load on the very cores the stacks are compared on.
    """
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
