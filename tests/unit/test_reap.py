"""Nothing left behind after SIGKILL: each kind of leftover, made by a real process that is
then killed outright, is removed by the reaper; a live owner's is kept.

Everything happens in tmp dirs (TMPDIR and KTSTR_CACHE_DIR of the children point there);
cgroups and loop devices are real and need root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from owners import Child, wait_gone

from ktstr import reap
from ktstr.scenario.cgroups import cgroup_mounts


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.kill(group=True)


def _spawn(children: list[Child], script: str, tmp: Path, *args: str) -> Child:
    child = Child(script, tmp, *args)
    children.append(child)
    return child


# --- owners ---------------------------------------------------------------------------------


def test_owner_of_this_process_is_alive() -> None:
    me = reap.me()
    assert me.pid == os.getpid() and me.state() is reap.State.ALIVE
    assert reap.owner_of(reap.owned_name("run")) == me
    assert reap.owner_of(reap.owned_name("run", ".img", hidden=True)) == me
    for other in ("ktstr-run-abcdefgh", ".tmp-585a4a074597aefa-x1y2z3", "ktstr-1234", "x"):
        assert reap.owner_of(other) is None


def test_recycled_pid_and_zombie_are_dead(tmp_path: Path) -> None:
    me = reap.me()
    assert reap.Owner(me.pid, me.start + 1, me.space).state() is reap.State.DEAD
    zombie = subprocess.Popen(["true"])
    assert wait_gone(zombie.pid)
    st = reap.proc_stat(zombie.pid)
    assert st is not None and st.state == "Z"  # exited, not yet waited for
    owner = reap.Owner(zombie.pid, st.start, me.space)
    assert owner.state() is reap.State.DEAD
    zombie.wait()
    assert owner.state() is reap.State.DEAD


def test_pid_owner_alive_by_start_time() -> None:
    live = subprocess.Popen(["sleep", "60"])
    try:
        now = time.time()
        assert reap.pid_owner_alive(live.pid, now)
        # Made an hour before this process started: the pid was recycled.
        assert not reap.pid_owner_alive(live.pid, now - 3600)
    finally:
        live.kill()
        live.wait()
    assert not reap.pid_owner_alive(live.pid, time.time())


# --- temporary directories and files ----------------------------------------------------------

_MAKE_TEMPS = r"""
import sys
from ktstr import reap
d = reap.mkdtemp(sys.argv[1])
(d / "payload").write_bytes(b"x" * 4096)
fd, f = reap.mkstemp(sys.argv[1], suffix=".img")
print(d)
print(f)
"""


@pytest.mark.parametrize("kind", ["run", "boot", "template", "disks", "sandbox", "strip"])
def test_temporaries_of_a_killed_owner_are_reaped(kind: str, tmp_path: Path,
                                                  children: list[Child]) -> None:
    dead = _spawn(children, _MAKE_TEMPS, tmp_path, kind)
    live = _spawn(children, _MAKE_TEMPS, tmp_path, kind)
    zombie = _spawn(children, _MAKE_TEMPS, tmp_path, kind)
    dead.kill()
    zombie.kill(wait=False)
    wait_gone(zombie.pid)
    others = [tmp_path / "ktstr-run-abcdefgh", tmp_path / f"ktstr-{dead.pid}"]
    for p in others:
        p.mkdir()
    leftovers = [Path(p) for c in (dead, zombie) for p in c.lines]
    assert all(p.parent == tmp_path and p.exists() for p in leftovers)
    assert sorted(reap.reap_stale(tmp_path)) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert all(Path(p).exists() for p in live.lines)  # its owner is alive
    assert all(p.exists() for p in others)  # not owned names
    assert not [p for p in tmp_path.iterdir() if "trash" in p.name]


def test_first_creation_sweeps_the_place(tmp_path: Path, children: list[Child]) -> None:
    dead = _spawn(children, _MAKE_TEMPS, tmp_path, "run")
    dead.kill()
    fresh = reap.mkdtemp("run", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_foreign_entries_are_kept_until_old(tmp_path: Path) -> None:
    me = reap.me()
    other = "ffffffff" if me.space != "ffffffff" else "00000000"
    fresh = tmp_path / f"ktstr-run-{me.pid}.{me.start}.{other}-aaaa"
    old = tmp_path / f"ktstr-run-{me.pid}.{me.start}.{other}-bbbb"
    for p in (fresh, old):
        p.mkdir()
    two_days = time.time() - 2 * 86400
    os.utime(old, (two_days, two_days))
    assert reap.reap_stale(tmp_path) == [old]
    assert fresh.exists() and not old.exists()


def test_a_mounted_tree_is_not_descended(tmp_path: Path, children: list[Child]) -> None:
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    dead = _spawn(children, _MAKE_TEMPS, tmp_path, "run")
    dead.kill()
    leftover = Path(dead.lines[0])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    (leftover / "m").mkdir()
    subprocess.run(["mount", "--bind", str(precious), str(leftover / "m")], check=True)
    try:
        assert leftover not in reap.reap_stale(tmp_path)
        assert (precious / "keep").exists()
    finally:
        subprocess.run(["umount", str(leftover / "m")], check=True)
    assert leftover in reap.reap_stale(tmp_path)


# --- the creators' own leftovers ------------------------------------------------------------


def test_raw_disk_images_of_a_killed_test_are_reaped(tmp_path: Path,
                                                     children: list[Child]) -> None:
    script = r"""
from ktstr.disks import DiskConfig
from ktstr.disks.clones import per_test_disks
cm = per_test_disks([DiskConfig(capacity_mb=8), DiskConfig(capacity_mb=4)])
prepared = cm.__enter__()
for p in prepared.paths:
    print(p)
"""
    dead = _spawn(children, script, tmp_path)
    live = _spawn(children, script, tmp_path)
    dead.kill()
    images = [Path(p) for p in dead.lines]
    assert len(images) == 2 and all(p.stat().st_size > 0 for p in images)
    (raw_dir,) = {p.parent for p in images}
    assert raw_dir.parent == tmp_path and raw_dir.name.startswith("ktstr-disks-")
    assert reap.reap_stale(tmp_path) == [raw_dir]
    assert not raw_dir.exists()
    assert all(Path(p).exists() for p in live.lines)


def test_unpack_dir_of_a_killed_extract_is_reaped(tmp_path: Path,
                                                  children: list[Child]) -> None:
    # The "tarball" is a FIFO: the real tar blocks reading it, inside the unpack dir.
    fifo = tmp_path / "linux.tar"
    os.mkfifo(fifo)
    sources = tmp_path / "cache" / "sources"
    script = r"""
import sys, threading, time
from pathlib import Path
from ktstr.kernel.source import extract
sources = Path(sys.argv[2])
before = set(sources.iterdir()) if sources.is_dir() else set()
threading.Thread(target=extract, args=(Path(sys.argv[1]), sys.argv[3] * 32, sources),
                 daemon=True).start()
deadline = time.monotonic() + 30
while not [p for p in sources.glob(".*") if p.name != ".locks" and p not in before]:
    assert time.monotonic() < deadline
    time.sleep(0.02)
"""
    dead = _spawn(children, script, tmp_path, str(fifo), str(sources), "ab")
    (unpack,) = [p for p in sources.iterdir() if p.name != ".locks"]
    live = _spawn(children, script, tmp_path, str(fifo), str(sources), "cd")
    dead.kill(group=True)  # the child and its tar
    (kept,) = [p for p in sources.iterdir() if p.name not in (".locks", unpack.name)]
    assert reap.reap_stale(sources) == [unpack]
    assert not unpack.exists() and kept.exists()
    live.kill(group=True)


# --- host-mode cgroups ------------------------------------------------------------------------

_HOST_SESSION = r"""
import subprocess
from ktstr.scenario.host import host_session
cm = host_session()
session = cm.__enter__()
straggler = subprocess.Popen(["sleep", "600"], start_new_session=True)
session.backend.attach("", straggler.pid)
print(session.root)
print(straggler.pid)
"""


def test_cgroup_of_a_killed_host_run_is_removed(tmp_path: Path, children: list[Child]) -> None:
    if os.geteuid() != 0 or cgroup_mounts() == (None, None):
        pytest.skip("host mode needs root and a cpuset cgroup controller")
    from ktstr.scenario.host import reap_stale_sessions

    dead = _spawn(children, _HOST_SESSION, tmp_path)
    live = _spawn(children, _HOST_SESSION, tmp_path)
    stragglers = [int(dead.lines[1]), int(live.lines[1])]
    try:
        root = dead.lines[0]
        dead.kill()  # its straggler (in a session of its own) survives
        assert os.path.isdir(root) and reap.proc_stat(stragglers[0]) is not None
        assert reap_stale_sessions() == [root]
        assert not os.path.exists(root)
        st = reap.proc_stat(stragglers[0])
        assert st is None or st.gone  # killed first: it was ours
        assert os.path.isdir(live.lines[0])  # its owner is alive
        live.kill()
        assert reap_stale_sessions() == [live.lines[0]]
    finally:
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_cgroup_of_a_killed_host_run_is_removed_despite_a_recycled_pid(
        tmp_path: Path, children: list[Child]) -> None:
    if os.geteuid() != 0 or cgroup_mounts() == (None, None):
        pytest.skip("host mode needs root and a cpuset cgroup controller")
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    if not last_pid.exists():
        pytest.skip("handing out a chosen pid needs /proc/sys/kernel/ns_last_pid")
    from ktstr.scenario.host import reap_stale_sessions

    dead = _spawn(children, _HOST_SESSION, tmp_path)
    root, straggler = dead.lines[0], int(dead.lines[1])
    dead.kill()
    # Well after the subtree was made, a new process gets the dead owner's pid.
    time.sleep(reap.START_SLACK_S + 1.5)
    recycled: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(50):  # other processes fork too: retry until we get the pid
            last_pid.write_text(str(dead.pid - 1))
            recycled = subprocess.Popen(["sleep", "60"])
            if recycled.pid == dead.pid:
                break
            recycled.kill()
            recycled.wait()
        assert recycled is not None and recycled.pid == dead.pid
        assert reap_stale_sessions() == [root]
        assert not os.path.exists(root)
    finally:
        if recycled is not None:
            recycled.kill()
            recycled.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(straggler, signal.SIGKILL)


# --- loop devices and their mounts --------------------------------------------------------------

_LOOP = r"""
import sys
from pathlib import Path
from ktstr.disks.template import loop_btrfs
cm = loop_btrfs(Path(sys.argv[1]), "128M")
mnt = cm.__enter__()
(mnt / "f").write_text("x")
print(mnt)
"""


def _loop_of(mnt: str) -> str | None:
    return next((m.source for m in reap.mounts() if m.point == mnt), None)


@pytest.fixture
def loop_cleanup(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left mounted or attached under tmp_path goes anyway."""
    yield
    for m in sorted(reap.mounts(), key=lambda m: len(m.point), reverse=True):
        if m.point.startswith(f"{tmp_path}/"):
            subprocess.run(["umount", "-l", m.point], check=False)
    for x in reap.loop_devices():
        if str(x.backing).startswith(f"{tmp_path}/"):
            subprocess.run(["losetup", "-d", x.device], check=False)


def test_loop_btrfs_of_a_killed_owner_is_unmounted_and_detached(
        tmp_path: Path, children: list[Child], loop_cleanup: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    (tmp_path / "dead").mkdir()
    (tmp_path / "live").mkdir()
    dead = _spawn(children, _LOOP, tmp_path, str(tmp_path / "dead"))
    live = _spawn(children, _LOOP, tmp_path, str(tmp_path / "live"))
    dev, live_dev = _loop_of(dead.lines[0]), _loop_of(live.lines[0])
    assert dev is not None and dev.startswith("/dev/loop") and live_dev is not None
    dead.kill()
    (image,) = [x.backing for x in reap.loop_devices() if x.device == dev]
    assert image.parent == tmp_path / "dead" and reap.owner_of(image.name) is not None
    assert reap.reap_stale_loops() == [dev]
    assert _loop_of(dead.lines[0]) is None
    assert dev not in [x.device for x in reap.loop_devices()]
    assert not image.exists()
    assert _loop_of(live.lines[0]) == live_dev  # its owner is alive
    live.kill()
    assert reap.reap_stale_loops() == [live_dev]
    assert _loop_of(live.lines[0]) is None


# --- the parent-death signal ------------------------------------------------------------------

_ORPHAN = r"""
import os, sys, time
from ktstr import reap
arm = reap.pdeathsig_preexec()  # in the parent, as Popen's caller does
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.read(r, 1)  # EOF: the parent has exited, we have been reparented
    arm()          # the prctl comes too late; the check must catch it
    time.sleep(30)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""


def test_pdeathsig_when_the_parent_is_already_gone() -> None:
    proc = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    orphan = int(proc.stdout)
    try:
        assert wait_gone(orphan), "the orphan outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_pdeathsig_preexec_loads_no_library(tmp_path: Path) -> None:
    # After fork, loading a library can deadlock: the preexec_fn must not call dlopen.
    script = r"""
import ctypes, signal, subprocess
from ktstr import reap
def refuse(*a, **k):
    raise AssertionError("ctypes.CDLL called in preexec_fn")
ctypes.CDLL = refuse
print(subprocess.run(["echo", "ok"], preexec_fn=reap.pdeathsig_preexec(signal.SIGTERM),
                     capture_output=True, text=True, check=True).stdout.strip())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.strip() == "ok", proc.stderr


def test_pdeathsig_kills_the_child_when_the_parent_dies() -> None:
    script = r"""
import subprocess
from ktstr import reap
p = subprocess.Popen(["sleep", "60"], preexec_fn=reap.pdeathsig_preexec())
print(p.pid, flush=True)
import time
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None
    sleeper = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    try:
        assert wait_gone(sleeper), "the child outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sleeper, signal.SIGKILL)


def test_a_worker_with_its_parent_alive_runs() -> None:
    # Workers arm the parent-death signal through the same helper; a live parent keeps them.
    from ktstr.scenario import worker
    from ktstr.scenario.work import CpuSpin

    h = worker.spawn(worker.WorkerSpec(cgroup="cg", index=0, work=CpuSpin(),
                                       attach=lambda pid: None))
    try:
        worker.wait_started([h], timeout=10)  # a worker that exited at start raises here
        deadline = time.monotonic() + 10
        while h.snapshot(time.monotonic_ns()).work_units == 0:
            assert time.monotonic() < deadline, "the worker did no work"
            time.sleep(0.05)
        (stats,) = worker.stop([h])
        assert stats.error is None
    finally:
        worker.kill_and_reap(h.pid)
