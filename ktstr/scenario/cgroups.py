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
from collections.abc import Callable, Mapping, Sequence

from ktstr.cpulist import format_cpu_list, parse_cpu_list
from ktstr.errors import KtstrError
from ktstr.scenario.controls import (
    CONFIG_OF_FILE,
    CgroupControls,
    ControlWrite,
    v1_writes,
    v2_writes,
)

TASK_LEAF = "_w"


class MissingControl(KtstrError):
    """A controller file the scenario sets does not exist here (kernel config, v1 mounts)."""

V1_COMPANIONS = ("cpu", "memory", "freezer")
"""v1 hierarchies a scenario may need beside cpuset, made only for cgroups that set them."""


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

    def set_controls(self, name: str, controls: CgroupControls) -> None:
        """Write the controller files ``controls`` sets (a missing one is a clear error)."""
        raise KtstrError(f"cgroup {name}: this cgroup backend has no controller files")

    def set_frozen(self, name: str, frozen: bool, timeout: float = 5.0) -> None:
        raise KtstrError(f"cgroup {name}: this cgroup backend cannot freeze")

    def cpu_stat(self, name: str) -> dict[str, int]:
        """The cgroup's ``cpu.stat`` counters (throttling, usage); empty where there are none."""
        return {}

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Kill whatever still runs below ``name`` and remove it, deepest first."""
        _remove_tree(self.path(name), timeout)

    def _dirs_below(self, top: str) -> list[str]:
        return _dirs_below(top)


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
            path = os.path.join(self.path(name), "cpuset.cpus")
            try:
                _write(path, format_cpu_list(cpus) if cpus is not None else "")
            except OSError as err:
                # 6.12 refuses to empty a populated cgroup's cpuset.cpus (ENOSPC) where 6.18
                # lets it inherit: give it what it would inherit. Every cpuset change
                # rewrites it, so it still follows its parent.
                if cpus is not None or err.errno != errno.ENOSPC or name not in effective:
                    raise
                _write(path, format_cpu_list(effective[name]))

    def effective_cpus(self, name: str) -> list[int]:
        with open(os.path.join(self.path(name), "cpuset.cpus.effective")) as f:
            return list(parse_cpu_list(f.read().strip()))

    def set_controls(self, name: str, controls: CgroupControls) -> None:
        for w in v2_writes(controls):
            _write_control(name, os.path.join(self.path(name), w.file), w,
                           available=_controllers(self.path(os.path.dirname(name))))

    def set_frozen(self, name: str, frozen: bool, timeout: float = 5.0) -> None:
        path = self.path(name)
        if not os.path.exists(os.path.join(path, "cgroup.freeze")):
            raise KtstrError(f"cgroup {name}: this kernel has no cgroup.freeze (v2 freezer)")
        _write(os.path.join(path, "cgroup.freeze"), "1" if frozen else "0")
        want = f"frozen {int(frozen)}"
        _wait_for(lambda: want in _read_lines(os.path.join(path, "cgroup.events")), timeout,
                  f"cgroup {name}: not {'frozen' if frozen else 'thawed'} after {timeout:g} s")

    def cpu_stat(self, name: str) -> dict[str, int]:
        return _read_counters(os.path.join(self.path(name), "cpu.stat"))


class V1Backend(CgroupBackend):
    """The cpuset hierarchy, plus the cpu, memory and freezer hierarchies where a cgroup
    sets their files: a parallel directory of the same name under each, made on first use
    (``companions``: controller -> the directory that mirrors ``root`` there)."""

    version = 1

    def __init__(self, root: str, companions: Mapping[str, str] | None = None) -> None:
        super().__init__(root)
        self.companions = dict(v1_companions(self.root) if companions is None else companions)

    def companion(self, controller: str, name: str) -> str:
        top = self.companions.get(controller)
        if top is None:
            raise MissingControl(
                f"cgroup {name}: no cgroup v1 {controller} hierarchy is mounted beside the "
                f"cpuset one (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller})"
            )
        return os.path.join(top, name) if name else top

    def _join(self, controller: str, name: str) -> str:
        """Make ``name``'s directory in ``controller``'s hierarchy and move its tasks there."""
        path = self.companion(controller, name)
        if not os.path.isdir(path):
            os.makedirs(path)
            if controller == "cpu" and os.path.exists(os.path.join(path, "cpu.rt_runtime_us")):
                # A new v1 cpu cgroup gets no RT runtime: give it its parent's, so
                # SCHED_FIFO/RR workers can still run under group scheduling.
                parent_rt = os.path.join(os.path.dirname(path), "cpu.rt_runtime_us")
                with contextlib.suppress(OSError), open(parent_rt) as f:
                    _write(os.path.join(path, "cpu.rt_runtime_us"), f.read().strip())
            for pid in _procs(self.path(name)):
                with contextlib.suppress(ProcessLookupError, OSError):
                    _write(os.path.join(path, "cgroup.procs"), str(pid))
        return path

    def attach(self, name: str, pid: int) -> None:
        super().attach(name, pid)
        for controller in self.companions:
            home = self._nearest(controller, name)
            if home is not None:
                _write(os.path.join(home, "cgroup.procs"), str(pid))

    def _nearest(self, controller: str, name: str) -> str | None:
        """``name``'s own directory in ``controller``'s hierarchy, else its nearest ancestor's."""
        while name:
            path = self.companion(controller, name)
            if os.path.isdir(path):
                return path
            name = os.path.dirname(name)
        return None

    def set_controls(self, name: str, controls: CgroupControls) -> None:
        for w in v1_writes(controls):
            path = self._join(w.controller, name)
            _write_control(name, os.path.join(path, w.file), w,
                           available=list(self.companions))

    def set_frozen(self, name: str, frozen: bool, timeout: float = 5.0) -> None:
        path = self._join("freezer", name)
        state = "FROZEN" if frozen else "THAWED"
        _write(os.path.join(path, "freezer.state"), state)
        _wait_for(lambda: state in _read_lines(os.path.join(path, "freezer.state")), timeout,
                  f"cgroup {name}: freezer.state not {state} after {timeout:g} s")

    def cpu_stat(self, name: str) -> dict[str, int]:
        if "cpu" not in self.companions:
            return {}
        path = self._nearest("cpu", name)
        return _read_counters(os.path.join(path, "cpu.stat")) if path else {}

    def remove(self, name: str, timeout: float = 5.0) -> None:
        # A frozen v1 task never handles SIGKILL: thaw before killing.
        if "freezer" in self.companions:
            thaw = self.companion("freezer", name)
            for d in _dirs_below(thaw) if os.path.isdir(thaw) else ():
                with contextlib.suppress(OSError):
                    _write(os.path.join(d, "freezer.state"), "THAWED")
        super().remove(name, timeout)
        for controller in self.companions:
            _remove_tree(self.companion(controller, name), timeout)

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


def v1_mounts() -> dict[str, str]:
    """Mount point of each cgroup v1 controller hierarchy (a co-mounted one under each name)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = ([*right.split(), "", "", ""])[:3]
            if fstype != "cgroup":
                continue
            for opt in opts.split(","):
                out.setdefault(opt, left.split()[4])
    return out


def v1_companions(root: str) -> dict[str, str]:
    """For a directory of the v1 cpuset hierarchy, the matching one in each companion."""
    mounts = v1_mounts()
    cpuset = mounts.get("cpuset")
    if cpuset is None or os.path.commonpath([cpuset, root]) != cpuset:
        return {}
    rel = os.path.relpath(root, cpuset)
    return {c: os.path.normpath(os.path.join(mounts[c], rel)) for c in V1_COMPANIONS
            if c in mounts and mounts[c] != cpuset}


def _controllers(path: str) -> list[str]:
    return " ".join(_read_lines(os.path.join(path, "cgroup.controllers"))).split()


def _write_control(name: str, path: str, w: ControlWrite, available: Sequence[str]) -> None:
    try:
        _write(path, w.value)
    except FileNotFoundError:
        if w.controller not in available:
            why = (f"the {w.controller} controller is not available here "
                   f"(available: {', '.join(available) or 'none'})")
        else:
            why = f"this kernel has no {w.file} ({CONFIG_OF_FILE.get(w.file, 'not built in')})"
        raise MissingControl(f"cgroup {name}: cannot set {w.file}: {why}") from None
    except OSError as err:
        raise KtstrError(
            f"cgroup {name}: the kernel refused {w.value!r} for {w.file}: {err.strerror}"
        ) from None


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f]
    except OSError:
        return []


def _read_counters(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read_lines(path):
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _wait_for(done: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise KtstrError(message)
        time.sleep(0.01)


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
    for ctrl in ("cpuset", "cpu", "memory"):
        if ctrl in enabled:
            continue
        try:
            _write(control, f"+{ctrl}")
        except OSError as err:
            if ctrl == "cpuset":
                raise KtstrError(
                    f"cannot enable the cpuset controller in {path}: {err.strerror}"
                ) from err
            # cpu and memory are optional (cpu refuses while RT tasks run in v2 with RT
            # group scheduling); setting a file of a missing one says so (set_controls).


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


def _dirs_below(top: str) -> list[str]:
    return [dirpath for dirpath, _dirs, _files in os.walk(top)]


def _remove_tree(top: str, timeout: float) -> None:
    if not os.path.isdir(top):
        return
    deadline = time.monotonic() + timeout
    for d in sorted(_dirs_below(top), key=len, reverse=True):
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
