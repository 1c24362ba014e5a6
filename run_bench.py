#!/usr/bin/env python3
"""DPUmesh bench command line: argument parsing only; the work is in `harness`.

Each subcommand is one `_add_<name>(subparsers)` function that registers its
arguments and sets `handler`; `main` dispatches. No subcommand means `run`
with the defaults (bench.toml).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from baselines.envoy.config import DEFAULT_CONCURRENCY
from harness.deploy.local import serve
from harness.names import DEFAULT_PORT, DEFAULT_WORKMODEL, MESHES, MODES, RESTART_MODES
from harness.placement.layout import PlacementError
from harness.placement.profiles import resolve
from harness.procs import StartError
from harness.run import config as bench_config
from harness.run import faults, plan, runner
from harness.stacks import describe
from loadtests.options import REQUEST_MODES
from mubench.internal import check_scale
from reports import __main__ as reports_cli

T = TypeVar("T")


def _checked(validate: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from a validator: its ValueError becomes a usage error (exit 2)."""

    def parse(text: str) -> T:
        try:
            return validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# Shared by `serve` and `run`; the same rule bench.toml's value is held to.
_ENVOY_CONCURRENCY = _checked(bench_config.whole_number(1))
_ENVOY_CONCURRENCY_HELP = "worker threads (--concurrency) of every Envoy in the envoy stack"
_FUNCTIONS_DIR_HELP = "directory of μBench custom internal functions (*.py)"


_DPU_OPTIONS = (
    (
        "--placement",
        "placement",
        "SPEC",
        "CPU sets: auto (default), shared, or host=0-3,dpu=4-5,loadgen=6-7",
    ),
    (
        "--dpu-profile",
        "dpu_profile",
        "NAME",
        "DPU model: ideal, bluefield2, bluefield3 "
        "(default bluefield3; harness/placement/dpu-profiles.toml)",
    ),
    (
        "--dpu-speed",
        "dpu_speed",
        "F",
        "DPU core speed as a fraction of a host core (overrides the profile's)",
    ),
    (
        "--dma-latency-us",
        "dma_latency_us",
        "US",
        "DMA latency per transfer, µs (overrides the profile's)",
    ),
    ("--dma-gbps", "dma_gbps", "GBPS", "DMA bandwidth, Gbit/s, 0 = free (overrides the profile's)"),
)


def _add_dpu_options(parser: argparse.ArgumentParser) -> None:
    """The DPU model and CPU placement options, shared by `run` and `serve` (bench.toml's rules)."""
    for flag, key, metavar, text in _DPU_OPTIONS:
        parser.add_argument(
            flag, dest=key, type=_checked(bench_config.VALIDATORS[key]), metavar=metavar, help=text
        )


def _stack_config(args: argparse.Namespace, **more: object) -> bench_config.BenchConfig:
    """A `BenchConfig` from the stack options of `serve` or `k8s` (bench.toml's rules)."""
    keys = ("workmodel", "seed", "scale", "envoy_concurrency", "functions_dir")
    return bench_config.build(overrides={**{k: getattr(args, k) for k in keys}, **more})


def _serve(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path("runs", f"serve-{args.mesh}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    keys = [key for _, key, _, _ in _DPU_OPTIONS] + ["restart", "restart_backoff"]
    config = _stack_config(args, **{key: getattr(args, key) for key in keys})
    with runner.prepare_placement(config) as placement:
        print(f"model: {placement.record()['sentence']}", flush=True)
        settings = runner.settings_of(config, placement)
        serve(
            describe(args.mesh, settings),
            port=args.port,
            run_dir=run_dir,
            placement=placement,
            restart=runner.restart_policy(config),
        )
    return 0


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    """Workmodel and cell settings of one stack, for `serve` and `k8s`."""
    parser.add_argument(
        "--workmodel",
        type=Path,
        default=DEFAULT_WORKMODEL,
        metavar="PATH",
        help="μBench workmodel.json (default: workmodels/default.json)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="μBench random seed (default 0)"
    )
    parser.add_argument(
        "--scale",
        type=_checked(lambda text: check_scale(float(text))),
        default=1.0,
        metavar="F",
        help="multiply the cells' pi computations and sleeps by F >= 0 (default 1; <1 for smoke "
        "tests)",
    )
    parser.add_argument(
        "--envoy-concurrency",
        type=_ENVOY_CONCURRENCY,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"{_ENVOY_CONCURRENCY_HELP} (default %(default)s)",
    )
    parser.add_argument("--functions-dir", type=Path, metavar="DIR", help=_FUNCTIONS_DIR_HELP)


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start one stack and keep it running until Ctrl-C",
        description=(
            "Start one stack (all its processes on 127.0.0.1) for the workmodel, print a "
            "line with 'ready' and its URL once it answers, serve until SIGINT/SIGTERM, "
            "then tear everything down (no process, port or shared memory is left). "
            "Logs, generated mesh configs and stack.json (argv, pids, ports) go to the run "
            "directory."
        ),
    )
    parser.add_argument(
        "--mesh",
        required=True,
        choices=MESHES,
        help="dpumesh: DPU-offloaded mesh; envoy: Envoy sidecars + gateway; "
        "nomesh: services call each other directly (the floor)",
    )
    _add_stack_options(parser)
    parser.add_argument(
        "--port",
        type=_checked(bench_config.whole_number(1, 65535)),
        default=DEFAULT_PORT,
        metavar="N",
        help="public port on 127.0.0.1 (default %(default)s)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="where logs and configs go (default runs/serve-<mesh>-<UTC timestamp>)",
    )
    _add_restart_options(parser)
    _add_dpu_options(parser)
    parser.set_defaults(handler=_serve)


def _run_config(args: argparse.Namespace) -> bench_config.BenchConfig:
    """The config of `run` or `whatif`: bench.toml (or --config), --quick, the options."""
    overrides = {key: getattr(args, key, None) for key in bench_config.KEYS}
    if getattr(args, "meshes", None) is not None:
        overrides["meshes"] = bench_config.parse_list(args.meshes, "meshes")
    if args.rates is not None and args.rates != "auto":
        overrides["rates"] = bench_config.parse_list(args.rates, "rate")
    return bench_config.load(args.config, overrides, quick=args.quick)


def _run(args: argparse.Namespace) -> int:
    config = _run_config(args)
    _, checks_ok = runner.run(config, ["run_bench.py", *(args.argv or [])])
    return 0 if checks_ok else 1


_RUN_DESCRIPTION = (
    "Start each stack once for a short closed-loop calibration, which sets one open-loop "
    "ladder of rates for every stack reaching past the fastest one's capacity; then start "
    "each stack in turn (repetitions interleaved across stacks), drive it with Locust (a "
    "closed-loop level, then the ladder until two rates in a row are not clean, then a "
    "refinement between its highest clean and lowest unclean rate), measure µs latency "
    "histograms and CPU/memory per role over the measurement window, check the run "
    "against itself, and write results/<UTC timestamp>/ (results.csv, roles.csv, "
    "meta.json, hist/, locust/, configs/, report.html) plus results/latest. Settings come "
    "from --config (default bench.toml, which documents each), then --quick, then these "
    "options. Exit status 1 when a self-check failed (the results are still written)."
)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the side-by-side comparison (the default command)",
        description=_RUN_DESCRIPTION,
    )
    parser.add_argument(
        "--meshes", metavar="A,B", help=f"stacks to compare, in order ({','.join(MESHES)})"
    )
    _add_run_options(parser)
    parser.set_defaults(handler=_run)


def _whatif(args: argparse.Namespace) -> int:
    values = [float(v) for v in bench_config.parse_list(args.values, "values")]
    baselines = bench_config.parse_list(args.baselines, "baselines")
    for mesh in baselines:
        if mesh not in MESHES:
            raise bench_config.ConfigError(f"--baselines: unknown stack {mesh!r}")
    compared = plan.whatif_stacks(baselines, args.param, values)
    args.meshes = ",".join([*baselines, "dpumesh"])  # what meta.json's config says was run
    config = _run_config(args)
    whatif = {
        "param": args.param,
        "stack": "dpumesh",
        "values": {s.label: dict(s.overrides)[args.param] for s in compared if s.overrides},
        "baselines": baselines,
    }
    _, checks_ok = runner.run(
        config, ["run_bench.py", *(args.argv or [])], compared=compared, whatif=whatif
    )
    return 0 if checks_ok else 1


def _add_whatif(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "whatif",
        help="sweep one DPU model parameter: dpumesh at every value, the baselines once",
        description=(
            "A run (see `run --help`) whose stacks are the baselines, measured once per "
            "repetition, and dpumesh at every value of one DPU model parameter, each value "
            "its own stack (labelled dpumesh@PARAM=VALUE: its own DPU cgroup or DMA cost). "
            "The report adds a sensitivity chart: dpumesh's advantage over envoy (max clean "
            "throughput, p99 and host CPU per request at a common rate) against the value, "
            "with the break-even point marked. dpu_speed above 1 and dpu_cores above the "
            "dpu set's CPUs are recorded but cannot be given by this machine: the report "
            "says so."
        ),
    )
    parser.add_argument(
        "--param", required=True, choices=plan.WHATIF_PARAMS, help="the DPU model parameter"
    )
    parser.add_argument(
        "--values",
        required=True,
        metavar="V1,V2",
        type=_checked(_whatif_values),
        help="its values (at least one; e.g. 0.25,0.5,1,2)",
    )
    parser.add_argument(
        "--baselines",
        default="envoy,nomesh",
        metavar="A,B",
        help="stacks measured once (default envoy,nomesh)",
    )
    _add_run_options(parser)
    parser.set_defaults(handler=_whatif)


def _whatif_values(text: str) -> str:
    """The --values list, checked to be finite numbers >= 0 (the parameter checks the rest)."""
    check = bench_config.finite_number(zero_ok=True)
    for item in bench_config.parse_list(text, "values"):
        check(item)
    return text


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of `run` and `whatif`, each a bench.toml key (documented there)."""
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="TOML settings (default: bench.toml)")
    add(
        "--quick",
        action="store_true",
        help="a rough look in about 2 minutes: "
        + ", ".join(f"{k}={v}" for k, v in bench_config.QUICK.items()),
    )
    add(
        "--rate",
        dest="rates",
        metavar="R1,R2",
        help="open-loop rates in req/s instead of the calibrated ladder ('auto'; '' = none)",
    )
    add("--ladder-rates", type=int, metavar="N", help="rates in the calibrated ladder")
    add("--refine", type=int, metavar="N", help="refinement probes per stack and repetition")
    add("--duration", type=int, metavar="S", help="measured seconds per level")
    add("--settle", type=int, metavar="S", help="excluded seconds at the start of other levels")
    add("--repeat", type=int, metavar="N", help="repetitions per stack (interleaved)")
    _add_load_options(parser)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command that starts stacks and loads them (bench.toml keys)."""
    add = parser.add_argument
    add("--workmodel", metavar="PATH", help="μBench workmodel.json")
    add("--users", type=int, metavar="U", help="closed-loop users (calibration too)")
    add("--calibrate", type=int, metavar="S", help="measured seconds of each calibration")
    add("--warmup", type=int, metavar="S", help="warm-up seconds after each stack start")
    add("--seed", type=int, metavar="S", help="μBench random seed")
    add("--out", metavar="DIR", help="results root (a timestamped directory goes inside)")
    add("--slo-p99-ms", type=float, metavar="MS", help="p99 objective for max clean throughput")
    add("--processes", type=int, metavar="N", help="Locust processes (N > 1: master + N workers)")
    add("--request-mode", choices=REQUEST_MODES, help="get: stochastic; trace: trace-driven POST")
    add("--mode", choices=MODES, help="local processes or Docker Compose")
    add("--port", type=int, metavar="N", help="public port of each stack (0 = any free port)")
    add("--scale", type=float, metavar="F", help="multiply the cells' pi computations and sleeps")
    add("--envoy-concurrency", type=_ENVOY_CONCURRENCY, metavar="N", help=_ENVOY_CONCURRENCY_HELP)
    add("--functions-dir", metavar="DIR", help=_FUNCTIONS_DIR_HELP)
    _add_restart_options(parser)
    _add_dpu_options(parser)


def _add_restart_options(parser: argparse.ArgumentParser) -> None:
    """The components' restart policy (bench.toml `restart`, `restart_backoff`)."""
    parser.add_argument(
        "--restart",
        choices=RESTART_MODES,
        help="restart policy of every component: always (with back-off, like Kubernetes; "
        "the default) or never (a dead component stays dead)",
    )
    parser.add_argument(
        "--restart-backoff",
        type=_checked(bench_config.VALIDATORS["restart_backoff"]),
        metavar="S",
        help="first restart back-off in seconds, doubled per crash in a row (default 0.5)",
    )


def _faults(args: argparse.Namespace) -> int:
    config = _run_config(args)
    options = faults.Options(
        faults=tuple(faults.parse_faults(args.faults)),
        rate=None if args.fault_rate == "auto" else _positive(args.fault_rate, "--fault-rate"),
        pause_s=_positive(args.pause_s, "--pause-s"),
        before_s=args.before_s,
        after_s=args.after_s,
        service=args.service,
    )
    faults.run(config, options, ["run_bench.py", *(args.argv or [])])
    return 0


def _positive(text: str | float, name: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise bench_config.ConfigError(f"{name}: expected a number > 0, got {text!r}")
    return value


def _add_faults(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "faults",
        help="fault-tolerance benchmark: kill or pause one component under steady load",
        description=(
            "Calibrate every stack (a short closed-loop level; skipped with --fault-rate), "
            "then per stack: start it once and, for each fault, run Locust at one steady "
            "open-loop rate (half the slowest stack's capacity unless given), inject the "
            "fault a few seconds in (kill = SIGKILL, pause = SIGSTOP for --pause-s) and "
            "watch the recovery under the stack's restart policy. Writes results/<UTC "
            "timestamp>/faults.csv (requests, failed by status, worst latency, recovery "
            "time, blast radius, restarts per stack and fault), faults.json (the timelines) "
            "and report.html. Faults a stack has no target for are listed as not applicable."
        ),
    )
    parser.add_argument(
        "--meshes", metavar="A,B", help=f"stacks to test, in order ({','.join(MESHES)})"
    )
    parser.add_argument(
        "--faults",
        default="all",
        metavar="K:T,...",
        type=_checked(_fault_list),
        help="faults KIND:TARGET, KIND kill or pause, TARGET worker, sidecar, gateway, "
        "nodeproxy, dpu-daemon or dpa-daemon (default: all)",
    )
    parser.add_argument(
        "--fault-rate",
        default="auto",
        metavar="R",
        help="open-loop req/s of every stack (default auto: half the slowest calibrated)",
    )
    parser.add_argument(
        "--pause-s", default=3.0, type=float, metavar="S", help="SIGSTOP length (default 3)"
    )
    parser.add_argument(
        "--before-s", default=3, type=int, metavar="S", help="load before the fault (default 3)"
    )
    parser.add_argument(
        "--after-s",
        default=10,
        type=int,
        metavar="S",
        help="load after the fault (after the pause ends; default 10)",
    )
    parser.add_argument(
        "--service",
        metavar="SVC",
        help="whose worker or sidecar is hit (default: the entry service's first callee)",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings (bench.toml)")
    _add_load_options(parser)
    parser.set_defaults(handler=_faults, quick=False, rates=None)


def _fault_list(text: str) -> str:
    faults.parse_faults(text)
    return text


def _k8s(args: argparse.Namespace) -> int:
    from harness.deploy import k8s  # YAML and schema code only when asked for

    meshes = bench_config.parse_list(args.meshes, "meshes") if args.meshes else None
    config = _stack_config(
        args, meshes=meshes, dpu_profile=args.dpu_profile, dpu_speed=args.dpu_speed
    )
    model = resolve(config.dpu_profile, {"dpu_speed": config.dpu_speed})
    settings = runner.settings_of(config)
    descs = [describe(mesh, settings) for mesh in config.meshes]
    written = k8s.write(descs, args.out, resources=k8s.resources_for(model))
    counts = k8s.validate_all(args.out)
    for mesh, paths in written.items():
        documents = sum(counts[p] for p in paths)
        print(f"{mesh}: {len(paths)} files, {documents} objects under {args.out / mesh}")
    print(f"every object validates against Kubernetes {k8s.KUBERNETES_VERSION} (strict)")
    return 0


def _add_k8s(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "k8s",
        help="write Kubernetes manifests of the stacks (validated offline; nothing is applied)",
        description=(
            "Render each stack's description as Kubernetes manifests: dpumesh as the seed "
            "lays it out (dpa-daemon and dpu-daemon DaemonSets in dpumesh-system, one worker "
            "Deployment per service in mubench-dpu), envoy as app + sidecar pods with a "
            "gateway, nomesh as plain apps, and a Locust master (web UI or headless) with "
            "workers. Every object is checked against the official Kubernetes schemas. "
            "README.md says how to apply them on a cluster."
        ),
    )
    _add_stack_options(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument("--meshes", metavar="A,B", help=f"stacks ({','.join(MESHES)}; default all)")
    for flag, key, metavar, text in _DPU_OPTIONS:
        if key in ("dpu_profile", "dpu_speed"):  # the DPU daemons' CPU limits
            parser.add_argument(flag, dest=key, metavar=metavar, help=text)
    parser.set_defaults(handler=_k8s)


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="render the HTML report of one or more results directories",
        description=reports_cli.DESCRIPTION,
    )
    reports_cli.add_arguments(parser)
    parser.set_defaults(handler=reports_cli.run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_bench.py",
        description=(
            "Compare a DPU-offloaded service mesh (dpumesh) with an Envoy sidecar mesh "
            "and no mesh over the same μBench topology on this machine."
        ),
        epilog="Exit status 2: unusable input (an option, setting, workmodel or service id).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_run(subparsers)
    _add_whatif(subparsers)
    _add_faults(subparsers)
    _add_report(subparsers)
    _add_serve(subparsers)
    _add_k8s(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; exit status as an int."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv or ["run"])
    args.argv = argv
    try:
        return args.handler(args)
    except PlacementError as exc:  # a DPU model this machine cannot give: nothing started
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # unusable input: ConfigError, WorkmodelError, a bad service id
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Ctrl-C stops every command cleanly at any moment, even when a non-interactive
    # shell started us in the background with SIGINT ignored (as CI runners do).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
