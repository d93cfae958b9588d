"""One small interface over cgroup v2 (guests) and cgroup v1 cpuset (hosts that still use it).

Names are paths relative to the backend's root directory (``a``, ``a/b``).
CPU lists are real CPU ids. The two hierarchies differ in ways the runner
must not care about:

- v1 cpusets start empty (cpus and mems must be written before a task can
  join) and a parent cannot shrink below a child, so v1 always writes the
  effective set of every cgroup, growing top-down and shrinking bottom-up;
  :meth:`CgroupBackend.apply_cpus` hides that.
- v2 forbids tasks in a cgroup that delegates controllers to children (the
  "no internal processes" rule), so v2 keeps a cgroup's tasks in a leaf
  ``<name>/_w`` that inherits the cgroup's CPUs.
- The v1 backend uses only the cpuset hierarchy: with RT group scheduling a
  new v1 cpu cgroup has zero RT runtime, so SCHED_FIFO/RR workers could not run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Mapping, Sequence

from ktstr.cpulist import format_cpu_list, parse_cpu_list
from ktstr.errors import KtstrError

TASK_LEAF = "_w"


class CgroupBackend:
    version = 0

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"

    # -- paths ---------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def task_path(self, name: str) -> str:
        return self.path(name)

    # -- operations ----------------------------------------------------------

    def create(self, name: str) -> None:
        raise NotImplementedError

    def apply_cpus(
        self,
        explicit: Mapping[str, Sequence[int] | None],
        effective: Mapping[str, Sequence[int]],
        previous: Mapping[str, Sequence[int]],
    ) -> None:
        """Make the kernel match: ``explicit`` (None = unset) and the resolved ``effective``."""
        raise NotImplementedError

    def attach(self, name: str, pid: int) -> None:
        _write(os.path.join(self.task_path(name), "cgroup.procs"), str(pid))

    def pids(self, name: str) -> list[int]:
        out: list[int] = []
        for d in self._dirs_below(self.path(name)):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out.extend(int(x) for x in f.read().split())
            except FileNotFoundError:
                pass
        return out

    def effective_cpus(self, name: str) -> list[int]:
        raise NotImplementedError

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Kill whatever still runs below ``name`` and remove it, deepest first."""
        top = self.path(name)
        if not os.path.isdir(top):
            return
        deadline = time.monotonic() + timeout
        for d in sorted(self._dirs_below(top), key=len, reverse=True):
            while True:
                for pid in _procs(d):
                    _kill_and_reap(pid)
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise KtstrError(f"cannot remove cgroup {d}: {err.strerror}") from err
                    time.sleep(0.01)

    def _dirs_below(self, top: str) -> list[str]:
        out = []
        for dirpath, _dirs, _files in os.walk(top):
            out.append(dirpath)
        return out


class V2Backend(CgroupBackend):
    version = 2

    def __init__(self, root: str) -> None:
        super().__init__(root)
        _enable_controllers(self.root)

    def task_path(self, name: str) -> str:
        leaf = os.path.join(self.path(name), TASK_LEAF)
        # Made by create(); workers attach themselves concurrently, so never race a mkdir.
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf)
        return leaf

    def create(self, name: str) -> None:
        parent = os.path.dirname(name)
        if parent:
            _enable_controllers(self.path(parent))
        os.mkdir(self.path(name))
        os.mkdir(os.path.join(self.path(name), TASK_LEAF))

    def apply_cpus(
        self,
        explicit: Mapping[str, Sequence[int] | None],
        effective: Mapping[str, Sequence[int]],
        previous: Mapping[str, Sequence[int]],
    ) -> None:
        for name in sorted(explicit, key=lambda n: n.count("/")):
            cpus = explicit[name]
            _write(
                os.path.join(self.path(name), "cpuset.cpus"),
                format_cpu_list(cpus) if cpus is not None else "",
            )

    def effective_cpus(self, name: str) -> list[int]:
        with open(os.path.join(self.path(name), "cpuset.cpus.effective")) as f:
            return list(parse_cpu_list(f.read().strip()))


class V1Backend(CgroupBackend):
    version = 1

    def create(self, name: str) -> None:
        path = self.path(name)
        parent = os.path.dirname(path)
        os.mkdir(path)
        # A new v1 cpuset is empty; it needs memory nodes and CPUs before tasks can join.
        for fname in ("cpuset.mems", "cpuset.cpus"):
            with open(os.path.join(parent, fname)) as f:
                _write(os.path.join(path, fname), f.read().strip())

    def apply_cpus(
        self,
        explicit: Mapping[str, Sequence[int] | None],
        effective: Mapping[str, Sequence[int]],
        previous: Mapping[str, Sequence[int]],
    ) -> None:
        names = sorted(effective, key=lambda n: n.count("/"))
        # Grow top-down to the union, then shrink bottom-up to the target: each
        # write keeps every child inside its parent, as v1 requires.
        for name in names:
            # What the kernel has now (a new v1 cgroup holds a copy of its parent's CPUs).
            with open(os.path.join(self.path(name), "cpuset.cpus")) as f:
                current = parse_cpu_list(f.read().strip())
            union = set(effective[name]) | set(current)
            _write(os.path.join(self.path(name), "cpuset.cpus"), format_cpu_list(union))
        for name in reversed(names):
            _write(os.path.join(self.path(name), "cpuset.cpus"), format_cpu_list(effective[name]))

    def effective_cpus(self, name: str) -> list[int]:
        with open(os.path.join(self.path(name), "cpuset.effective_cpus")) as f:
            return list(parse_cpu_list(f.read().strip()))


def backend_for(root: str) -> CgroupBackend:
    """The backend for an existing cgroup directory (v2 if it has cgroup.controllers)."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return V2Backend(root)
    if os.path.exists(os.path.join(root, "cpuset.cpus")):
        return V1Backend(root)
    raise KtstrError(
        f"cgroup root {root}: not a cgroup v2 directory nor a v1 cpuset directory; "
        "mount cgroup2 (or the v1 cpuset controller) there"
    )


def cgroup_mounts() -> tuple[str | None, str | None]:
    """(cgroup v2 mount with the cpuset controller, v1 cpuset mount); either may be None."""
    v2 = v1 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _src, opts = ([*right.split(), "", "", ""])[:3]
            mnt = fields[4]
            if fstype == "cgroup2" and v2 is None:
                try:
                    with open(os.path.join(mnt, "cgroup.controllers")) as c:
                        if "cpuset" in c.read().split():
                            v2 = mnt
                except OSError:
                    pass
            elif fstype == "cgroup" and "cpuset" in opts.split(",") and v1 is None:
                v1 = mnt
    return v2, v1


def own_cpuset_cpus() -> list[int]:
    """CPUs of the calling process's cpuset (empty if it cannot be determined)."""
    v2, v1 = cgroup_mounts()
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f if line.strip()]
        path = None
        for hid, ctrls, rel in lines:
            if v1 and "cpuset" in ctrls.split(","):
                path = os.path.join(v1, rel.lstrip("/"), "cpuset.effective_cpus")
            elif v2 and hid == "0" and path is None:
                path = os.path.join(v2, rel.lstrip("/"), "cpuset.cpus.effective")
        if path is None:
            return []
        with open(path) as f:
            return list(parse_cpu_list(f.read().strip()))
    except (OSError, ValueError, KtstrError):
        return []


def _enable_controllers(path: str) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    try:
        with open(control) as f:
            enabled = set(f.read().split())
    except OSError:
        return
    for ctrl in ("cpuset", "cpu"):
        if ctrl in enabled:
            continue
        try:
            _write(control, f"+{ctrl}")
        except OSError as err:
            if ctrl == "cpuset":
                raise KtstrError(
                    f"cannot enable the cpuset controller in {path}: {err.strerror}"
                ) from err
            # cpu is optional (it refuses while RT tasks run in v2 with RT group scheduling).


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode() if text else b"\n")
    finally:
        os.close(fd)


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _kill_and_reap(pid: int) -> None:
    """SIGKILL a straggler; reap it if it is our child (never waits on anyone else's)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
