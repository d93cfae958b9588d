"""Nothing left behind after SIGKILL: things named after their owner, and one reaper.

A process killed outright runs no cleanup. So whatever ktstr creates that
would outlive it — temporary directories and files, unpack trees in the kernel
cache, disk clones, loop-mounted images — carries its owner in its name from
the first instant (``mkdtemp``/``O_EXCL`` create the entry under that name):

    [.]ktstr-<kind>-<pid>.<start>.<space>-<random>[suffix]

``start`` is the owner's start time (clock ticks after boot, field 22 of
/proc/<pid>/stat) and ``space`` a digest of the boot id and pid namespace the
pid belongs to. The next ktstr that creates something in the same place (and
every command and test run at start-up, `reap_stale_all`) removes what dead
owners left there:

- the pid is gone, a zombie, or a process with another start time (the pid
  was recycled): dead, removed;
- another boot or pid namespace (a sandbox guest writing into the shared
  cache, a container): the owner cannot be checked from here, so the entry is
  kept until it is `FOREIGN_MAX_AGE_S` old (loop devices: kept);
- otherwise the owner is alive: kept.

Host-mode cgroups are named ``ktstr-<pid>`` (the pid only); `pid_owner_alive`
judges those by the cgroup's ctime instead of a recorded start time.

Children that must die with ktstr (QEMU, make, workers) arm the parent-death
signal through `die_with_parent` / `pdeathsig_preexec`.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

FOREIGN_MAX_AGE_S = 24 * 3600.0
"""An entry of another boot or pid namespace is kept this long (no run lasts a day)."""
START_SLACK_S = 2.0
"""Start times in wall-clock seconds come from btime, which has 1 s resolution and moves
with clock steps: a pid-only owner counts as recycled only beyond this margin."""
PR_SET_PDEATHSIG = 1

# Resolved once at import, in the parent: loading a library after fork (in a
# preexec_fn) can deadlock on the loader lock another thread held at fork time.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int

_KIND_RE = re.compile(r"^[a-z]+$")
OWNED_RE = re.compile(r"^\.?ktstr-[a-z]+-(\d+)\.(\d+)\.([0-9a-f]{8})-")
_TRASH = "trash"


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    state: str  # R, S, D, Z (zombie), X (dead), ...
    start: int  # clock ticks after boot

    @property
    def gone(self) -> bool:
        """Exited (a zombie waits only for its parent to collect the status)."""
        return self.state in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """State and start time of `pid` from /proc, None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data.rpartition(b")")[2].split()
    try:
        return ProcStat(fields[0].decode(), int(fields[19]))
    except (IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def pid_space() -> str:
    """8 hex digits naming this boot and pid namespace: where a recorded pid means something."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return hashlib.sha256(f"{boot}:{ns}".encode()).hexdigest()[:8]


def start_epoch(stat: ProcStat) -> float:
    """When the process started, in wall-clock seconds (to compare with file times)."""
    btime = 0.0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                btime = float(line.split()[1])
                break
    return btime + stat.start / os.sysconf("SC_CLK_TCK")


def pid_owner_alive(pid: int, created: float) -> bool:
    """Whether `pid` may still be the process that made something at `created` (epoch s).

    For names that carry only a pid: a process with that pid that started
    after the thing was made is a recycled pid, not the owner.
    """
    stat = proc_stat(pid)
    if stat is None or stat.gone:
        return False
    return start_epoch(stat) <= created + START_SLACK_S


class State(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    FOREIGN = "foreign"  # another boot or pid namespace: cannot be checked from here


@dataclass(frozen=True)
class Owner:
    """The process that created an entry, as recorded in the entry's name."""

    pid: int
    start: int
    space: str

    @property
    def tag(self) -> str:
        return f"{self.pid}.{self.start}.{self.space}"

    def state(self) -> State:
        if self.space != pid_space():
            return State.FOREIGN
        stat = proc_stat(self.pid)
        if stat is None or stat.gone or stat.start != self.start:
            return State.DEAD
        return State.ALIVE


_me: dict[int, Owner] = {}


def me() -> Owner:
    """This process as an owner (recomputed after a fork)."""
    pid = os.getpid()
    owner = _me.get(pid)
    if owner is None:
        stat = proc_stat(pid)
        if stat is None:
            raise OSError(f"cannot read /proc/{pid}/stat; is /proc mounted?")
        owner = _me[pid] = Owner(pid, stat.start, pid_space())
    return owner


def owner_of(name: str) -> Owner | None:
    """The owner recorded in an owned name, None for any other name."""
    m = OWNED_RE.match(name)
    return Owner(int(m[1]), int(m[2]), m[3]) if m else None


# --- creating owned things ------------------------------------------------------------------


def _prefix(kind: str, hidden: bool) -> str:
    if not _KIND_RE.match(kind):
        raise ValueError(f"owned-name kind must be lowercase letters, got {kind!r}")
    return f"{'.' if hidden else ''}ktstr-{kind}-{me().tag}-"


def owned_name(kind: str, suffix: str = "", *, hidden: bool = False) -> str:
    """A fresh name for something this process creates (see the module docstring)."""
    return f"{_prefix(kind, hidden)}{secrets.token_hex(4)}{suffix}"


def _place(directory: Path | str | None) -> Path:
    place = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    _sweep_once(place)
    return place


def mkdtemp(kind: str, directory: Path | str | None = None, *, hidden: bool = False) -> Path:
    """A new owned directory in `directory` (default: the temp dir); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=_prefix(kind, hidden), dir=_place(directory)))


def mkstemp(kind: str, directory: Path | str | None = None, *, suffix: str = "",
            hidden: bool = False) -> tuple[int, Path]:
    """A new owned file, open: (fd, path). The caller closes and removes or renames it."""
    fd, name = tempfile.mkstemp(prefix=_prefix(kind, hidden), suffix=suffix,
                                dir=_place(directory))
    return fd, Path(name)


@contextlib.contextmanager
def temporary_directory(kind: str, directory: Path | str | None = None) -> Iterator[Path]:
    """Like tempfile.TemporaryDirectory, but owned: a SIGKILL leaves it to the next reaper."""
    path = mkdtemp(kind, directory)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- reaping ----------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


@dataclass(frozen=True)
class Mount:
    point: str
    source: str


def mounts() -> list[Mount]:
    """This mount namespace's mounts (mount point, source device), from mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 5 and len(rest) >= 2:
                    out.append(Mount(_unescape(fields[4]), _unescape(rest[1])))
    except OSError:
        pass
    return out


def _has_mount_below(path: Path, points: list[str]) -> bool:
    top = str(path).rstrip("/") + "/"
    return any(p == top[:-1] or p.startswith(top) for p in points)


def _remove(path: Path, points: list[str]) -> bool:
    """Delete `path` once: claim it by renaming to our own trash name, then delete.

    The rename makes concurrent reapers skip it, and a reaper killed halfway
    leaves trash it owns, for the next one. A tree with something mounted below
    is not touched (rmtree would delete the mounted filesystem's files).
    """
    if _has_mount_below(path, points):
        return False
    trash = path.with_name(owned_name(_TRASH, hidden=True))
    try:
        os.rename(path, trash)
    except OSError:
        return False  # gone already, or claimed by another reaper
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            trash.unlink()
    return True


def reap_stale(directory: Path | str, *,
               foreign_max_age_s: float = FOREIGN_MAX_AGE_S) -> list[Path]:
    """Remove the owned entries of `directory` whose owner is dead; the paths removed."""
    directory = Path(directory)
    if proc_stat(os.getpid()) is None:
        return []  # no /proc: every owner would look dead
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed: list[Path] = []
    points: list[str] | None = None
    now = time.time()
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is None:
            continue
        state = owner.state()
        if state is State.ALIVE:
            continue
        if state is State.FOREIGN:
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < foreign_max_age_s:
                    continue
            except OSError:
                continue
        if points is None:
            points = [m.point for m in mounts()]
        path = directory / entry.name
        if _remove(path, points):
            removed.append(path)
    return removed


_swept: set[tuple[int, Path]] = set()


def _sweep_once(directory: Path) -> None:
    """Reap `directory` before this process first creates something there."""
    key = (os.getpid(), directory.absolute())
    if key not in _swept:
        _swept.add(key)
        reap_stale(directory)


# --- loop devices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    backing: Path  # the image file (it may have been deleted since)


def loop_devices() -> list[LoopDevice]:
    """Attached loop devices and their backing files, from sysfs."""
    out = []
    for sys_dir in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (sys_dir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        backing = backing.removesuffix(" (deleted)")
        out.append(LoopDevice(f"/dev/{sys_dir.name}", Path(backing)))
    return out


def reap_stale_loops() -> list[str]:
    """Unmount and detach loop devices over owned images whose owner is dead (needs root).

    Returns the devices detached. Mounts deepest first; a busy mount is
    detached lazily (it goes once its last user does). The image is deleted too.
    """
    detached: list[str] = []
    if proc_stat(os.getpid()) is None:
        return detached
    for loop in loop_devices():
        owner = owner_of(loop.backing.name)
        if owner is None or owner.state() is not State.DEAD:
            continue
        for point in sorted((m.point for m in mounts() if m.source == loop.device),
                            key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["losetup", "-d", loop.device], capture_output=True)
        with contextlib.suppress(OSError):
            loop.backing.unlink()
        detached.append(loop.device)
    return detached


# --- start-up -------------------------------------------------------------------------------


def reap_stale_all() -> None:
    """What killed runs left: the temp dir, the kernel cache's work dirs, loop devices.

    Called when a command or test run starts. Places with a configurable root
    (disk clones, host-mode cgroups) are swept by their creators before use.
    """
    from ktstr.paths import cache_root

    if os.geteuid() == 0:
        reap_stale_loops()  # first: a tree with a mount below is not removed
    reap_stale(tempfile.gettempdir())
    root = cache_root()
    for sub in ("sources", "initramfs"):
        reap_stale(root / sub)


# --- dying with the parent --------------------------------------------------------------------


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """In a child just forked from `parent`: get `sig` when it dies; exit now if it has.

    PR_SET_PDEATHSIG covers only a death after the call, and a parent that
    died between the fork and here has already handed us to init or a
    subreaper: so compare getppid() with the parent's pid (not with 1: in the
    guest the parent is PID 1 itself). The signal follows the *thread* that
    forked. Fit for a preexec_fn: prctl was resolved at import, what runs here
    is two system calls and maybe _exit.
    """
    _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(128 + sig)


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen: the child gets `sig` when this process dies."""
    return functools.partial(die_with_parent, os.getpid(), int(sig))
