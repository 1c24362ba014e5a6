"""Long fuzz run against a real DPUmesh bridge: hostile inputs, each on its own connection.

`python -m harness.run.fuzz_bridge --inputs 20000` starts its own `dpumesh`
stack (the local deployer, as `run_bench.py serve --mesh dpumesh` does, on a
free port), sends the seeded inputs of `tests/fuzz_inputs.py` in batches from
a few client threads while a liveness client sends a valid request every
50 ms, and judges every answer by the rules in that module's docstring.
`--mesh-port P` aims at a bridge that is already running instead (its
dpu-daemon is found by its listening socket, for the fd and RSS figures).

Prints a progress line per batch and, at the end, a table: inputs sent,
answers by status class, closes without an answer, protocol violations, the
longest liveness wait, and the dpu-daemon's file descriptors, the namespace's
shared-memory objects and the daemon's RSS before and after. Exits 1 if any
answer broke the rules, a liveness request waited longer than
`--max-liveness-wait`, or fds or shared memory did not come back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from harness.deploy import start_stack
from harness.ports import free_ports
from tests.fuzz_inputs import MUBENCH_CELL, SEED_APP, Generator, Liveness, send, violation
from tests.mesh import shm_objects

DPU_ROLE = "dpu-daemon"
TARGETS = {"mubench": MUBENCH_CELL, "seed-app": SEED_APP}


def _fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).memory_info().rss / (1 << 20)
    except psutil.Error:
        return None


def _listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:`port`, if this user may see it."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def _settle(read: Callable[[], int | None], baseline: int | None, timeout_s: float) -> int | None:
    """Wait (bounded) for `read()` to come back to `baseline`; the last value read."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value is not None and baseline is not None and value > baseline:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
        value = read()
    return value


def fuzz(
    port: int,
    *,
    inputs: int,
    seed: int,
    batch: int,
    clients: int,
    read_timeout_s: float,
    targets_name: str,
    pid: int | None,
    namespace: str | None,
) -> dict:
    """Send `inputs` generated inputs to the bridge on `port`; the figures for the table."""
    targets = TARGETS[targets_name]
    liveness_request = targets.get_line() + b" HTTP/1.1\r\nHost: bridge\r\n\r\n"
    warm = send(port, liveness_request, timeout_s=10.0)
    if warm.statuses != [200]:
        raise SystemExit(f"fuzz_bridge: the bridge does not answer a valid request: {warm}")
    gen = Generator(seed, targets)
    fds0, rss0 = _fds(pid), _rss_mib(pid)
    shm0 = shm_objects(namespace) if namespace else None
    classes: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    problems: list[str] = []
    began = time.monotonic()
    sent = 0
    with Liveness(port, liveness_request) as live, ThreadPoolExecutor(clients) as pool:
        while sent < inputs:
            items = gen.batch(min(batch, inputs - sent))
            outcomes = list(pool.map(lambda item: send(port, item.data, read_timeout_s), items))
            sent += len(items)
            for item, out in zip(items, outcomes, strict=True):
                classes[out.klass] += 1
                by_kind.setdefault(item.kind, Counter())[out.klass] += 1
                why = violation(item, out)
                if why is not None:
                    problems.append(f"{item.kind} {item.data[:100]!r}: {why}")
            fds = _fds(pid)
            print(
                f"{sent:>7}/{inputs} inputs  "
                + "  ".join(f"{k} {v}" for k, v in sorted(classes.items()))
                + f"  violations {len(problems)}  liveness max {live.max_wait * 1e3:.0f} ms"
                + (f"  fds {fds - fds0:+d}" if fds is not None and fds0 is not None else ""),
                flush=True,
            )
    elapsed = time.monotonic() - began
    fds1 = _settle(lambda: _fds(pid), fds0, timeout_s=10.0)
    shm1 = shm_objects(namespace) if namespace else None
    return {
        "inputs": sent,
        "classes": classes,
        "by_kind": by_kind,
        "problems": problems,
        "liveness": live,
        "fds": (fds0, fds1),
        "shm": (None if shm0 is None else len(shm0), None if shm1 is None else len(shm1)),
        "shm_same": shm0 == shm1,
        "rss": (rss0, _rss_mib(pid)),
        "elapsed_s": elapsed,
    }


def _pair(pair: tuple, unit: str = "", fmt: str = "{}") -> str:
    before, after = pair
    if before is None or after is None:
        return "n/a (dpu-daemon not found)"
    delta = fmt.format(after - before)
    sign = "+" if after >= before else ""
    return f"{fmt.format(before)}{unit} -> {fmt.format(after)}{unit} ({sign}{delta}{unit})"


def report(figures: dict, max_wait_s: float) -> int:
    """Print the table; 0 if everything held, 1 otherwise."""
    classes: Counter = figures["classes"]
    live: Liveness = figures["liveness"]
    rows = [
        ("inputs sent", str(figures["inputs"])),
        ("answered 2xx", str(classes["2xx"])),
        ("answered 4xx", str(classes["4xx"])),
        ("answered 5xx", str(classes["5xx"])),
        ("closed, no answer", str(classes["close"])),
        ("hung / garbled", f"{classes['hung']} / {classes['garbled']}"),
        ("protocol violations", str(len(figures["problems"]))),
        (
            "liveness wait",
            f"max {live.max_wait * 1e3:.1f} ms, median {live.median_wait * 1e3:.1f} ms "
            f"({len(live.waits)} requests, {len(live.failures)} failed)",
        ),
        ("dpu-daemon fds", _pair(figures["fds"])),
        ("shm objects", _pair(figures["shm"])),
        ("dpu-daemon RSS", _pair(figures["rss"], " MiB", "{:.1f}")),
        ("elapsed", f"{figures['elapsed_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    kinds = figures["by_kind"]
    cols = sorted({c for counts in kinds.values() for c in counts})
    kw = max(len(k) for k in kinds)
    print(f"{'input kind':<{kw}}  " + "  ".join(f"{c:>7}" for c in cols))
    for kind in sorted(kinds):
        print(f"{kind:<{kw}}  " + "  ".join(f"{kinds[kind][c]:>7}" for c in cols))
    for line in figures["problems"][:20]:
        print("VIOLATION", line)
    fds0, fds1 = figures["fds"]
    failed = (
        bool(figures["problems"])
        or bool(live.failures)
        or live.max_wait > max_wait_s
        or (fds0 is not None and fds1 != fds0)
        or not figures["shm_same"]
    )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Start (or find) a bridge, fuzz it, print the table; exit 1 if a rule was broken."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.fuzz_bridge",
        description=(
            "Send seeded hostile inputs (mutated HTTP requests, mutated seed JSON, random "
            "bytes; tests/fuzz_inputs.py) to a real DPUmesh bridge, one per connection, while "
            "a liveness client measures how long valid requests wait."
        ),
    )
    parser.add_argument("--inputs", type=int, default=20_000, metavar="N", help="default 20000")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="generator seed")
    parser.add_argument("--batch", type=int, default=500, metavar="B", help="inputs per batch")
    parser.add_argument("--clients", type=int, default=8, metavar="C", help="client threads")
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds a client waits for the bridge to answer and close (default 3)",
    )
    parser.add_argument(
        "--max-liveness-wait",
        type=float,
        default=0.5,
        metavar="S",
        help="longest acceptable wait of a liveness request (default 0.5 s)",
    )
    parser.add_argument(
        "--mesh-port",
        type=int,
        metavar="P",
        help="fuzz the bridge already listening on 127.0.0.1:P instead of starting one",
    )
    parser.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        default="mubench",
        help="what answers valid requests: the μBench cell (default, also what is started) "
        "or tests/apps/seed_app.py",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="μBench --scale of the stack")
    parser.add_argument("--run-dir", type=Path, metavar="DIR", help="logs of the started stack")
    args = parser.parse_args(argv)
    options = {
        "inputs": args.inputs,
        "seed": args.seed,
        "batch": args.batch,
        "clients": args.clients,
        "read_timeout_s": args.read_timeout,
        "targets_name": args.targets,
    }
    if args.mesh_port is not None:
        port = args.mesh_port
        print(f"fuzzing the bridge on 127.0.0.1:{port}", flush=True)
        figures = fuzz(port, pid=_listener_pid(port), namespace=None, **options)
    else:
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fuzz-bridge-"))
        (port,) = free_ports(1)
        with start_stack("dpumesh", run_dir=run_dir, port=port, scale=args.scale) as stack:
            (dpu,) = stack.roles()[DPU_ROLE]
            print(
                f"dpumesh stack on 127.0.0.1:{port} (namespace {stack.namespace}, "
                f"dpu-daemon pid {dpu.pid}, logs in {run_dir})",
                flush=True,
            )
            figures = fuzz(port, pid=dpu.pid, namespace=stack.namespace, **options)
    sys.exit(report(figures, args.max_liveness_wait))


if __name__ == "__main__":
    main()
