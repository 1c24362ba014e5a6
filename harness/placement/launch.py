"""Start a process already placed: in its cgroups and on its CPUs before its first instruction.

The restriction must hold for the whole process tree and every thread from
the start, so it is applied by the command itself, before it execs the real
program: children and threads inherit both cgroup membership and CPU
affinity. Popen's preexec_fn is not an option (unsafe in the multi-threaded
harness), and pinning a process after it started would miss threads and
children it made before.

The mechanism is the cheapest real one: `/bin/sh` writes its own pid into
each cgroup's `cgroup.procs` and execs `taskset -c CPUS` (util-linux, part of
every Debian base system), which sets the affinity and execs the program, so
the pid the caller sees is the program's. Both are small C programs (a few
ms), where a Python entry point would cost tens of ms per process. Every
path and argument reaches them as a separate argv element, never inside the
shell script's text, so nothing is interpolated by the shell. If joining a
cgroup fails the shell prints why and exits 126, before the program starts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.placement.layout import PlacementError, format_cpus

# $1 = number of cgroup.procs files, then the files, then the command to exec.
_JOIN = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 126; n=$((n-1)); shift; done; '
    'exec "$@"'
)


def wrap_argv(
    argv: Sequence[str],
    cpus: Iterable[int] | None,
    procs_files: Iterable[Path] = (),
) -> list[str]:
    """A command that joins `procs_files`' cgroups, pins itself to `cpus`, then execs `argv`.

    With no cpus and no cgroups it is `argv` unchanged (the `shared` layout).
    """
    command = [str(arg) for arg in argv]
    if not command:
        raise PlacementError("no command to start")
    if cpus is not None:
        cpu_set = frozenset(cpus)
        if not cpu_set:
            raise PlacementError(f"empty CPU set for {command[0]}")
        taskset = shutil.which("taskset")
        if taskset is None:
            raise PlacementError("cannot pin CPUs: taskset not found (install util-linux)")
        # taskset stops parsing options at the CPU list, so argv[0] is never taken as one.
        command = [taskset, "-c", format_cpus(cpu_set), *command]
    files = [str(path) for path in procs_files]
    if files:
        command = ["/bin/sh", "-c", _JOIN, "dpumesh-enter", str(len(files)), *files, *command]
    return command
