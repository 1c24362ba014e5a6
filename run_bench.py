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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from harness.deploy import netns
from harness.deploy.local import serve
from harness.names import MESHES
from harness.placement.layout import PlacementError
from harness.placement.profiles import resolve
from harness.procs import StartError
from harness.run import config as bench_config
from harness.run import faults, plan, runner
from harness.stacks import describe
from reports import __main__ as reports_cli


def _serve(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path("runs", f"serve-{args.mesh}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    config = bench_config.for_command("serve", args)
    with runner.prepare_placement(config) as placement:
        print(f"model: {placement.record()['sentence']}", flush=True)
        settings = runner.settings_of(config, placement.model)
        options = {
            "port": config.port,
            "run_dir": run_dir,
            "placement": placement,
            "restart": runner.restart_policy(config),
        }
        if args.locust_ui:
            from harness.run import webui  # Locust's web UI beside the stack

            webui.serve(describe(args.mesh, settings), locust_port=args.locust_port, **options)
        else:
            serve(describe(args.mesh, settings), **options)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start one stack and keep it running until Ctrl-C",
        description=(
            "Start one stack (all its processes on 127.0.0.1, or with --nodes in network "
            "namespaces) for the workmodel, print a "
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
        help="dpumesh: DPU-offloaded mesh; envoy: Envoy sidecars + gateway; nodeproxy: one "
        "shared Envoy per node + gateway; nomesh: services call each other directly (the floor)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="where logs and configs go (default runs/serve-<mesh>-<UTC timestamp>)",
    )
    parser.add_argument(
        "--locust-ui",
        action="store_true",
        help="also start Locust's web UI against the stack, with a Mesh tab (µs percentiles, "
        "the stack's own counters); both stop on Ctrl-C",
    )
    parser.add_argument(
        "--locust-port",
        type=bench_config.argument(bench_config.whole_number(1, 65535)),
        default=8089,
        metavar="N",
        help="port of Locust's web UI on the load generator's address (127.0.0.1, or the "
        "client namespace's with --nodes; default %(default)s)",
    )
    bench_config.add_options(parser, "serve")
    parser.set_defaults(handler=_serve)


def _run_config(args: argparse.Namespace, command: str, **more: object) -> bench_config.BenchConfig:
    """The config of `run`, `whatif` or `faults`: bench.toml (or --config), --quick, the
    command's options, then `more`."""
    overrides = {**bench_config.given(args, command), **more}
    config = bench_config.load(args.config, overrides, quick=getattr(args, "quick", False))
    if config.nodes:
        netns.require_root()  # one line now, not once per stack start
    return config


def _run(args: argparse.Namespace) -> int:
    config = _run_config(args, "run")
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
    _add_config_file_options(parser, quick=True)
    bench_config.add_options(parser, "run")
    parser.set_defaults(handler=_run)


def _whatif(args: argparse.Namespace) -> int:
    values = [float(v) for v in bench_config.parse_list(args.values, "values")]
    baselines = bench_config.parse_list(args.baselines, "baselines")
    for mesh in baselines:
        if mesh not in MESHES:
            raise bench_config.ConfigError(f"--baselines: unknown stack {mesh!r}")
    compared = plan.whatif_stacks(baselines, args.param, values)
    # What meta.json's config says was run.
    config = _run_config(args, "whatif", meshes=[*baselines, "dpumesh"])
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
        type=bench_config.argument(_whatif_values),
        help="its values (at least one; e.g. 0.25,0.5,1,2)",
    )
    parser.add_argument(
        "--baselines",
        default="envoy,nomesh",
        metavar="A,B",
        help="stacks measured once (default envoy,nomesh)",
    )
    _add_config_file_options(parser, quick=True)
    bench_config.add_options(parser, "whatif")
    parser.set_defaults(handler=_whatif)


def _whatif_values(text: str) -> str:
    """The --values list, checked to be finite numbers >= 0 (the parameter checks the rest)."""
    check = bench_config.finite_number(zero_ok=True)
    for item in bench_config.parse_list(text, "values"):
        check(item)
    return text


def _add_config_file_options(parser: argparse.ArgumentParser, *, quick: bool) -> None:
    """--config (and --quick): where the settings the options override come from."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML settings (default: bench.toml)"
    )
    if quick:
        parser.add_argument(
            "--quick",
            action="store_true",
            help="a rough look in about 2 minutes: "
            + ", ".join(f"{k}={v}" for k, v in bench_config.QUICK.items()),
        )


def _faults(args: argparse.Namespace) -> int:
    config = _run_config(args, "faults")
    options = faults.Options(
        faults=args.faults,
        rate=args.fault_rate,
        pause_s=args.pause_s,
        before_s=args.before_s,
        after_s=args.after_s,
        service=args.service,
    )
    faults.run(config, options, ["run_bench.py", *(args.argv or [])])
    return 0


_POSITIVE = bench_config.argument(bench_config.finite_number(zero_ok=False))


def _fault_rate(text: str) -> float | None:
    """--fault-rate: None for auto (half the slowest calibrated), or a rate > 0."""
    return None if text == "auto" else bench_config.finite_number(zero_ok=False)(text)


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
        "--faults",
        default="all",
        metavar="K:T,...",
        type=bench_config.argument(_fault_list),
        help="faults KIND:TARGET, KIND kill or pause, TARGET worker, sidecar, gateway, "
        "nodeproxy, dpu-daemon or dpa-daemon (default: all)",
    )
    parser.add_argument(
        "--fault-rate",
        default="auto",
        metavar="R",
        type=bench_config.argument(_fault_rate),
        help="open-loop rate of every stack (default auto: half the slowest calibrated; req/s)",
    )
    parser.add_argument(
        "--pause-s",
        default=3.0,
        type=_POSITIVE,
        metavar="S",
        help="SIGSTOP length (default 3 s)",
    )
    parser.add_argument(
        "--before-s",
        default=3,
        type=bench_config.argument(bench_config.whole_number(0)),
        metavar="S",
        help="load before the fault (default 3 s)",
    )
    parser.add_argument(
        "--after-s",
        default=10,
        type=bench_config.argument(bench_config.whole_number(1)),
        metavar="S",
        help="load after the fault, after the pause ends (default 10 s)",
    )
    parser.add_argument(
        "--service",
        metavar="SVC",
        help="whose worker or sidecar is hit (default: the entry service's first callee)",
    )
    _add_config_file_options(parser, quick=False)
    bench_config.add_options(parser, "faults")
    parser.set_defaults(handler=_faults)


def _fault_list(text: str) -> tuple[faults.Fault, ...]:
    return tuple(faults.parse_faults(text))


def _k8s(args: argparse.Namespace) -> int:
    from harness.deploy import k8s  # YAML and schema code only when asked for

    config = bench_config.for_command("k8s", args)
    model = resolve(config.dpu_profile, runner.model_overrides(config))
    settings = runner.settings_of(config, model)
    descs = [describe(mesh, settings) for mesh in config.meshes]
    written = k8s.write(descs, args.manifests, resources=k8s.resources_for(model))
    counts = k8s.validate_all(args.manifests)
    for mesh, paths in written.items():
        documents = sum(counts[p] for p in paths)
        print(f"{mesh}: {len(paths)} files, {documents} objects under {args.manifests / mesh}")
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
            "gateway, nodeproxy as apps with a node-proxy DaemonSet and a gateway, nomesh as "
            "plain apps, and a Locust master (web UI or headless) with "
            "workers. Every object is checked against the official Kubernetes schemas. "
            "README.md says how to apply them on a cluster."
        ),
    )
    parser.add_argument(
        "--out", dest="manifests", type=Path, required=True, metavar="DIR", help="output directory"
    )
    bench_config.add_options(parser, "k8s")
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
