"""Process supervision: readiness, whole-tree teardown on every exit path, ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from harness.ports import free_ports, port_is_free, release_ports, wait_port_free
from harness.procs import StartError, Supervisor, http_ok

REPO = Path(__file__).resolve().parents[1]


def _gone(pid: int, create_time: float, timeout_s: float = 5.0) -> bool:
    """Whether the process identified by (pid, create_time) is dead or a zombie."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != create_time or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _identity(pid: int) -> tuple[int, float]:
    return pid, psutil.Process(pid).create_time()


def test_free_ports_are_distinct_and_never_reissued():
    first = free_ports(40)
    second = free_ports(40)
    assert len(set(first)) == 40
    assert not set(first) & set(second)
    release_ports(first + second)


# Parent -> child -> grandchild; the grandchild leaves the session (so group
# signals miss it) and ignores SIGTERM; its parent dies on SIGTERM, orphaning it.
_TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    level, pidfile = int(sys.argv[1]), sys.argv[2]
    if level == 2:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(pidfile + ".tmp", "w").write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        time.sleep(60)
    else:
        subprocess.Popen([sys.executable, "-c", sys.argv[3], str(level + 1), pidfile, sys.argv[3]])
        time.sleep(60)
    """
)


def test_teardown_kills_whole_tree_including_escaped_grandchild(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    with Supervisor(tmp_path / "run", grace_s=0.5) as sup:
        proc = sup.start(
            "tree",
            [sys.executable, "-c", _TREE, "0", str(pidfile), _TREE],
            role="app",
            ready=pidfile.exists,
        )
        sup.wait_ready(timeout_s=20)
        grandchild = int(pidfile.read_text())
        members = {p.pid for p in sup.roles()["app"]}
        assert {proc.pid, grandchild} <= members and len(members) == 3
        identities = [_identity(pid) for pid in members]
        started = time.monotonic()
    assert all(_gone(pid, ct) for pid, ct in identities)
    assert time.monotonic() - started < 5  # SIGKILL came after the grace period
    assert sup.roles()["app"] == []
    sup.stop()  # idempotent


def test_failed_readiness_reports_log_tail_and_leaves_nothing(tmp_path):
    (port,) = free_ports(1)
    with Supervisor(tmp_path / "run", grace_s=1) as sup:
        sleeper = sup.start("sleeper", ["sleep", "60"], role="app")
        sleeper_id = _identity(sleeper.pid)
        sup.start(
            "crasher",
            [sys.executable, "-c", "import sys; print('boom: bad flag', flush=True); sys.exit(3)"],
            role="sidecar",
            ready=http_ok(f"http://127.0.0.1:{port}/"),
        )
        with pytest.raises(StartError) as err:
            sup.wait_ready(timeout_s=20)
        assert "crasher" in str(err.value)
        assert "exit code 3" in str(err.value)
        assert "boom: bad flag" in str(err.value)
        assert _gone(*sleeper_id)
        with pytest.raises(RuntimeError):
            sup.start("late", ["sleep", "1"], role="app")
    assert all(p.popen.returncode is not None for p in sup.procs.values())
    release_ports([port])


def test_missing_executable_is_a_start_error(tmp_path):
    with Supervisor(tmp_path / "run") as sup, pytest.raises(StartError, match="cannot run"):
        sup.start("ghost", [str(tmp_path / "no-such-binary")], role="loadgen")


def test_ports_are_free_after_teardown(tmp_path):
    (port,) = free_ports(1)
    with Supervisor(tmp_path / "run", grace_s=2) as sup:
        sup.start(
            "web",
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            role="app",
            cwd=tmp_path,
            ready=http_ok(f"http://127.0.0.1:{port}/"),
        )
        sup.wait_ready(timeout_s=20)
        assert not port_is_free(port)
    wait_port_free(port, timeout_s=2)
    release_ports([port])


# A harness process: supervises `sleep`, reports its pid, then ends in one of
# the ways a benchmark run can end.
_HARNESS = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from harness.procs import Supervisor
    signal.signal(signal.SIGINT, signal.default_int_handler)  # may be inherited as ignored
    how, run_dir = sys.argv[1], Path(sys.argv[2])
    sup = Supervisor(run_dir, grace_s=1)
    if how == "exit":
        print(sup.start("sleeper", ["sleep", "60"], role="app").pid, flush=True)
        sys.exit(0)
    with sup:
        print(sup.start("sleeper", ["sleep", "60"], role="app").pid, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize(
    ("how", "sig"), [("exit", None), ("sigterm", signal.SIGTERM), ("ctrl-c", signal.SIGINT)]
)
def test_harness_exit_tears_down_children(tmp_path, how, sig):
    harness = subprocess.Popen(
        [sys.executable, "-c", _HARNESS, how, str(tmp_path / "run")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = _identity(int(harness.stdout.readline()))
        if sig is not None:
            harness.send_signal(sig)
        harness.wait(timeout=20)
        assert _gone(*child)
    finally:
        harness.kill()
        harness.wait()
        harness.stdout.close()


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here, even if pytest inherited it as ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupted_popen(monkeypatch, module) -> list[subprocess.Popen]:
    """Make `module`'s Popen deliver SIGINT to us just after the child is forked."""
    spawned: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        child = real_popen(*args, **kwargs)
        spawned.append(child)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C before the caller has recorded the child
        return child

    monkeypatch.setattr(module.subprocess, "Popen", popen)
    return spawned


def test_ctrl_c_while_a_child_is_being_started_leaves_no_child(
    tmp_path, monkeypatch, sigint_raises
):
    import harness.procs

    spawned = _interrupted_popen(monkeypatch, harness.procs)
    sup = Supervisor(tmp_path / "run", grace_s=0.5)
    with pytest.raises(KeyboardInterrupt):
        sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], role="app")
    assert "sleeper" in sup.procs  # recorded before the interrupt was let through
    sup.stop()
    (child,) = spawned
    assert child.wait(timeout=10) is not None


def test_ctrl_c_while_locust_is_being_started_stops_it(tmp_path, monkeypatch, sigint_raises):
    import harness.run.loadgen
    from harness.run.loadgen import LocustRun, LocustSpec

    spawned = _interrupted_popen(monkeypatch, harness.run.loadgen)
    monkeypatch.setattr(
        harness.run.loadgen,
        "locust_argv",
        lambda _spec: [sys.executable, "-c", "import time; time.sleep(60)"],
    )
    spec = LocustSpec(
        host="http://127.0.0.1:9",
        users=1,
        rate=None,
        excluded_s=0,
        measured_s=1,
        hdr_out=tmp_path / "h.hdr",
        csv_prefix=tmp_path / "locust" / "x",
        request_id_prefix="x-",
    )
    with pytest.raises(KeyboardInterrupt):
        LocustRun(spec)
    (child,) = spawned
    assert child.poll() is not None  # stopped before the interrupt went on


def test_before_arm_restarts_a_dead_leader_stays_an_unreaped_zombie(tmp_path):
    """Until the stack is up nothing restarts, and the dead leader keeps its pid reserved."""
    with Supervisor(tmp_path / "run", grace_s=1) as sup:
        proc = sup.start("quitter", [sys.executable, "-c", "import sys; sys.exit(4)"], role="app")
        deadline = time.monotonic() + 20
        while proc.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.exit_status() == "exit code 4"
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert proc.popen.returncode is None
        assert sup.restarts() == {"quitter": 0}
    assert proc.popen.returncode == 4  # reaped by the teardown, not before


def test_supervision_leaves_no_descriptor_open(tmp_path):
    """Each watcher's pidfd is closed by the end of `stop()`, restarts included."""
    before = len(os.listdir("/proc/self/fd"))
    with Supervisor(tmp_path / "run", grace_s=1) as sup:
        proc = sup.start("sleeper", ["sleep", "60"], role="app")
        sup.start("quitter", [sys.executable, "-c", "pass"], role="app")
        sup.arm_restarts()
        os.kill(proc.pid, signal.SIGKILL)
        assert sup.wait_restarts({"sleeper": 1}, timeout_s=10)
    assert len(os.listdir("/proc/self/fd")) == before
