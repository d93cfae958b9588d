"""Host mode: run catalog scenarios on this machine under whatever scheduler is active.

Everything happens in a dedicated cgroup subtree ``ktstr-<pid>`` (cgroup v2
if it offers the cpuset controller, else the v1 cpuset hierarchy). The
subtree and every worker are removed on success, failure, exception,
Ctrl-C and SIGTERM (turned into KeyboardInterrupt while a session is open).
A run killed outright leaves its subtree: the next session removes it
(`reap_stale_sessions`), killing any of our processes still inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ktstr import reap
from ktstr.checks import Checks
from ktstr.cpulist import format_cpu_list
from ktstr.errors import KtstrError
from ktstr.scenario import catalog
from ktstr.scenario.cgroups import (
    CgroupBackend,
    MissingControl,
    V2Backend,
    backend_for,
    cgroup_mounts,
    v1_companions,
)
from ktstr.scenario.cpuset import resolve_cpuset
from ktstr.scenario.model import CpusetSpec
from ktstr.scenario.runner import ScenarioContext, execute_steps
from ktstr.telemetry import ScenarioResult
from ktstr.topology import Topology

_SYS_CPU = "/sys/devices/system/cpu"
_SESSION_RE = re.compile(r"^ktstr-(\d+)$")
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def host_cpus() -> list[int]:
    """CPUs this process may use (its affinity), which are online."""
    return sorted(os.sched_getaffinity(0))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _llc_key(cpu: int) -> str:
    """The CPU list sharing ``cpu``'s last-level cache (highest cache index)."""
    base = f"{_SYS_CPU}/cpu{cpu}/cache"
    with contextlib.suppress(OSError):
        indices = sorted(
            (int(_read(f"{base}/{d}/level") or 0), d) for d in os.listdir(base)
            if d.startswith("index")
        )
        if indices:
            return _read(f"{base}/{indices[-1][1]}/shared_cpu_list") or ""
    return ""


def _node_of(cpu: int) -> int:
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"{_SYS_CPU}/cpu{cpu}"):
            if entry.startswith("node") and entry[4:].isdigit():
                return int(entry[4:])
    return 0


def host_topology(cpus: Sequence[int] | None = None) -> tuple[Topology, tuple[int, ...]]:
    """A Topology for ``cpus`` (default: the usable host CPUs) and the real id of each
    topology CPU. Regular shapes keep their nodes/LLCs/SMT; anything irregular
    becomes one node, one LLC, one thread per core, in CPU order."""
    cpus = sorted(cpus if cpus is not None else host_cpus())
    if not cpus:
        raise KtstrError("no usable CPUs for host mode")
    flat = (Topology(1, 1, len(cpus), 1), tuple(cpus))
    try:
        nodes: dict[int, dict[str, list[int]]] = {}
        for c in cpus:
            nodes.setdefault(_node_of(c), {}).setdefault(_llc_key(c), []).append(c)
        llc_groups = [g for n in sorted(nodes) for g in nodes[n].values()]
        sizes = {len(g) for g in llc_groups}
        per_node = {len(v) for v in nodes.values()}
        if len(sizes) != 1 or len(per_node) != 1:
            return flat
        threads = {len((_read(f"{_SYS_CPU}/cpu{c}/topology/thread_siblings_list") or "x")
                       .split(",")) for c in cpus}
        tpc = 1
        if len(threads) == 1:
            only = threads.pop()
            tpc = only if sizes.pop() % only == 0 else 1
        size = len(llc_groups[0])
        if tpc > 1:
            ordered: list[int] = []
            for g in llc_groups:
                by_core: dict[str, list[int]] = {}
                for c in g:
                    key = _read(f"{_SYS_CPU}/cpu{c}/topology/thread_siblings_list") or str(c)
                    by_core.setdefault(key, []).append(c)
                if any(len(v) != tpc for v in by_core.values()):
                    return flat
                ordered.extend(c for key in sorted(by_core, key=lambda k: min(by_core[k]))
                               for c in sorted(by_core[key]))
        else:
            ordered = [c for g in llc_groups for c in sorted(g)]
        topo = Topology(len(nodes), len(llc_groups), size // tpc, tpc)
        return topo, tuple(ordered)
    except (KtstrError, ValueError):
        return flat


@dataclass
class HostSession:
    """The ``ktstr-<pid>`` cgroup subtree and the CPUs a host run uses."""

    backend: CgroupBackend
    root: str
    topology: Topology
    cpu_ids: tuple[int, ...]


def session_base() -> tuple[str, int]:
    """The cgroup directory host sessions are made in, and its cgroup version."""
    v2, v1 = cgroup_mounts()
    if v2:
        return v2, 2
    if v1:
        return v1, 1
    raise KtstrError(
        "host mode needs the cpuset cgroup controller (cgroup v2 with cpuset, or a v1 "
        "cpuset mount at /sys/fs/cgroup/cpuset); none is mounted"
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def host_session(cpuset: str | None = None) -> Iterator[HostSession]:
    """Create ``ktstr-<pid>``, yield, and always remove it (with everything inside)."""
    topo, ids = host_topology()
    if cpuset:
        picked = resolve_cpuset(CpusetSpec.parse(cpuset), topo)
        ids = tuple(sorted(ids[i] for i in picked))
        topo = Topology(1, 1, len(ids), 1)
    base, version = session_base()
    reap_stale_sessions(base)
    root = os.path.join(base, f"ktstr-{os.getpid()}")
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s in old:
        signal.signal(s, _raise_interrupt)
    backend: CgroupBackend | None = None
    # Orphans of killed workers (e.g. a fork_exit child) re-parent to us, so we reap them.
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        if version == 2:
            V2Backend(base)  # enables cpuset/cpu for children of the mount root
        os.mkdir(root)
        # cgroupfs reports a directory's times from when its inode was last loaded,
        # unless they were ever set: set them, so ctime stays the creation time
        # (what reap_stale_sessions compares a pid's start time with).
        os.utime(root)
        if version == 1:
            for fname in ("cpuset.mems", "cpuset.cpus"):
                with open(os.path.join(base, fname)) as f, \
                        open(os.path.join(root, fname), "w") as out:
                    out.write(f.read().strip() or "\n")
        backend = backend_for(root)
        if version == 1:
            with open(os.path.join(root, "cpuset.cpus"), "w") as out:
                out.write(format_cpu_list(ids))
        yield HostSession(backend, root, topo, ids)
    finally:
        try:
            if backend is not None:
                backend.remove("")
            elif os.path.isdir(root):
                os.rmdir(root)
        finally:
            _reap_all()
            for s, handler in old.items():
                signal.signal(s, handler)


def _ours(pid: int) -> bool:
    """A process of our real uid (a leftover worker of a killed run, not someone else's)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1]) == os.getuid()
    except (OSError, ValueError, IndexError):
        pass
    return False


def reap_stale_sessions(base: str | None = None) -> list[str]:
    """Remove the ``ktstr-<pid>`` subtrees of `base` whose host run is gone; those removed.

    The name holds only the pid, so a live process with it is the owner only
    if it started before the subtree was made (`reap.pid_owner_alive`). Our
    processes still inside are killed first; a subtree holding anyone else's
    is left alone, and so is one that cannot be removed.
    """
    if base is None:
        base = session_base()[0]
    removed: list[str] = []
    # A v1 run also has ktstr-<pid> directories in the cpu/memory/freezer hierarchies.
    for top in (base, *v1_companions(base).values()):
        removed.extend(_reap_stale_in(top))
    return removed


def _reap_stale_in(base: str) -> list[str]:
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _SESSION_RE.match(name)
        if m is None:
            continue
        root = os.path.join(base, name)
        try:
            created = os.stat(root).st_ctime  # never before the mkdir (see host_session)
        except OSError:
            continue
        if reap.pid_owner_alive(int(m[1]), created):
            continue
        tree = CgroupBackend(root)
        if not all(_ours(pid) for pid in tree.pids("")):
            continue
        try:
            tree.remove("")
        except KtstrError:
            continue
        removed.append(root)
    return removed


def _reap_all(timeout: float = 2.0) -> None:
    """Wait for every child of this process (host mode owns all of them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


DEFAULT_DURATION_S = 3.0
"""Seconds per scenario of ``ktstr run``."""


def run_host(
    names: Sequence[str],
    *,
    duration: float = DEFAULT_DURATION_S,
    workers: int | None = None,
    cpuset: str | None = None,
    checks: Checks | dict[str, Any] | None = None,
) -> list[ScenarioResult]:
    """Run catalog scenarios one after another on this host."""
    scenarios = [catalog.get(n) for n in (names or catalog.default_names())]
    if duration <= 0:
        raise KtstrError(f"--duration must be > 0, got {duration:g}")
    if workers is not None and workers < 1:
        raise KtstrError(f"--workers must be >= 1, got {workers}")
    results = []
    with host_session(cpuset) as session:
        ctx = ScenarioContext(
            topology=session.topology,
            duration=duration,
            cgroup_root=session.root,
            cpu_ids=session.cpu_ids,
            workers=workers,
            scratch_dir=tempfile.gettempdir(),
        )
        plans = [(sc, sc.steps(catalog.Params(session.topology, workers))) for sc in scenarios]
        for sc, steps in plans:  # fail on an impossible scenario before running any
            try:
                catalog.validate(steps, session.topology)
            except KtstrError as err:
                raise KtstrError(f"scenario {sc.name}: {err}") from None
        for sc, steps in plans:
            resolved = Checks.resolve(scheduler=checks, test=sc.checks)
            try:
                results.append(execute_steps(ctx, steps, duration=duration, name=sc.name,
                                             checks=resolved))
            except MissingControl as err:  # this host cannot express it: say so, go on
                results.append(ScenarioResult(sc.name, session.topology.label, 0.0,
                                              notes=[f"skipped: {err}"]))
    return results
