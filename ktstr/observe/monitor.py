"""The observer of one VM run: a host thread that watches the guest kernel through drgn.

:class:`GuestObserver` is the VMM's ``RunObserver``. Once the kernel image is in place
it opens drgn (:func:`ktstr.observe.program.open_program`), then every ``interval_s``
samples each CPU's run queue and the sched_ext state, and every ``exit_poll_s`` reads
the kernel's ``scx_exit_kind`` word straight from RAM: when a scheduler starts to exit
with an error, it pauses the vCPUs, takes a full snapshot (tasks, DSQs, the exit info
with its backtrace, which the kernel frees once the disable finishes) and resumes them.
When the run ends it snapshots the frozen guest and keeps RAM open so that a failing
test can write a vmcore (:meth:`Observation.write_vmcore`). It never raises into the
run: whatever goes wrong becomes one line in :attr:`Observation.problems`.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ktstr.observe import state
from ktstr.observe.fastpath import RawReader, RawReadError
from ktstr.observe.kimage import KernelImage, ObserveError, kernel_phys, read_symbols
from ktstr.observe.program import GuestProgram, GuestRam, KernelFiles, open_program

if TYPE_CHECKING:
    from pathlib import Path

    from ktstr.observe.vmcore import VmcoreStats
    from ktstr.vmm.machine import Machine

DEFAULT_INTERVAL_S = 0.1
EXIT_POLL_S = 0.005
MAX_SAMPLES = 3000
"""Samples kept (the last ones): 5 minutes at the default interval."""
OPEN_RETRY_S = 0.25
OPEN_DEADLINE_S = 120.0
SCX_EXIT_ERROR = 1024
"""``enum scx_exit_kind``: kinds from here on are errors (``SCX_EXIT_ERROR``...)."""
MAX_STALLS = 64
SCX_OPS_ENABLED = 1


@dataclass(frozen=True)
class Sample:
    """One monitor sample: host seconds since the vCPUs started, and every CPU."""

    t: float
    cpus: tuple[state.CpuSample, ...]
    host_run_ns: tuple[int, ...] = ()
    """Per vCPU thread, host CPU time so far (``/proc/self/task/TID/schedstat``)."""
    scx_enabled: bool = False


@dataclass(frozen=True)
class StallCandidate:
    """A task sched_ext held runnable without running it, at its longest seen."""

    pid: int
    comm: str
    cpu: int
    dsq: str | None
    ops_state: str
    runnable_age_ms: float
    watchdog_timeout_ms: float | None
    t: float


@dataclass
class Observation:
    """What the observer saw of one run (``GuestRun.observation``)."""

    problems: list[str] = field(default_factory=list)
    open_s: float | None = None
    image: KernelImage | None = None
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    sample_cost_s: list[float] = field(default_factory=list)
    stalls: dict[int, StallCandidate] = field(default_factory=dict)
    exit_snapshot: state.Snapshot | None = None
    """The guest at the moment its sched_ext scheduler began an error exit."""
    exit_pause_s: float | None = None
    final: state.Snapshot | None = None
    """The frozen guest after the run."""
    memory: GuestRam | None = None
    """Guest RAM, kept open after the run for :meth:`write_vmcore` until :meth:`close`."""
    vmlinux: Path | None = None
    """The debug info the observer used (what opens :meth:`write_vmcore`'s core)."""
    dump_paths: dict[str, str] = field(default_factory=dict)
    """The failure dump's files (:func:`ktstr.observe.dump.write_dump`), by name."""

    def note(self, text: str) -> None:
        if len(self.problems) < 20 and text not in self.problems:
            self.problems.append(text)

    def write_vmcore(self, path: Path) -> VmcoreStats:
        """An ELF vmcore of guest RAM that ``drgn -c`` and ``crash`` open."""
        from ktstr.observe.vmcore import write_vmcore

        if self.memory is None or self.image is None:
            raise ObserveError("no guest RAM to write (the observer never opened the guest)")
        return write_vmcore(path, self.memory, self.image.vmcoreinfo(),
                            page_offset=self.image.page_offset)

    def close(self) -> None:
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()  # type: ignore[attr-defined]

    def cost_summary(self) -> dict[str, float]:
        costs = sorted(self.sample_cost_s)
        if not costs:
            return {}
        p99 = costs[min(len(costs) - 1, int(len(costs) * 0.99))]
        return {"samples": len(costs), "median_ms": round(statistics.median(costs) * 1e3, 3),
                "p99_ms": round(p99 * 1e3, 3)}

    def to_record(self) -> dict[str, Any]:
        """The sidecar's ``observer``: compact samples (columns per CPU) and findings."""
        cpus: dict[str, dict[str, list[int]]] = {}
        times = []
        for s in self.samples:
            times.append(round(s.t, 3))
            for c in s.cpus:
                col = cpus.setdefault(str(c.cpu), {"nr_running": [], "scx_nr_running": [],
                                                   "local_dsq_nr": []})
                col["nr_running"].append(c.nr_running)
                col["scx_nr_running"].append(c.scx_nr_running)
                col["local_dsq_nr"].append(c.local_dsq_nr)
        return {
            "problems": self.problems,
            "open_s": round(self.open_s, 3) if self.open_s is not None else None,
            "sample_cost": self.cost_summary(),
            "samples": {"t": times, "cpus": cpus},
            "stalls": [vars(s) for s in sorted(self.stalls.values(),
                                               key=lambda s: -s.runnable_age_ms)],
            "exit_pause_s": self.exit_pause_s,
            "dump": self.dump_paths,
        }


def _host_run_ns(tids: list[int]) -> tuple[int, ...]:
    out = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                out.append(int(fh.read().split()[0]))
        except (OSError, ValueError, IndexError):
            out.append(-1)
    return tuple(out)


class GuestObserver:
    """A ``RunObserver`` (:mod:`ktstr.vmm.machine`) that fills an :class:`Observation`."""

    def __init__(self, files: KernelFiles, *, interval_s: float = DEFAULT_INTERVAL_S,
                 exit_poll_s: float = EXIT_POLL_S, hz: int | None = None) -> None:
        if not interval_s > 0 or not exit_poll_s > 0:
            raise ValueError("observer intervals must be positive")
        self.files = files
        self.interval_s = interval_s
        self.exit_poll_s = min(exit_poll_s, interval_s)
        self.hz = hz
        self.observation = Observation()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guest: GuestProgram | None = None
        self._machine: Machine | None = None

    # --- RunObserver ---

    def started(self, machine: Machine) -> None:
        self._machine = machine
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="ktstr-observer", daemon=True)
        self._thread.start()

    def stopped(self, machine: Machine) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                self.observation.note("the observer thread did not stop within 30 s")
                return False
        obs = self.observation
        if self._guest is None:
            return False
        try:
            obs.final = state.snapshot(self._guest.prog)
        except Exception as err:
            obs.note(f"final snapshot: {type(err).__name__}: {err}")
        obs.memory = machine.memory
        return machine.memory is not None

    # --- the thread ---

    def _main(self) -> None:
        try:
            guest = self._open()
            if guest is not None:
                self._watch(guest)
        except Exception as err:  # never into the VM: the run goes on without us
            self.observation.note(f"observer: {type(err).__name__}: {err}")

    def _open(self) -> GuestProgram | None:
        machine = self._machine
        assert machine is not None and machine.memory is not None
        obs = self.observation
        try:
            self.files.check()
            symbols = read_symbols(self.files.system_map)
        except ObserveError as err:
            obs.note(str(err))
            return None
        banner = kernel_phys(symbols["linux_banner"])
        deadline = time.monotonic() + OPEN_DEADLINE_S
        last = ""
        while not self._stop.wait(OPEN_RETRY_S):
            # Cheap test first: the decompressed image's banner in place.
            if not machine.memory.contains(banner, 16) or \
                    machine.memory.read(banner, 14) != b"Linux version ":
                if time.monotonic() > deadline:
                    obs.note("the guest kernel never appeared in RAM")
                    return None
                continue
            try:
                guest = open_program(machine.memory, self.files)
            except ObserveError as err:
                last = str(err)
                if time.monotonic() > deadline or "build id" in last or "drgn" in last:
                    obs.note(last)
                    return None
                continue
            guest.prog.cache["ktstr_hz"] = self.hz or self.files.hz()
            obs.open_s, obs.image, obs.vmlinux = guest.open_s, guest.image, self.files.vmlinux
            self._guest = guest
            return guest
        return None

    def _watch(self, guest: GuestProgram) -> None:
        prog = guest.prog
        machine = self._machine
        assert machine is not None and machine.memory is not None
        mem = machine.memory
        exit_kind_at = None
        if state.has_sched_ext(prog):
            exit_kind_at = kernel_phys(int(prog["scx_exit_kind"].address_ or 0),
                                       guest.image.phys_base)
        tids = [v.thread.native_id for v in machine.vcpus
                if v.thread is not None and v.thread.native_id is not None]
        raw = RawReader.build(prog, mem, guest.image, state.online_cpus(prog),
                              hz=state.kernel_hz(prog))
        enable_at = None
        if exit_kind_at is not None:
            enable_at = kernel_phys(int(prog["scx_ops_enable_state_var"].address_ or 0),
                                    guest.image.phys_base)
        last_kind = 1  # SCX_EXIT_DONE: nothing attached yet
        next_sample = time.monotonic()
        while not self._stop.wait(self.exit_poll_s):
            enabled = False
            if exit_kind_at is not None and enable_at is not None:
                kind = int.from_bytes(mem.read(exit_kind_at, 4), "little")
                if kind != last_kind and kind >= SCX_EXIT_ERROR:
                    self._capture_exit(machine, prog)
                last_kind = kind
                enabled = int.from_bytes(mem.read(enable_at, 4), "little") == SCX_OPS_ENABLED
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + self.interval_s
                self._sample(prog, raw, tids, now, enabled)

    def _sample(self, prog: Any, raw: RawReader, tids: list[int], now: float,
                scx_enabled: bool) -> None:
        obs = self.observation
        try:
            try:
                cpus = raw.cpus()
                if scx_enabled:
                    self._note_raw_stalls(prog, raw, now)
            except RawReadError:  # a pointer off the fast path: drgn translates it
                cpus = state.read_cpus(prog)
                scx = state.read_sched_ext(prog) if state.has_sched_ext(prog) else None
                if scx is not None and scx.enabled:
                    self._note_stalls(prog, scx, now)
        except Exception as err:  # drgn.FaultError: run queues not set up yet
            obs.note(f"sample: {type(err).__name__}: {err}")
            return
        obs.samples.append(Sample(t=now - self._start, cpus=cpus, host_run_ns=_host_run_ns(tids),
                                  scx_enabled=scx_enabled))
        obs.sample_cost_s.append(time.monotonic() - now)
        if len(obs.sample_cost_s) > MAX_SAMPLES:
            del obs.sample_cost_s[: MAX_SAMPLES // 2]

    def _note_raw_stalls(self, prog: Any, raw: RawReader, now: float) -> None:
        hz = raw.hz
        timeout = raw.watchdog_timeout()  # each time: a new scheduler may set another
        timeout_ms = timeout * 1000 / hz if timeout else None
        threshold = int((timeout_ms or 30000.0) / 2 * hz / 1000)
        for st in raw.stalls(threshold):
            self._record_stall(StallCandidate(
                pid=st.pid, comm=st.comm, cpu=st.cpu,
                dsq=None if st.dsq_id is None else f"0x{st.dsq_id:x}",
                ops_state=state._ops_state(prog, st.ops_state),
                runnable_age_ms=st.age_jiffies * 1000 / hz, watchdog_timeout_ms=timeout_ms,
                t=now - self._start))

    def _record_stall(self, cand: StallCandidate) -> None:
        stalls = self.observation.stalls
        known = stalls.get(cand.pid)
        if known is not None and known.runnable_age_ms >= cand.runnable_age_ms:
            return
        if known is None and len(stalls) >= MAX_STALLS:
            return
        stalls[cand.pid] = cand

    def _note_stalls(self, prog: Any, scx: state.SchedExt, now: float) -> None:
        """Tasks on a runnable list for longer than half the watchdog timeout."""
        from drgn.helpers.linux.list import list_for_each_entry
        from drgn.helpers.linux.percpu import per_cpu

        jiffies = int(prog["jiffies"])
        hz = state.kernel_hz(prog)
        threshold = (scx.watchdog_timeout_ms or 30000.0) / 2
        for cpu in state.online_cpus(prog):
            rq = per_cpu(prog["runqueues"], cpu)
            for n, task in enumerate(list_for_each_entry(
                    "struct task_struct", rq.scx.runnable_list.address_of_(),
                    "scx.runnable_node")):
                if n >= state.MAX_TASKS:
                    break
                if task.value_() == rq.curr.value_():
                    continue
                age = (jiffies - int(task.scx.runnable_at)) * 1000 / hz
                if age < threshold:
                    continue
                self._record_stall(StallCandidate(
                    pid=int(task.pid), comm=task.comm.string_().decode(errors="replace"), cpu=cpu,
                    dsq=None if not task.scx.dsq else f"0x{int(task.scx.dsq.id):x}",
                    ops_state=state._ops_state(prog, int(task.scx.ops_state.counter)),
                    runnable_age_ms=age, watchdog_timeout_ms=scx.watchdog_timeout_ms,
                    t=now - self._start))

    def _capture_exit(self, machine: Machine, prog: Any) -> None:
        obs = self.observation
        if obs.exit_snapshot is not None:
            return
        start = time.monotonic()
        paused = machine.pause()
        try:
            # The exit's reason and message are written just after the kind is claimed:
            # give a vCPU caught in between a moment to finish.
            for _ in range(20):
                snap = state.snapshot(prog)
                if snap.sched_ext is not None and snap.sched_ext.exit is not None:
                    break
                if paused:
                    machine.resume()
                time.sleep(0.001)
                paused = machine.pause()
            obs.exit_snapshot = snap
        finally:
            if paused:
                machine.resume()
            obs.exit_pause_s = round(time.monotonic() - start, 4)
        if not paused:
            obs.note("could not pause the vCPUs for the exit snapshot; it was taken live")
