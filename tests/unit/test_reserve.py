"""Host CPU reservations: real flocks on real files under tmp_path, held by real processes.

The hosts are fake sysfs trees (the same file layout as /sys/devices/system/cpu) built
under tmp_path; the lock files, the processes holding them and the SIGKILLs are real.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from owners import Child, wait_gone

from ktstr import locks as locks_cli
from ktstr.reserve import (
    HostTopology,
    Mode,
    Reservation,
    ReservationTimeout,
    ReservationTooLarge,
    held_reservations,
    max_concurrent,
    reserve,
)

# --- fake hosts -----------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _cpus(text: Sequence[int]) -> str:
    return ",".join(str(c) for c in text)


def fake_sysfs(root: Path, llcs: Sequence[Sequence[int]], *, online: str | None = None,
               caches: bool = True, packages: Sequence[Sequence[int]] = ()) -> Path:
    """/sys/devices/system/cpu for CPUs grouped into `llcs`: per-CPU L1d, L1i and L2, an L3
    shared per LLC (as an AMD or Intel host lays them out); `caches=False` leaves the cache
    directories out, `packages` then gives topology/physical_package_id."""
    every = sorted(c for llc in llcs for c in llc)
    _write(root / "online", online if online is not None else f"{every[0]}-{every[-1]}")
    for llc in llcs:
        for cpu in llc:
            base = root / f"cpu{cpu}"
            base.mkdir(parents=True, exist_ok=True)
            if not caches:
                continue
            for index, (level, kind, shared) in enumerate((
                    (1, "Data", [cpu]), (1, "Instruction", [cpu]), (2, "Unified", [cpu]),
                    (3, "Unified", list(llc)))):
                _write(base / "cache" / f"index{index}" / "level", str(level))
                _write(base / "cache" / f"index{index}" / "type", kind)
                _write(base / "cache" / f"index{index}" / "shared_cpu_list", _cpus(shared))
    for package, cpus in enumerate(packages):
        for cpu in cpus:
            _write(root / f"cpu{cpu}" / "topology" / "physical_package_id", str(package))
    return root


@pytest.fixture
def two_cpus(tmp_path: Path) -> HostTopology:
    return HostTopology.read(fake_sysfs(tmp_path / "sys2", [[0, 1]]))


@pytest.fixture
def two_llcs(tmp_path: Path) -> HostTopology:
    """8 CPUs in 2 LLCs of 4."""
    return HostTopology.read(fake_sysfs(tmp_path / "sys8", [[0, 1, 2, 3], [4, 5, 6, 7]]))


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "locks"


# --- child processes ------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from ktstr.reserve import HostTopology, reserve
vcpus, test, sysfs, lock_dir, llc, hold_s = sys.argv[1:7]
r = reserve(int(vcpus), test=test, topology=HostTopology.read(Path(sysfs)),
            lock_dir=Path(lock_dir), llc_aligned=llc == "1", wait_s=30)
print(",".join(map(str, r.cpus)), flush=True)
print(flush=True)
if float(hold_s) >= 0:
    time.sleep(float(hold_s))
    print(repr(time.time()), flush=True)  # just before letting go
    r.release()
"""


@pytest.fixture
def children() -> Iterator[contextlib.ExitStack]:
    """Where the test's child processes go: each is killed (with its group) at the end."""
    with contextlib.ExitStack() as stack:
        yield stack


def _holder(children: contextlib.ExitStack, tmp_path: Path, vcpus: int, test: str, host: Path,
            lock_dir: Path, *, llc: bool = False, hold_s: float = -1) -> Child:
    """A process holding a reservation (until killed, or for `hold_s` seconds)."""
    return children.enter_context(Child(HOLDER, tmp_path, str(vcpus), test, str(host),
                                        str(lock_dir), "1" if llc else "0", str(hold_s)))


def _held_by_someone(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- host topology --------------------------------------------------------------------------


def test_host_topology_groups_cpus_by_last_level_cache(tmp_path: Path) -> None:
    host = HostTopology.read(fake_sysfs(tmp_path, [[0, 1, 4, 5], [2, 3, 6, 7]]))
    assert host.llcs == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert host.cpus == tuple(range(8)) and host.nr_cpus == 8
    assert host.llc_of(6) == 1


def test_offline_and_disallowed_cpus_are_left_out(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, [[0, 1, 2, 3], [4, 5, 6, 7]], online="0-2,4-7")
    assert HostTopology.read(root).llcs == ((0, 1, 2), (4, 5, 6, 7))
    assert HostTopology.read(root, allowed={0, 1, 5}).llcs == ((0, 1), (5,))


def test_host_without_cache_info_is_one_llc_per_package_or_one_for_all(tmp_path: Path) -> None:
    by_package = fake_sysfs(tmp_path / "a", [[0, 1, 2, 3]], caches=False,
                            packages=[[0, 2], [1, 3]])
    assert HostTopology.read(by_package).llcs == ((0, 2), (1, 3))
    bare = fake_sysfs(tmp_path / "b", [[0, 1, 2]], caches=False)
    assert HostTopology.read(bare).llcs == ((0, 1, 2),)


def test_this_host_reads() -> None:
    host = HostTopology.current()
    assert set(host.cpus) == os.sched_getaffinity(0)


# --- budget mode ----------------------------------------------------------------------------


def test_budget_takes_min_of_vcpus_and_host_cpus(two_llcs: HostTopology,
                                                 lock_dir: Path) -> None:
    with reserve(3, test="t", topology=two_llcs, lock_dir=lock_dir, wait_s=0) as r:
        assert r.mode is Mode.BUDGET and len(r.cpus) == 3 and r.llcs == (0,)
        assert r.waited_s < 1.0
        record = r.to_record()
        assert record["mode"] == "budget" and record["cpus"] == list(r.cpus)
        assert record["vcpus"] == 3 and record["host_cpus"] == 8
        json.dumps(record)
    with reserve(20, test="t", topology=two_llcs, lock_dir=lock_dir, wait_s=0) as big:
        assert big.cpus == tuple(range(8))
    assert not big.held
    reserve(8, test="dropped", topology=two_llcs, lock_dir=lock_dir, wait_s=0)  # never released
    assert held_reservations(lock_dir) == []


def test_budget_run_on_two_cpu_host_blocks_the_second_until_the_first_releases(
        tmp_path: Path, two_cpus: HostTopology, lock_dir: Path,
        children: contextlib.ExitStack) -> None:
    assert max_concurrent(2, two_cpus) == 1  # the default topologies: one VM at a time
    first = _holder(children, tmp_path, 2, "first", tmp_path / "sys2", lock_dir, hold_s=1.0)
    assert first.lines == ["0,1"]
    with reserve(2, test="second", topology=two_cpus, lock_dir=lock_dir, wait_s=30) as r:
        got_at = time.time()
        assert first.proc.stdout is not None
        released_at = float(first.proc.stdout.readline())
        assert got_at > released_at
        assert r.waited_s > 0.5 and r.cpus == (0, 1)


def test_waiting_never_holds_a_partial_set(tmp_path: Path, two_cpus: HostTopology,
                                           lock_dir: Path, children: contextlib.ExitStack) -> None:
    """CPU 0 is free and stays free while a run that also needs CPU 1 waits for it."""
    only_cpu1 = fake_sysfs(tmp_path / "cpu1", [[1]])
    _holder(children, tmp_path, 1, "holder", only_cpu1, lock_dir)
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            reserve(2, test="waiter", topology=two_cpus, lock_dir=lock_dir, wait_s=1.5)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=waiter)
    thread.start()
    samples = 0
    while thread.is_alive():
        assert not _held_by_someone(lock_dir / "cpu0.lock")
        samples += 1
        time.sleep(0.005)
    thread.join()
    assert samples > 50
    assert len(outcome) == 1 and isinstance(outcome[0], ReservationTimeout)


def test_a_holder_that_has_not_written_its_record_yet_still_excludes(
        two_cpus: HostTopology, lock_dir: Path) -> None:
    with reserve(2, test="a", topology=two_cpus, lock_dir=lock_dir, wait_s=0):
        for cpu in (0, 1):  # as between taking the locks and writing the record
            (lock_dir / f"cpu{cpu}.lock").write_text("")
        assert held_reservations(lock_dir) == []
        with pytest.raises(ReservationTimeout):
            reserve(1, test="b", topology=two_cpus, lock_dir=lock_dir, wait_s=0.2)


def _hammer(sysfs: str, lock_dir: str, marks: str, vcpus: int, llc: bool, rounds: int,
            seed: int) -> None:
    """Reserve and release `rounds` times; while holding, claim each CPU's mark with O_EXCL,
    which fails if any other holder has it now."""
    rng = random.Random(seed)
    host = HostTopology.read(Path(sysfs))
    for _ in range(rounds):
        with reserve(vcpus, test=f"hammer-{seed}", topology=host, lock_dir=Path(lock_dir),
                     llc_aligned=llc, wait_s=60) as r:
            paths = [Path(marks) / f"cpu{c}" for c in r.cpus]
            for p in paths:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            time.sleep(rng.uniform(0.001, 0.02))
            for p in paths:
                p.unlink()
        with open(Path(marks) / "log", "a") as f:
            f.write(f"{seed}\n")


def test_concurrent_processes_never_share_a_cpu(tmp_path: Path, lock_dir: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", [[0, 1], [2, 3]])
    marks = tmp_path / "marks"
    marks.mkdir()
    ctx = multiprocessing.get_context("fork")
    shapes = [(2, False), (1, True), (3, False), (2, True)]
    procs = [ctx.Process(target=_hammer, args=(str(sysfs), str(lock_dir), str(marks), v, llc,
                                               15, i)) for i, (v, llc) in enumerate(shapes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert sorted((marks / "log").read_text().split()) == sorted(
        str(i) for i in range(len(shapes)) for _ in range(15))
    assert sorted(os.listdir(marks)) == ["log"]


def test_timeout_error_says_what_was_wanted_and_who_holds_it(
        tmp_path: Path, two_cpus: HostTopology, lock_dir: Path,
        children: contextlib.ExitStack) -> None:
    holder = _holder(children, tmp_path, 2, "tests/vm/test_a.py::holder", tmp_path / "sys2",
                     lock_dir)
    told: list[str] = []
    start = time.monotonic()
    with pytest.raises(ReservationTimeout) as info:
        reserve(2, test="tests/vm/test_b.py::waiter", topology=two_cpus, lock_dir=lock_dir,
                wait_s=0.4, on_wait=told.append)
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 3.0
    assert [h.pid for h in info.value.holders] == [holder.pid]
    [line] = told
    assert "waiting up to 0.4 s" in line and f"pid {holder.pid}" in line
    text = str(info.value)
    assert "\n" not in text
    for part in ("2 host CPUs", "budget", "tests/vm/test_b.py::waiter", "0.4 s",
                 "cpus 0-1", f"pid {holder.pid}", "tests/vm/test_a.py::holder"):
        assert part in text, (part, text)


# --- LLC-aligned mode -----------------------------------------------------------------------


def test_llc_aligned_takes_whole_llcs(two_llcs: HostTopology, lock_dir: Path) -> None:
    assert max_concurrent(3, two_llcs, llc_aligned=True) == 2
    assert max_concurrent(5, two_llcs, llc_aligned=True) == 1
    with reserve(3, test="a", topology=two_llcs, lock_dir=lock_dir, llc_aligned=True,
                 wait_s=0) as a:
        assert a.mode is Mode.LLC and a.cpus == (0, 1, 2, 3) and a.llcs == (0,)
        with reserve(4, test="b", topology=two_llcs, lock_dir=lock_dir, llc_aligned=True,
                     wait_s=0) as b:
            assert b.cpus == (4, 5, 6, 7) and b.llcs == (1,)
            with pytest.raises(ReservationTimeout):
                reserve(1, test="c", topology=two_llcs, lock_dir=lock_dir, llc_aligned=True,
                        wait_s=0)
    with reserve(5, test="d", topology=two_llcs, lock_dir=lock_dir, llc_aligned=True,
                 wait_s=0) as d:
        assert d.cpus == tuple(range(8)) and d.llcs == (0, 1)


def test_budget_leaves_whole_llcs_free_for_aligned_runs(two_llcs: HostTopology,
                                                        lock_dir: Path) -> None:
    def take(vcpus: int, *, llc: bool = False) -> Reservation:
        return reserve(vcpus, test="t", topology=two_llcs, lock_dir=lock_dir, llc_aligned=llc,
                       wait_s=0)

    first = take(4, llc=True)
    assert first.cpus == (0, 1, 2, 3)
    with take(1) as one:
        assert one.cpus == (4,)
        first.release()
        with take(2) as two:
            assert two.cpus == (5, 6)  # into the LLC already in use, not the free one
            with take(4, llc=True) as aligned:
                assert aligned.cpus == (0, 1, 2, 3)


def test_topology_too_big_to_pin_fails_at_once(two_llcs: HostTopology, lock_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ReservationTooLarge) as info:
        reserve(9, test="big", topology=two_llcs, lock_dir=lock_dir, llc_aligned=True,
                wait_s=60)
    assert time.monotonic() - start < 1.0
    text = str(info.value)
    assert "\n" not in text and "9 vCPUs" in text and "8 CPUs" in text and "2 LLCs" in text
    assert max_concurrent(9, two_llcs, llc_aligned=True) == 0


def test_max_concurrent_budget(two_cpus: HostTopology, two_llcs: HostTopology) -> None:
    assert [max_concurrent(v, two_cpus) for v in (1, 2, 4, 64)] == [2, 1, 1, 1]
    assert [max_concurrent(v, two_llcs) for v in (1, 3, 4, 8)] == [8, 2, 2, 1]


# --- stale files, forks ---------------------------------------------------------------------


def test_reservation_of_a_sigkilled_process_is_reclaimed(two_cpus: HostTopology,
                                                         lock_dir: Path) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold a reservation, say so, wait to be killed
        try:
            os.close(read_end)
            r = reserve(2, test="doomed", topology=two_cpus, lock_dir=lock_dir, wait_s=10)
            os.write(write_end, ",".join(map(str, r.cpus)).encode() + b"\n")
            time.sleep(600)
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as ready:
            assert ready.readline().strip() == "0,1"
        [held] = held_reservations(lock_dir)
        assert (held.pid, held.test, held.cpus, held.mode) == (pid, "doomed", (0, 1),
                                                               Mode.BUDGET)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # What the dead process wrote is still there; it is not shown, and the CPUs are free.
    assert f'"pid": {pid}' in (lock_dir / "cpu0.lock").read_text()
    assert held_reservations(lock_dir) == []
    with reserve(2, test="next", topology=two_cpus, lock_dir=lock_dir, wait_s=0) as r:
        assert r.cpus == (0, 1) and r.waited_s < 1.0
        assert [h.pid for h in held_reservations(lock_dir)] == [os.getpid()]


def test_forked_child_does_not_keep_the_reservation(tmp_path: Path, two_cpus: HostTopology,
                                                    lock_dir: Path) -> None:
    """A child forked while a reservation is held (a worker, a helper) does not hold it:
    neither after the parent releases nor after the parent is killed."""
    script = """
import os, sys, time
from pathlib import Path
from ktstr.reserve import HostTopology, reserve
r = reserve(2, test="parent", topology=HostTopology.read(Path(sys.argv[1])),
            lock_dir=Path(sys.argv[2]), wait_s=30)
rfd, wfd = os.pipe()
if os.fork() == 0:  # past os.fork(): the fork hooks have run
    os.write(wfd, str(os.getpid()).encode())
    time.sleep(600)
    os._exit(0)
print(os.read(rfd, 32).decode(), flush=True)
"""
    child = Child(script, tmp_path, str(tmp_path / "sys2"), str(lock_dir))
    try:
        [grandchild] = map(int, child.lines)
        assert [h.test for h in held_reservations(lock_dir)] == ["parent"]
        child.kill(group=False)  # the grandchild lives on, forked while the CPUs were held
        assert not wait_gone(grandchild, timeout=0.1)
        assert held_reservations(lock_dir) == []
        with reserve(2, test="t", topology=two_cpus, lock_dir=lock_dir, wait_s=0):
            pass
    finally:
        child.kill(group=True)
    # A child that got the fds some other way (pass_fds, a fork that runs no Python hooks)
    # still has them open: releasing must unlock, not only close.
    with reserve(2, test="parent", topology=two_cpus, lock_dir=lock_dir, wait_s=0) as r:
        helper = subprocess.Popen(["sleep", "600"], pass_fds=r._fds)
        try:
            r.release()
            with reserve(2, test="t", topology=two_cpus, lock_dir=lock_dir, wait_s=0):
                pass
        finally:
            helper.kill()
            helper.wait()


# --- ktstr locks ----------------------------------------------------------------------------


def _show(lock_dir: Path, *, as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = locks_cli.show(as_json=as_json, lock_dir=lock_dir, out=out)
    return code, out.getvalue()


def test_locks_lists_held_reservations(tmp_path: Path, two_llcs: HostTopology, lock_dir: Path,
                                       children: contextlib.ExitStack) -> None:
    assert _show(lock_dir) == (0, "no reservations held\n")
    assert _show(lock_dir, as_json=True) == (0, "[]\n")
    child = _holder(children, tmp_path, 4, "tests/vm/test_x.py::aligned", tmp_path / "sys8",
                    lock_dir, llc=True)
    with reserve(2, test="tests/vm/test_y.py::budget", topology=two_llcs, lock_dir=lock_dir,
                 wait_s=0):
        time.sleep(0.2)
        code, text = _show(lock_dir)
        assert code == 0
        header, *rows = text.splitlines()
        assert header.split() == ["CPUS", "PID", "MODE", "HELD_S", "TEST"]
        assert [r.split()[:3] for r in rows] == [["0-3", str(child.pid), "llc"],
                                                 ["4-5", str(os.getpid()), "budget"]]
        assert [r.split()[4] for r in rows] == ["tests/vm/test_x.py::aligned",
                                                "tests/vm/test_y.py::budget"]
        assert float(rows[1].split()[3]) >= 0.2
        code, text = _show(lock_dir, as_json=True)
        entries = json.loads(text)
        assert [(e["cpus"], e["pid"], e["mode"], e["test"]) for e in entries] == [
            ([0, 1, 2, 3], child.pid, "llc", "tests/vm/test_x.py::aligned"),
            ([4, 5], os.getpid(), "budget", "tests/vm/test_y.py::budget")]
        assert entries[1]["held_s"] >= 0.2
        child.kill()
        assert wait_gone(child.pid)
        assert [r.split()[0] for r in _show(lock_dir)[1].splitlines()[1:]] == ["4-5"]
    assert _show(lock_dir) == (0, "no reservations held\n")


def test_ktstr_locks_command(tmp_path: Path, two_cpus: HostTopology) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, KTSTR_CACHE_DIR=str(cache),
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ktstr", "locks", *argv], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run() == "no reservations held\n"
    with contextlib.ExitStack() as stack:
        stack.enter_context(reserve(2, test="cli::t", topology=two_cpus,
                                    lock_dir=cache / "locks", wait_s=0))
        assert run().splitlines()[1].split()[:3] == ["0-1", str(os.getpid()), "budget"]
        assert json.loads(run("--json"))[0]["test"] == "cli::t"
    assert run("--json") == "[]\n"
