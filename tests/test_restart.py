"""Restarts (DESIGN §9): every component runs under a restart policy with back-off.

Unit tests drive `harness.procs.Supervisor` with tiny Python children; the
stack tests kill -9 a DPUmesh daemon or an Envoy sidecar of a real local
stack and wait, bounded, until it is restarted and the stack answers again.
The compose tests do the same with Docker's restart policy. Every wait is on
an event (a restart recorded, a notice sent) or bounded; no sleep decides a
verdict.
"""

from __future__ import annotations

import http.client
import os
import signal
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable

import psutil
import pytest
import yaml

from baselines.envoy.config import envoy_binary
from harness.deploy import start_stack
from harness.deploy.compose.render import generate
from harness.deploy.compose.restarts import ContainerRestart, EnginePairing, exit_how, joiners_of
from harness.measure.checks import no_restarts
from harness.names import DEFAULT_WORKMODEL, ROLE_CPU_SET
from harness.placement.apply import prepare
from harness.ports import free_ports, port_is_free
from harness.procs import NEVER, RestartPolicy, StartError, Supervisor, http_ok
from harness.stacks import describe
from harness.stacks.model import Settings
from tests.conftest import require_external

SERVE_AGAIN_S = 20.0


class Notices:
    """A `notify` callback that tests can wait on (a condition, not a poll)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, text: str, timeout_s: float = 10.0) -> str:
        with self._cond:
            self._cond.wait_for(lambda: any(text in line for line in self.lines), timeout_s)
            found = [line for line in self.lines if text in line]
        assert found, f"no notice containing {text!r} in {self.lines}"
        return found[0]


def _eventually(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """A bounded wait for something only observable from outside (a file, a socket)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _gone(identity: tuple[int, float]) -> bool:
    """The process (pid, create time) no longer runs (dead, reaped, or a zombie)."""
    pid, created = identity
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _identity(pid: int) -> tuple[int, float]:
    return pid, psutil.Process(pid).create_time()


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose command line carries `marker` (what a test started)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


# Prints its pid to its log, then waits to be killed.
_SLEEPER = """
    import os, sys, time
    print(f"child {os.getpid()} up", flush=True)
    time.sleep(600)
"""


# --- the policy itself -------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_a_long_run_resets_it():
    policy = RestartPolicy(initial_backoff_s=0.5, factor=2, max_backoff_s=3, reset_after_s=10)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff_s(100_000) == 3.0  # a long crash loop stays at the cap
    assert policy.consecutive(4, ran_s=1.0) == 5
    assert policy.consecutive(4, ran_s=10.0) == 1
    assert RestartPolicy().restarts and not NEVER.restarts
    assert NEVER.as_dict()["mode"] == "never"


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "sometimes"},
        {"initial_backoff_s": -1},
        {"initial_backoff_s": 5, "max_backoff_s": 1},
        {"factor": 0.5},
        {"reset_after_s": -1},
    ],
)
def test_a_nonsense_policy_is_refused(bad):
    with pytest.raises(ValueError):
        RestartPolicy(**bad)


# --- the supervisor ----------------------------------------------------------------------


def test_kill_9_restarts_counts_and_logs(tmp_path):
    notices = Notices()
    policy = RestartPolicy(initial_backoff_s=0.1)
    with Supervisor(tmp_path / "run", grace_s=1, restart=policy, notify=notices) as sup:
        first = sup.start("child", _python(_SLEEPER), role="dpu-daemon", cwd=tmp_path)
        log = first.log_path
        assert _eventually(lambda: f"child {first.pid} up" in log.read_text(), 20)
        sup.arm_restarts()
        old = _identity(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        assert sup.wait_restarts({"child": 1}, timeout_s=10)
        (event,) = sup.restart_events()
        assert (event.component, event.role, event.how, event.number) == (
            "child",
            "dpu-daemon",
            "signal 9",
            1,
        )
        assert event.backoff_s == pytest.approx(0.1)
        assert event.restarted_mono_s - event.at_mono_s >= 0.1
        assert event.at_wall_s <= event.restarted_wall_s
        assert sup.restarts() == {"child": 1}
        assert _gone(old)
        new = sup.procs["child"]
        assert new.pid == event.pid != old[0]
        assert new.pid in {p.pid for p in sup.roles()["dpu-daemon"]}
        line = notices.wait_for("child (dpu-daemon) ended (signal 9)")
        assert "restart 1 in 0.10 s" in line
        # The same log, appended to: the first run's output, the marker, the second's.
        assert _eventually(lambda: f"child {new.pid} up" in log.read_text(), 20)
        text = log.read_text()
        marker = text.index("=== supervisor")
        assert text.index(f"child {old[0]} up") < marker < text.index(f"child {new.pid} up")
        assert "ended (signal 9)" in text[marker:]
        assert event.as_dict()["component"] == "child"
        second = _identity(new.pid)
    assert _gone(second)


def test_backoff_grows_between_consecutive_crashes(tmp_path):
    policy = RestartPolicy(initial_backoff_s=0.5, factor=2, max_backoff_s=10, reset_after_s=60)
    with Supervisor(tmp_path / "run", restart=policy, notify=Notices()) as sup:
        sup.start("crasher", _python("import sys; sys.exit(3)"), role="app")
        sup.arm_restarts()
        assert sup.wait_restarts({"crasher": 3}, timeout_s=30)
        events = sup.restart_events()[:3]
    assert [e.how for e in events] == ["exit code 3"] * 3
    assert [e.number for e in events] == [1, 2, 3]
    assert [e.backoff_s for e in events] == pytest.approx([0.5, 1.0, 2.0])
    gaps = [e.restarted_mono_s - e.at_mono_s for e in events]
    assert all(gap >= e.backoff_s for gap, e in zip(gaps, events, strict=True))
    assert gaps[1] >= 1.5 * gaps[0] and gaps[2] >= 1.5 * gaps[1], gaps
    # Measured between the crashes themselves too: each wait is longer than the last.
    crashes = [e.at_mono_s for e in events]
    assert crashes[2] - crashes[1] > crashes[1] - crashes[0]


def test_never_leaves_a_dead_process_dead(tmp_path):
    notices = Notices()
    with Supervisor(tmp_path / "run", grace_s=1, restart=NEVER, notify=notices) as sup:
        proc = sup.start("child", _python(_SLEEPER), role="sidecar")
        assert _eventually(lambda: "up" in proc.log_path.read_text(), 20)
        sup.arm_restarts()
        os.kill(proc.pid, signal.SIGKILL)
        notices.wait_for("policy never: it stays down")
        # Its watcher has returned: nothing is left that could restart it.
        for watcher in [t for t in threading.enumerate() if t.name == "supervise-child"]:
            watcher.join(timeout=10)
            assert not watcher.is_alive()
        assert sup.restarts() == {"child": 0}
        assert sup.restart_events() == []
        assert proc.exit_status() == "signal 9"
        assert sup.procs["child"].pid == proc.pid
        assert sup.roles()["sidecar"] == []
        assert "stays down" in proc.log_path.read_text()


def test_stop_during_the_backoff_starts_nothing_and_leaves_nothing(tmp_path):
    notices = Notices()
    marker = f"restart-test-{uuid.uuid4().hex}"
    # The leader starts a child of its own (same group), then waits to be killed.
    code = """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]])
        print("up", flush=True)
        time.sleep(600)
    """
    policy = RestartPolicy(initial_backoff_s=30, max_backoff_s=30)
    sup = Supervisor(tmp_path / "run", grace_s=1, restart=policy, notify=notices)
    try:
        proc = sup.start("child", _python(code, marker), role="app")
        assert _eventually(lambda: len(_marked(marker)) == 1, 20)
        sup.arm_restarts()
        os.kill(proc.pid, signal.SIGKILL)
        notices.wait_for("restart 1 in 30.00 s")
        assert _marked(marker) == []  # its child died with it, before the back-off
        started = time.monotonic()
        sup.stop()
        assert time.monotonic() - started < 5  # the back-off did not hold the teardown
    finally:
        sup.stop()
    assert sup.restarts() == {"child": 0}
    assert _marked(marker) == []
    assert proc.popen.returncode is not None  # the dead leader was reaped, none started since
    assert sup.procs["child"].popen is proc.popen
    assert not any(t.name == "supervise-child" and t.is_alive() for t in threading.enumerate())


def test_a_restart_kills_the_dead_leaders_children_first(tmp_path):
    marker = f"restart-tree-{uuid.uuid4().hex}"
    # Leader -> child (same group) -> grandchild that leaves the session and ignores SIGTERM.
    code = """
        import os, signal, subprocess, sys, time
        level, marker = int(sys.argv[1]), sys.argv[2]
        if level == 2:
            os.setsid()  # out of the group and session: only the known-descendant list finds it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            me = sys.argv[3]
            subprocess.Popen([sys.executable, "-c", me, str(level + 1), marker, me])
        print("level", level, os.getpid(), flush=True)
        time.sleep(600)
    """
    source = textwrap.dedent(code)
    argv = [sys.executable, "-c", source, "0", marker, source]
    with Supervisor(
        tmp_path / "run", grace_s=1, restart=RestartPolicy(initial_backoff_s=0.1), notify=Notices()
    ) as sup:
        proc = sup.start("tree", argv, role="app")
        assert _eventually(lambda: len(_marked(marker)) == 3, 20)
        members = {p.pid for p in sup.roles()["app"]}  # the supervisor has seen all three
        assert len(members) == 3
        descendants = [_identity(p.pid) for p in _marked(marker) if p.pid != proc.pid]
        sup.arm_restarts()
        os.kill(proc.pid, signal.SIGKILL)
        assert sup.wait_restarts({"tree": 1}, timeout_s=10)
        # Killed and gone before the new leader was started, not merely signalled.
        assert all(_gone(identity) for identity in descendants)
        assert _eventually(lambda: len(_marked(marker)) == 3, 20)  # the new tree is whole
        fresh = [_identity(p.pid) for p in _marked(marker)]
    assert _eventually(lambda: all(_gone(identity) for identity in fresh), 10)


def test_stop_racing_a_crash_loop_leaves_nothing(tmp_path):
    """No back-off: the supervisor restarts as fast as it can while `stop()` comes in."""
    marker = f"restart-race-{uuid.uuid4().hex}"
    code = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]])
        sys.exit(1)
    """
    policy = RestartPolicy(initial_backoff_s=0, max_backoff_s=0)
    sup = Supervisor(tmp_path / "run", grace_s=1, restart=policy, notify=Notices())
    try:
        sup.start("looper", _python(code, marker), role="app")
        sup.arm_restarts()
        assert sup.wait_restarts({"looper": 5}, timeout_s=60)
    finally:
        sup.stop()
    pids = [e.pid for e in sup.restart_events()]
    assert len(pids) >= 5
    assert _eventually(lambda: _marked(marker) == [], 5)
    assert all(not psutil.pid_exists(pid) or _gone(_identity(pid)) for pid in pids)
    assert not any(t.name == "supervise-looper" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        sup.start("late", ["sleep", "1"], role="app")


def test_a_process_dying_before_the_stack_is_up_fails_the_start(tmp_path):
    """Restarts apply once the stack is up: before that, a crash is a failed start."""
    (port,) = free_ports(1)
    with Supervisor(tmp_path / "run", grace_s=1, notify=Notices()) as sup:
        sup.start(
            "crasher",
            _python("import sys; print('bad flag', flush=True); sys.exit(3)"),
            role="sidecar",
            ready=http_ok(f"http://127.0.0.1:{port}/"),
        )
        with pytest.raises(StartError, match="exit code 3"):
            sup.wait_ready(timeout_s=20)
        assert sup.restarts() == {"crasher": 0}
        assert sup.restart_events() == []


# --- the self-check ----------------------------------------------------------------------


def test_no_restarts_check_names_what_restarted():
    before = {"dpu-daemon": 1, "dpa-daemon": 0, "app-s0": 0}
    ok = no_restarts(before, dict(before))
    assert ok.ok and not ok.info and ok.name == "no_restarts"
    bad = no_restarts(before, {"dpu-daemon": 2, "dpa-daemon": 0, "app-s0": 3})
    assert not bad.ok and not bad.info
    assert bad.detail == "restarted during the window: app-s0 (3x), dpu-daemon (1x)"


# --- the compose restart bookkeeping (no Docker needed) ----------------------------------


def _event(action: str, component: str, at_s: float, **attrs: str) -> dict:
    attributes = {"com.docker.compose.service": component, **attrs}
    return {"Action": action, "Actor": {"Attributes": attributes}, "timeNano": int(at_s * 1e9)}


def test_engine_restarts_are_a_die_then_a_start_without_a_stop():
    pairing = EnginePairing({"sidecar-s1": "sidecar", "app-s1": "app"}, mono_offset_s=-100.0)
    feed = [
        _event("die", "sidecar-s1", 10.0, exitCode="137"),
        _event("start", "sidecar-s1", 10.5),
        # `docker restart` (the harness restarting a joiner): die, stop, start: not the engine.
        _event("die", "app-s1", 11.0, exitCode="0"),
        _event("stop", "app-s1", 11.1),
        _event("start", "app-s1", 11.2),
        _event("start", "unknown", 12.0),
    ]
    found = [r for r in map(pairing.feed, feed) if r is not None]
    assert found == [
        ContainerRestart(
            component="sidecar-s1",
            role="sidecar",
            how="exit code 137 (signal 9)",
            at_wall_s=10.0,
            at_mono_s=-90.0,
            restarted_wall_s=10.5,
            by="engine",
        )
    ]
    assert exit_how(3) == "exit code 3"


def test_namespace_joiners_are_known_per_owner():
    settings = Settings(workmodel=DEFAULT_WORKMODEL.resolve())
    assert joiners_of(describe("envoy", settings))["sidecar-s1"] == [("app-s1", "network")]
    dpumesh = joiners_of(describe("dpumesh", settings))
    assert sorted(dpumesh) == ["dpa-daemon"]
    assert {name for name, kind in dpumesh["dpa-daemon"] if kind == "IPC"} == {
        "dpu-daemon",
        "app-s0",
        "app-s1",
        "app-s2",
    }
    assert joiners_of(describe("nomesh", settings)) == {}


# --- real stacks -------------------------------------------------------------------------


def _status(url: str) -> int | None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _serves_again(url: str, timeout_s: float) -> float:
    """Seconds until `GET url` answers 200 (bounded), then ten more in a row must too."""
    started = time.monotonic()
    assert _eventually(lambda: _status(url) == 200, timeout_s), f"{url} never answered 200"
    took = time.monotonic() - started
    assert [_status(url) for _ in range(10)] == [200] * 10
    return took


def _envoy_available() -> bool:
    try:
        envoy_binary()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("mesh", "component", "role"),
    [
        ("dpumesh", "dpu-daemon", "dpu-daemon"),
        ("dpumesh", "dpa-daemon", "dpa-daemon"),
        ("envoy", "sidecar-s1", "sidecar"),
    ],
)
def test_a_killed_component_is_restarted_and_the_stack_serves_again(
    mesh, component, role, tmp_path, capfd
):
    if mesh == "envoy":
        require_external(_envoy_available(), "Envoy")
    (port,) = free_ports(1)
    cpus = os.cpu_count() or 1
    # Two cores: the host and dpu sets apart, to see a restart keep its placement.
    layout = "host=0,dpu=1,loadgen=1" if cpus >= 2 else "shared"
    with (
        prepare(layout, "ideal", {}) as placement,
        start_stack(mesh, port=port, run_dir=tmp_path / "stack", placement=placement) as stack,
    ):
        assert _status(stack.url + "/") == 200
        old = stack.component_processes(component)[0].pid
        os.kill(old, signal.SIGKILL)
        assert stack.wait_restarts({component: 1}, timeout_s=SERVE_AGAIN_S)
        took = _serves_again(stack.url + "/", SERVE_AGAIN_S)
        restarts = stack.restarts()
        assert restarts[component] == 1
        assert sum(restarts.values()) == 1, restarts
        (event,) = stack.restart_events()
        assert {k: event[k] for k in ("component", "role", "how")} == {
            "component": component,
            "role": role,
            "how": "signal 9",
        }
        assert event["at_mono_s"] <= event["restarted_mono_s"]
        new = stack.component_processes(component)[0].pid
        assert new != old and new == event["pid"]
        pinned = placement.cpus(ROLE_CPU_SET[role])  # None: every CPU ("shared")
        if pinned is not None:
            assert set(psutil.Process(new).cpu_affinity()) == set(pinned)
        err = capfd.readouterr().err
        assert f"supervisor: {component} ({role}) ended (signal 9)" in err
        log = (tmp_path / "stack" / f"{component}.log").read_text()
        assert "=== supervisor" in log and "restart 1 in" in log
        print(f"{mesh} {component}: serving again {took:.2f} s after the restart")
    assert not psutil.pid_exists(new) or _gone(_identity(new))
    assert port_is_free(port)
    if mesh == "dpumesh":
        marker = f"dpumesh.{stack.namespace}."
        assert [n for n in os.listdir("/dev/shm") if marker in n] == []


# --- compose -----------------------------------------------------------------------------


def test_compose_files_carry_the_restart_mode(tmp_path):
    desc = describe("envoy", Settings(workmodel=DEFAULT_WORKMODEL.resolve()))
    for policy, wanted in ((RestartPolicy(), "always"), (NEVER, "no")):
        out = tmp_path / policy.mode
        services = yaml.safe_load(generate(desc, out, port=15997, restart=policy).file.read_text())
        assert {s["restart"] for s in services["services"].values()} == {wanted}


def _docker_engine():
    from harness.deploy import compose

    try:
        client = compose.docker_client(timeout_s=30)
        compose.compose_command()
    except compose.ComposeError:
        return None
    return client


@pytest.mark.docker
@pytest.mark.e2e
def test_compose_a_crashed_sidecar_is_restarted_by_docker_with_its_app(tmp_path, capfd):
    """Docker restarts the sidecar; the harness restarts the app sharing its network namespace."""
    from harness.deploy import compose

    require_external(_docker_engine() is not None, "Docker engine with compose")
    compose.ensure_image()
    (port,) = free_ports(1)
    with start_stack("envoy", mode="compose", port=port, run_dir=tmp_path / "stack") as stack:
        assert _status(stack.url + "/") == 200
        # `docker kill` would count as a manual stop (no restart): kill its program instead.
        envoy = stack.component_processes("sidecar-s1")[0]
        assert envoy.name() == "envoy"
        envoy.kill()
        assert stack.wait_restarts({"sidecar-s1": 1, "app-s1": 1}, timeout_s=SERVE_AGAIN_S)
        took = _serves_again(stack.url + "/", SERVE_AGAIN_S)
        restarts = stack.restarts()
        assert (restarts["sidecar-s1"], restarts["app-s1"], sum(restarts.values())) == (1, 1, 2)
        events = {e["component"]: e for e in stack.restart_events()}
        assert events["sidecar-s1"]["how"] == "exit code 137 (signal 9)"
        assert events["sidecar-s1"]["by"] == "engine"
        assert events["app-s1"]["by"] == "harness"
        assert events["sidecar-s1"]["at_wall_s"] <= events["app-s1"]["at_wall_s"]
        assert stack.traffic()["entry_requests"] >= 11  # ports looked up again after the restart
        err = capfd.readouterr().err
        assert "compose: sidecar-s1 (sidecar) ended (exit code 137 (signal 9))" in err
        print(f"compose envoy sidecar-s1: serving again {took:.2f} s after the restart")
    assert port_is_free(port)
