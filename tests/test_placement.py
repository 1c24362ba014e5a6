"""CPU placement: layouts (pure), read-back checks (pure), placed launches and real cgroups.

Tests that need root with cgroup cpu and cpuset controllers skip locally
without them and fail in CI (`require_external`).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.placement import cgroups, readback
from harness.placement.cgroups import CgroupSet, Hierarchy, Mount
from harness.placement.launch import wrap_argv
from harness.placement.layout import (
    CPU_SETS,
    ROLE_CPU_SET,
    Layout,
    PlacementError,
    auto_layout,
    format_cpus,
    parse_cpus,
    parse_layout,
    role_cpuset,
    shared_layout,
)
from tests.conftest import require_external

ONLINE = frozenset(range(8))

# Prints its pid and a child's pid, keeps a second thread and the child alive until stdin closes.
TREE = """
import os, subprocess, sys, threading
done = threading.Event()
threading.Thread(target=done.wait, daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
print(os.getpid(), child.pid, flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""

# A busy parent and a busy child (the quota must hold for the whole tree); SIGTERM ends both.
SPIN_TREE = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
print(child.pid, flush=True)
try:
    while True:
        pass
finally:
    child.kill()
    child.wait()
"""


def one_line_error(exc: pytest.ExceptionInfo[PlacementError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    assert isinstance(exc.value, ValueError)
    return text


# -- cpu lists --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", {0}),
        ("0-3,5", {0, 1, 2, 3, 5}),
        (" 1 , 2-3 \n", {1, 2, 3}),
        ("7-7", {7}),
        ("4,1", {1, 4}),
    ],
)
def test_parse_cpus(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", " ", "a", "3-1", "0-", "-1", "1,,2", "1-2-3", "0x1"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(PlacementError) as exc:
        parse_cpus(text)
    assert "CPU" in one_line_error(exc)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [(set(), ""), ({3}, "3"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3, 5}, "1,3,5"), ({4, 5}, "4-5")],
)
def test_format_cpus(cpus: set[int], text: str) -> None:
    assert format_cpus(cpus) == text


@given(st.frozensets(st.integers(0, 300), min_size=1))
def test_cpu_list_round_trip(cpus: frozenset[int]) -> None:
    assert parse_cpus(format_cpus(cpus)) == cpus


# -- roles and layouts ---------------------------------------------------------------------


def test_role_cpusets() -> None:
    assert {role: role_cpuset(role) for role in ROLE_CPU_SET} == {
        "app": "host",
        "sidecar": "host",
        "nodeproxy": "host",
        "gateway": "host",
        "dpu-daemon": "dpu",
        "dpa-daemon": "dpu",
        "loadgen": "loadgen",
    }
    with pytest.raises(PlacementError) as exc:
        role_cpuset("envoy")
    assert "unknown role 'envoy'" in one_line_error(exc)


def test_auto_layout_on_one_and_two_cores() -> None:
    one = auto_layout({3})
    assert (one.host, one.dpu, one.loadgen) == ({3}, {3}, {3})
    assert one.overlaps() == [("host", "dpu"), ("host", "loadgen"), ("dpu", "loadgen")]
    two = auto_layout({0, 1})
    assert (two.host, two.dpu, two.loadgen, two.shared) == ({0}, {1}, {1}, False)
    assert two.overlaps() == [("dpu", "loadgen")]
    assert two.as_text() == "host=0;dpu=1;loadgen=1"
    assert two.dpu_cores == 1
    # the first online CPU, not CPU 0
    assert auto_layout({4, 9}).host == {4}


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(3, (1, 1, 1)), (4, (2, 1, 1)), (5, (3, 1, 1)), (8, (4, 2, 2)), (16, (8, 4, 4))],
)
def test_auto_layout_sizes(n: int, sizes: tuple[int, int, int]) -> None:
    layout = auto_layout(range(n))
    assert (len(layout.host), len(layout.dpu), len(layout.loadgen)) == sizes
    assert min(layout.host) == 0  # host first, then dpu, then loadgen
    assert max(layout.host) < min(layout.dpu) <= max(layout.dpu) < min(layout.loadgen)


@given(st.frozensets(st.integers(0, 255), min_size=3, max_size=128))
def test_auto_layout_is_disjoint_with_host_largest(online: frozenset[int]) -> None:
    layout = auto_layout(online)
    assert layout.overlaps() == []
    assert layout.host | layout.dpu | layout.loadgen == online
    assert len(layout.host) >= max(len(layout.dpu), len(layout.loadgen))
    assert parse_layout(layout.as_text(), online) == layout


def test_parse_layout_shared_and_auto() -> None:
    shared = parse_layout(" shared ", ONLINE)
    assert shared == shared_layout(ONLINE)
    assert shared.shared and shared.as_text() == "shared"
    assert shared.host == shared.dpu == shared.loadgen == ONLINE
    assert shared.cpus_of("dpa-daemon") == ONLINE
    assert parse_layout("auto", ONLINE) == auto_layout(ONLINE)


@pytest.mark.parametrize(
    "text",
    [
        "host=0-3,dpu=4-5,loadgen=6-7",
        "host=0-3;dpu=4-5;loadgen=6-7",
        "loadgen=6-7, dpu=4-5, host = 0-3",
        "host=0-1,2,3,dpu=4,5,loadgen=6,7",
    ],
)
def test_parse_layout_explicit(text: str) -> None:
    layout = parse_layout(text, ONLINE)
    assert layout == Layout(False, frozenset(range(4)), frozenset({4, 5}), frozenset({6, 7}))
    assert layout.as_text() == "host=0-3;dpu=4-5;loadgen=6-7"
    assert layout.overlaps() == []
    assert layout.dpu_cores == 2
    assert layout.cpus_of("sidecar") == set(range(4))
    assert layout.cpus_of("dpu-daemon") == {4, 5}
    assert layout.cpus_of("loadgen") == {6, 7}


def test_explicit_layout_may_overlap_and_says_so() -> None:
    layout = parse_layout("host=0-1,dpu=2,loadgen=1-2", ONLINE)
    assert layout.overlaps() == [("host", "loadgen"), ("dpu", "loadgen")]
    assert parse_layout(layout.as_text(), ONLINE) == layout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host=0,dpu=1", "lacks CPU set loadgen"),
        ("host=0", "lacks CPU set dpu, loadgen"),
        ("host=0,dpu=1,loadgen=2,host=3", "CPU set host given twice"),
        ("host=0,dpu=1,gpu=2", "unknown CPU set 'gpu'"),
        ("host=,dpu=1,loadgen=2", "CPU set host is empty"),
        ("host=0,dpu=1,loadgen=9", "names cpu 9, not online (online: 0-7)"),
        ("host=0,dpu=8-9,loadgen=2", "names cpu 8-9, not online"),
        ("host=0,dpu=1,loadgen=x", "bad CPU list 'x'"),
        ("host=0,dpu=3-1,loadgen=2", "bad CPU range '3-1'"),
        ("0-3", "bad placement '0-3'"),
        ("", "bad placement ''"),
        ("Shared", "bad placement 'Shared'"),
    ],
)
def test_parse_layout_errors(text: str, message: str) -> None:
    with pytest.raises(PlacementError) as exc:
        parse_layout(text, ONLINE)
    assert message in one_line_error(exc)


def test_layout_rejects_empty_sets_and_unknown_names() -> None:
    with pytest.raises(PlacementError) as exc:
        Layout(False, frozenset({0}), frozenset(), frozenset({1}))
    assert one_line_error(exc) == "CPU set dpu is empty"
    with pytest.raises(PlacementError) as exc:
        auto_layout([])
    assert one_line_error(exc) == "no online CPUs given"
    with pytest.raises(PlacementError) as exc:
        auto_layout({0, 1}).cpus("gpu")
    assert "unknown CPU set 'gpu'" in one_line_error(exc)
    assert set(CPU_SETS) == set(ROLE_CPU_SET.values())


# -- read-back (pure) -----------------------------------------------------------------------

STATUS = "Name:\tpython\nCpus_allowed:\t2\nCpus_allowed_list:\t1\nMems_allowed_list:\t0\n"


def test_parse_cpus_allowed() -> None:
    assert readback.parse_cpus_allowed(STATUS) == {1}
    assert readback.parse_cpus_allowed("Cpus_allowed_list:\t0-2,4\n") == {0, 1, 2, 4}
    with pytest.raises(PlacementError) as exc:
        readback.parse_cpus_allowed("Name:\tx\n")
    assert one_line_error(exc) == "no Cpus_allowed_list in status"


def test_parse_proc_cgroup_v1_and_v2() -> None:
    v1 = "12:cpuset:/dpumesh-1-ab/dpu\n4:cpu,cpuacct:/dpumesh-1-ab/dpu\n1:name=systemd:/\n0::/\n"
    assert readback.parse_proc_cgroup(v1) == {
        "cpuset": "/dpumesh-1-ab/dpu",
        "cpu": "/dpumesh-1-ab/dpu",
        "cpuacct": "/dpumesh-1-ab/dpu",
        "name=systemd": "/",
        "": "/",
    }
    assert readback.parse_proc_cgroup("0::/dpumesh-1-ab/host\n") == {"": "/dpumesh-1-ab/host"}


def test_check_processes() -> None:
    good = {10: {10: frozenset({1}), 11: frozenset({1})}, 20: {20: frozenset({1})}}
    assert readback.check_processes(frozenset({1}), good) == []
    bad = {10: {10: frozenset({1}), 12: frozenset({0, 1})}, 20: {20: frozenset({0})}}
    assert readback.check_processes(frozenset({1}), bad, "dpa-daemon") == [
        "dpa-daemon pid 10 thread 12: allowed cpus 0-1, expected 1",
        "dpa-daemon pid 20 thread 20: allowed cpus 0, expected 1",
    ]
    assert readback.check_processes(frozenset({1}), {}) == []


def test_check_processes_for_shared_means_unrestricted() -> None:
    shared = shared_layout({0, 1})
    free = {5: {5: frozenset({0, 1}), 6: frozenset({0, 1})}}
    assert readback.check_processes(shared.cpus_of("app"), free) == []
    pinned = {5: {5: frozenset({0, 1}), 6: frozenset({1})}}
    assert readback.check_processes(shared.cpus_of("app"), pinned, "app") == [
        "app pid 5 thread 6: allowed cpus 1, expected 0-1"
    ]


def test_check_limit() -> None:
    assert readback.check_limit(None, None) == []
    assert readback.check_limit(0.25, 0.25) == []
    assert readback.check_limit(0.25, 0.2501) == []
    assert readback.check_limit(0.25, None, "dpu") == [
        "dpu: CPU bandwidth unlimited in force, expected 0.25 cores"
    ]
    assert readback.check_limit(None, 0.5) == [
        "CPU bandwidth 0.5 cores in force, expected unlimited"
    ]
    assert readback.check_limit(0.25, 0.5) != []


# -- read-back (this process) -------------------------------------------------------------


def test_thread_cpus_of_this_process() -> None:
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    try:
        threads = readback.thread_cpus(os.getpid())
        assert {threading.get_native_id(), thread.native_id} <= set(threads)
        assert threads[threading.get_native_id()] == os.sched_getaffinity(0)
    finally:
        done.set()
        thread.join()


def test_observe_leaves_out_exited_processes() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    observed = readback.observe([os.getpid(), gone.pid])
    assert set(observed) == {os.getpid()}
    assert readback.online_cpus() == frozenset(range(psutil.cpu_count()))


# -- launch -----------------------------------------------------------------------------------


def test_wrap_argv_without_restriction_is_the_command() -> None:
    assert wrap_argv(["envoy", "-c", "x.yaml"], None) == ["envoy", "-c", "x.yaml"]
    with pytest.raises(PlacementError) as exc:
        wrap_argv([], {0})
    assert one_line_error(exc) == "no command to start"
    with pytest.raises(PlacementError) as exc:
        wrap_argv(["envoy"], set())
    assert one_line_error(exc) == "empty CPU set for envoy"


def test_wrap_argv_passes_arguments_verbatim(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"  # a plain file stands in for the cgroup here
    marker = tmp_path / "injected"
    args = ["$HOME", "a b", '"; touch ' + str(marker) + '"', "$(touch " + str(marker) + ")", "-n"]
    argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args]
    out = subprocess.run(
        wrap_argv(argv, {0}, [procs]), capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == json.dumps(args)
    assert not marker.exists()
    assert procs.read_text().strip().isdigit()


def test_wrap_argv_fails_before_the_program_if_it_cannot_join(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    done = subprocess.run(
        wrap_argv(argv, None, [tmp_path / "missing" / "cgroup.procs"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 126
    assert "cgroup.procs" in done.stderr
    assert not marker.exists()


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One line of a child's stdout, or fail after `timeout` s."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "child printed nothing"
    line = proc.stdout.readline()
    assert line, f"child exited with {proc.wait(timeout=10)}"
    return line


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child and everything it started (a killed parent leaves its children running)."""
    if proc.poll() is not None:
        return  # reaped: its pid may belong to someone else by now
    with contextlib.suppress(psutil.NoSuchProcess):
        for member in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; their trees are killed at the end whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        kill_tree(proc)


def start_tree(
    spawned: list[subprocess.Popen], cpus: frozenset[int], procs: tuple[Path, ...] = ()
) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        wrap_argv([sys.executable, "-c", TREE], cpus, procs),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    spawned.append(proc)
    pid, child = map(int, read_line(proc).split())
    assert pid == proc.pid  # the wrapper execs: the caller's pid is the program's
    return proc, child


def stop_tree(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0


def test_launch_restricts_every_thread_and_child(spawned: list[subprocess.Popen]) -> None:
    wanted = auto_layout(readback.online_cpus()).dpu
    proc, child = start_tree(spawned, wanted)
    observed = readback.observe([proc.pid, child])
    assert set(observed) == {proc.pid, child}
    assert len(observed[proc.pid]) >= 2  # the main thread and the extra one
    assert readback.check_processes(wanted, observed) == []
    everything = readback.online_cpus()
    if wanted != everything:
        assert readback.check_processes(everything, observed) != []
    stop_tree(proc)


# -- cgroups without a cgroup file system --------------------------------------------------------

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/my\\040disk rw shared:5 - ext4 /dev/sdb rw
"""


def test_parse_mountinfo() -> None:
    mounts = cgroups.parse_mountinfo(MOUNTINFO)
    assert mounts[1] == Mount(Path("/sys/fs/cgroup/cpu"), "cgroup", frozenset({"rw", "cpu"}))
    assert mounts[5].fstype == "cgroup2"
    assert mounts[6].path == Path("/mnt/my disk")  # octal escapes decoded


def fake_v2(root: Path, controllers: str) -> list[Mount]:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    return [Mount(root, "cgroup2", frozenset({"rw"}))]


def test_detect_prefers_v2_with_cpu_and_cpuset(tmp_path: Path) -> None:
    mounts = fake_v2(tmp_path, "cpuset cpu io memory pids")
    assert cgroups.detect(tmp_path, mounts) == Hierarchy(2, tmp_path, tmp_path)


def test_detect_hybrid_machine_uses_v1(tmp_path: Path) -> None:
    # like these machines: the cgroup2 mount's controllers are all bound to v1
    unified = tmp_path / "unified"
    mounts = [
        *fake_v2(unified, "hugetlb"),
        Mount(tmp_path / "cpu", "cgroup", frozenset({"rw", "cpu"})),
        Mount(tmp_path / "cpuset", "cgroup", frozenset({"rw", "cpuset"})),
    ]
    assert cgroups.detect(tmp_path, mounts) == Hierarchy(1, tmp_path / "cpu", tmp_path / "cpuset")
    co_mounted = [Mount(tmp_path / "cpu,cpuset", "cgroup", frozenset({"cpuset", "cpu"}))]
    hierarchy = cgroups.detect(tmp_path, co_mounted)
    assert hierarchy.dirs == (tmp_path / "cpu,cpuset",)


def test_detect_names_what_is_missing(tmp_path: Path) -> None:
    cases = [
        ([], f"no cgroup mounted at {tmp_path} (cgroup v1 cpu or v2 cpu.max needed)"),
        (
            fake_v2(tmp_path / "u", "hugetlb"),
            f"no cgroup cpu controller at {tmp_path} (cgroup v1 cpu or v2 cpu.max needed)",
        ),
        (
            [Mount(tmp_path / "cpu", "cgroup", frozenset({"cpu"}))],
            f"no cgroup cpuset controller at {tmp_path} (cgroup v1 cpuset or v2 cpuset.cpus "
            "needed)",
        ),
        (
            [Mount(Path("/elsewhere/cpu"), "cgroup", frozenset({"cpu", "cpuset"}))],
            f"no cgroup mounted at {tmp_path}",
        ),
    ]
    for mounts, message in cases:
        with pytest.raises(PlacementError) as exc:
            cgroups.detect(tmp_path, mounts)
        assert one_line_error(exc).startswith(message)


def test_missing_controller_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(PlacementError) as exc:
        CgroupSet.create({"dpu": ({1}, 0.5)}, root=tmp_path)
    text = one_line_error(exc)
    assert text == f"no cgroup mounted at {tmp_path} (cgroup v1 cpu or v2 cpu.max needed)"
    # a caller can say what it cannot do with it
    assert f"cannot limit DPU speed: {text}".count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_create_validates_before_touching_anything(tmp_path: Path) -> None:
    hierarchy = Hierarchy(2, tmp_path, tmp_path)
    cases = [
        ({"gpu": ({0}, None)}, "unknown CPU set 'gpu'"),
        ({"dpu": (set(), 0.5)}, "CPU set dpu is empty"),
        ({"dpu": ({1}, 0.001)}, "quota 0.001 cores is below the kernel's minimum 0.01"),
        ({"dpu": ({1}, -1.0)}, "quota -1 cores is below"),
    ]
    for limits, message in cases:
        with pytest.raises(PlacementError) as exc:
            CgroupSet.create(limits, hierarchy=hierarchy)
        assert message in one_line_error(exc)
    assert list(tmp_path.iterdir()) == []


def test_v2_files_written(tmp_path: Path) -> None:
    """On a stand-in directory (regular files, no kernel), the v2 knobs get the right text."""
    hierarchy = Hierarchy(2, tmp_path, tmp_path)
    group = CgroupSet.create({"dpu": ({1}, 0.25), "host": ({0}, None)}, hierarchy=hierarchy)
    top = tmp_path / group.name
    assert group.name.startswith(f"dpumesh-{os.getpid()}-")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +cpuset"
    assert (top / "cgroup.subtree_control").read_text() == "+cpu +cpuset"
    assert (top / "dpu" / "cpu.max").read_text() == "25000 100000"
    assert (top / "dpu" / "cpuset.cpus").read_text() == "1"
    assert (top / "host" / "cpuset.cpus").read_text() == "0"
    assert not (top / "host" / "cpu.max").exists()
    assert group.read_limit("dpu") == 0.25
    assert group.procs_files("dpu") == (top / "dpu" / "cgroup.procs",)
    (top / "host" / "cpu.max").write_text("max 100000\n")
    assert group.read_limit("host") is None
    with pytest.raises(PlacementError) as exc:
        group.procs_files("loadgen")
    assert "no cgroup for CPU set 'loadgen'" in one_line_error(exc)


# -- real cgroups ------------------------------------------------------------------------------


def real_hierarchy() -> Hierarchy | None:
    if os.geteuid() != 0:
        return None
    try:
        return cgroups.detect()
    except PlacementError:
        return None


def ours(hierarchy: Hierarchy) -> list[Path]:
    return [p for base in hierarchy.dirs for p in base.glob(f"dpumesh-{os.getpid()}-*")]


@pytest.fixture
def hierarchy() -> Iterator[Hierarchy]:
    found = real_hierarchy()
    require_external(found is not None, "root with cgroup cpu and cpuset controllers")
    assert found is not None
    assert ours(found) == []
    yield found
    assert ours(found) == [], "a test left a dpumesh cgroup behind"


def cgroup_path(pid: int, hierarchy: Hierarchy) -> str:
    paths = readback.parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    return paths["" if hierarchy.version == 2 else "cpu"]


def test_this_machine_uses_v1_cpu() -> None:
    found = real_hierarchy()
    require_external(found is not None, "root with cgroup cpu and cpuset controllers")
    assert found is not None
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():  # hybrid: v2 lacks cpu
        assert found == Hierarchy(1, Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuset"))


def test_quota_holds_a_busy_tree_to_its_share(
    hierarchy: Hierarchy, spawned: list[subprocess.Popen]
) -> None:
    dpu = auto_layout(readback.online_cpus()).dpu
    with CgroupSet.create({"dpu": (dpu, 0.25)}, hierarchy=hierarchy) as group:
        assert group.read_limit("dpu") == 0.25
        proc = subprocess.Popen(
            wrap_argv([sys.executable, "-c", SPIN_TREE], dpu, group.procs_files("dpu")),
            stdout=subprocess.PIPE,
            text=True,
        )
        spawned.append(proc)
        tree = [psutil.Process(proc.pid), psutil.Process(int(read_line(proc)))]
        for member in tree:
            assert readback.cgroup_limit(member.pid, hierarchy) == 0.25
            assert cgroup_path(member.pid, hierarchy) == f"/{group.name}/dpu"
        start = sum(sum(m.cpu_times()[:2]) for m in tree)
        began = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):  # the measurement window, ~2 s
            proc.wait(timeout=2.0)
        used = sum(sum(m.cpu_times()[:2]) for m in tree) - start
        cores = used / (time.monotonic() - began)
        print(f"busy tree under a 0.25-core quota used {cores:.3f} cores")
        assert 0.05 < cores <= 0.4
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_joined_tree_is_in_the_cgroup_on_its_cpus(
    hierarchy: Hierarchy, spawned: list[subprocess.Popen]
) -> None:
    dpu = auto_layout(readback.online_cpus()).dpu
    with CgroupSet.create({"dpu": (dpu, 0.5), "host": ({0}, None)}, hierarchy=hierarchy) as group:
        proc, child = start_tree(spawned, dpu, group.procs_files("dpu"))
        for pid in (proc.pid, child):
            assert cgroup_path(pid, hierarchy) == f"/{group.name}/dpu"
            assert readback.cgroup_limit(pid, hierarchy) == 0.5
        assert readback.check_processes(dpu, readback.observe([proc.pid, child])) == []
        assert group.read_limit("host") is None
        stop_tree(proc)


def test_remove_moves_live_tasks_out_and_is_idempotent(
    hierarchy: Hierarchy, spawned: list[subprocess.Popen]
) -> None:
    group = CgroupSet.create({"loadgen": ({0}, 0.5)}, hierarchy=hierarchy)
    try:
        proc, child = start_tree(spawned, frozenset({0}), group.procs_files("loadgen"))
        group.remove()
        assert ours(hierarchy) == []
        assert proc.poll() is None  # still running, now in the parent cgroup, unlimited
        assert cgroup_path(proc.pid, hierarchy) == "/"
        assert readback.cgroup_limit(child, hierarchy) is None
    finally:
        group.remove()  # idempotent
    stop_tree(proc)


def test_remove_after_the_processes_died(
    hierarchy: Hierarchy, spawned: list[subprocess.Popen]
) -> None:
    with CgroupSet.create({"dpu": ({0}, 0.5)}, hierarchy=hierarchy) as group:
        proc, _child = start_tree(spawned, frozenset({0}), group.procs_files("dpu"))
        stop_tree(proc)
    assert ours(hierarchy) == []


def test_remove_stale_takes_dead_owners_only(hierarchy: Hierarchy) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"dpumesh-{dead.pid}-0"
    for base in hierarchy.dirs:
        (base / stale / "dpu").mkdir(parents=True)
    with CgroupSet.create({"host": ({0}, None)}, hierarchy=hierarchy) as live:
        assert cgroups.remove_stale(hierarchy=hierarchy) == [stale]
        assert not any((base / stale).exists() for base in hierarchy.dirs)
        assert all((base / live.name / "host").is_dir() for base in hierarchy.dirs)
        assert cgroups.remove_stale(hierarchy=hierarchy) == []
