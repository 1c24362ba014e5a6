#!/usr/bin/env python3
"""DPUmesh bench command line: argument parsing only; the work is in `harness`.

Each subcommand is one `_add_<name>(subparsers)` function that registers its
arguments and sets `handler`; `main` dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from harness.procs import StartError
from harness.stacks import DEFAULT_PORT, DEFAULT_WORKMODEL, MESHES, serve
from mubench.workmodel import WorkmodelError


def _serve(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path("runs", f"serve-{args.mesh}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    serve(
        args.mesh, args.workmodel, port=args.port, run_dir=run_dir, seed=args.seed, scale=args.scale
    )
    return 0


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
    parser.add_argument(
        "--workmodel",
        type=Path,
        default=DEFAULT_WORKMODEL,
        metavar="PATH",
        help="μBench workmodel.json (default: workmodels/default.json)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="N",
        help="public port on 127.0.0.1 (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="μBench random seed (default 0)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply the cells' pi computations and sleeps by F (default 1; <1 for smoke tests)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="where logs and configs go (default runs/serve-<mesh>-<UTC timestamp>)",
    )
    parser.set_defaults(handler=_serve)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_bench.py",
        description=(
            "Compare a DPU-offloaded service mesh (dpumesh) with an Envoy sidecar mesh "
            "and no mesh over the same μBench topology on this machine."
        ),
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_serve(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; exit status as an int."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (WorkmodelError, StartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
