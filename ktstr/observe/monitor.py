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

import contextlib
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ktstr.bzimage import read_kernel_version
from ktstr.observe import state
from ktstr.observe.bpf import BpfMapInfo, BpfProgInfo, BpfState, read_bpf, read_maps, read_progs
from ktstr.observe.fastpath import (
    RawReader,
    RawReadError,
    layout_from_program,
    load_layout,
    save_layout,
)
from ktstr.observe.kimage import (
    KernelImage,
    ObserveError,
    banner_mismatch,
    kernel_phys,
    locate,
    read_symbols,
    vmlinux_banner,
    vmlinux_build_id,
)
from ktstr.observe.program import GuestProgram, GuestRam, KernelFiles, open_program
from ktstr.paths import cache_root
from ktstr.vmm.threadtime import thread_time

if TYPE_CHECKING:
    from pathlib import Path

    from ktstr.observe.vmcore import VmcoreStats
    from ktstr.vmm.machine import Machine
    from ktstr.vmm.vcpu import VcpuRegs

DEFAULT_INTERVAL_S = 0.1
CPU_BUDGET = 0.02
"""Of one host CPU, what the observer's sampling and polling may take between them."""
MAX_INTERVAL_S = 1.0
EXIT_POLL_S = 0.005
MAX_SAMPLES = 3000
"""Samples kept (the last ones): 5 minutes at the default interval."""
OPEN_RETRY_S = 0.25
OPEN_DEADLINE_S = 120.0
SCX_EXIT_ERROR = 1024
"""``enum scx_exit_kind``: kinds from here on are errors (``SCX_EXIT_ERROR``...)."""
MAX_STALLS = 64
MAPS_EVERY_S = 1.0
"""Watched maps are read this often (drgn, so not at every sample)."""
MAX_MAP_SAMPLES = 600
PROGS_EVERY_S = 5.0
SCX_OPS_ENABLED = 1
OPS_STATES = {0: "SCX_OPSS_NONE", 1: "SCX_OPSS_QUEUEING", 2: "SCX_OPSS_QUEUED",
              3: "SCX_OPSS_DISPATCHING"}
"""``enum scx_ops_state`` (the low bits of ``p->scx.ops_state``)."""


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


@dataclass(frozen=True)
class MapSample:
    """The watched BPF maps at one moment (host seconds since the vCPUs started)."""

    t: float
    maps: tuple[BpfMapInfo, ...]


@dataclass
class ObserverCost:
    """What the observer thread took from the host over a run: what it can take from
    the guest. Its CPU time competes with the vCPU threads for host CPUs; its busy time
    (awake, whether on a CPU or not) bounds how long it held the GIL, which a vCPU
    thread needs to handle each exit."""

    life_s: float = 0.0
    """Wall time from the thread's start to its stop."""
    cpu_s: float | None = None
    """The thread's own host CPU time (schedstat), None where the host has none."""
    busy_s: float = 0.0
    """Wall time the thread was not asleep between samples."""
    vcpu_cpu_s: float | None = None
    """The vCPU threads' host CPU time while the observer sampled."""

    def record(self) -> dict[str, float | None]:
        def pct(part: float | None, whole: float | None) -> float | None:
            return round(100 * part / whole, 3) if part is not None and whole else None
        return {"life_s": round(self.life_s, 3),
                "cpu_s": round(self.cpu_s, 4) if self.cpu_s is not None else None,
                "busy_s": round(self.busy_s, 4),
                "vcpu_cpu_s": (round(self.vcpu_cpu_s, 3) if self.vcpu_cpu_s is not None
                               else None),
                "cpu_pct": pct(self.cpu_s, self.life_s),
                "busy_pct": pct(self.busy_s, self.life_s),
                "cpu_pct_of_vcpus": pct(self.cpu_s, self.vcpu_cpu_s)}


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
    exit_bpf: BpfState | None = None
    """The scheduler's BPF programs and maps at its error exit (before they are freed)."""
    bpf: BpfState | None = None
    """The BPF programs and maps left in the frozen guest after the run."""
    progs: tuple[BpfProgInfo, ...] = ()
    """The scheduler's BPF programs, last read while it was attached (every 5 s)."""
    map_samples: deque[MapSample] = field(default_factory=lambda: deque(maxlen=MAX_MAP_SAMPLES))
    """The watched maps (``GuestObserver(watch_maps=)``) over the run."""
    final: state.Snapshot | None = None
    """The frozen guest after the run."""
    memory: GuestRam | None = None
    """Guest RAM, kept open after the run for :meth:`write_vmcore` until :meth:`close`."""
    vmlinux: Path | None = None
    """The debug info the observer used (what opens :meth:`write_vmcore`'s core)."""
    dump_paths: dict[str, str] = field(default_factory=dict)
    """The failure dump's files (:func:`ktstr.observe.dump.write_dump`), by name."""
    opener: Callable[[], GuestProgram | None] | None = field(default=None, repr=False,
                                                              compare=False)
    """Opens drgn over the kept RAM on demand (the frozen guest's snapshot)."""
    layout_s: float | None = None
    """Seconds to find the kernel and its layout (drgn only on a layout-cache miss)."""
    interval_s: float | None = None
    """The sampling interval the CPU budget allowed, at the end of the run."""
    poll_s: float | None = None
    """The exit-poll interval while a scheduler was attached, at the end."""
    cost: ObserverCost = field(default_factory=ObserverCost)

    vcpu_regs: list[VcpuRegs] = field(default_factory=list)
    """Every vCPU's registers when the run ended hung or timed out."""
    vcpu_stacks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Per vCPU of :attr:`vcpu_regs`: where it was in the kernel (empty in user mode)."""

    def final_snapshot(self) -> state.Snapshot | None:
        """The frozen guest after the run, read with drgn on first use (while RAM is
        kept: before :meth:`close`); also fills :attr:`bpf`."""
        if self.final is None and self.memory is not None and self.opener is not None:
            opener, self.opener = self.opener, None
            try:
                guest = opener()
                if guest is not None:
                    self.final = state.snapshot(guest.prog)
                    self.bpf = read_bpf(guest.prog)
                    self.vcpu_stacks = {r.index: state.vcpu_stack(guest.prog, r)
                                        for r in self.vcpu_regs}
            except Exception as err:
                self.note(f"final snapshot: {type(err).__name__}: {err}")
        return self.final

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
            memory.close()

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
            "layout_s": round(self.layout_s, 3) if self.layout_s is not None else None,
            "interval_s": round(self.interval_s, 4) if self.interval_s is not None else None,
            "poll_s": round(self.poll_s, 4) if self.poll_s is not None else None,
            "sample_cost": self.cost_summary(),
            "cost": self.cost.record(),
            "samples": {"t": times, "cpus": cpus},
            "stalls": [vars(s) for s in sorted(self.stalls.values(),
                                               key=lambda s: -s.runnable_age_ms)],
            "exit_pause_s": self.exit_pause_s,
            "bpf_progs": [asdict(p) for p in self.progs],
            "bpf_maps": [{"t": round(s.t, 3), "maps": [asdict(m) for m in s.maps]}
                         for s in self.map_samples],
            "dump": self.dump_paths,
        }


def watched(name: str, patterns: Sequence[str]) -> bool:
    """A map the test watches: its name, or a suffix of it (``".bss"``: libbpf prefixes
    internal maps with a truncated object name)."""
    return any(name == p or (p.startswith(".") and name.endswith(p)) for p in patterns)


def _host_run_ns(tids: list[int]) -> tuple[int, ...]:
    return tuple(t.run_ns if (t := thread_time(tid)) is not None else -1 for tid in tids)


class GuestObserver:
    """A ``RunObserver`` (:mod:`ktstr.vmm.machine`) that fills an :class:`Observation`.

    drgn is opened only when needed: once per kernel build to learn its layout
    (:mod:`ktstr.observe.fastpath`, cached), for watched maps once a scheduler attaches,
    with the vCPUs paused at an error exit, and for the frozen guest's snapshot."""

    def __init__(self, files: KernelFiles, *, interval_s: float = DEFAULT_INTERVAL_S,
                 exit_poll_s: float = EXIT_POLL_S, hz: int | None = None,
                 watch_maps: Sequence[str] = (), layout_root: Path | None = None,
                 budget: float = CPU_BUDGET, kernel: Path | None = None) -> None:
        if not interval_s > 0 or not exit_poll_s > 0:
            raise ValueError("observer intervals must be positive")
        self.files = files
        self.kernel = kernel
        """The booted bzImage, checked against ``files`` before anything is read."""
        self.interval_s = interval_s
        self.exit_poll_s = min(exit_poll_s, interval_s)
        self.hz = hz or files.hz()
        self.watch_maps = tuple(watch_maps)
        self.layout_root = layout_root
        if not 0 < budget <= 1:
            raise ValueError("the observer's CPU budget is a fraction in (0, 1]")
        self.budget = budget
        self.effective_interval_s = interval_s
        self.observation = Observation()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guest: GuestProgram | None = None
        self._machine: Machine | None = None
        self._next_maps = self._next_progs = 0.0
        self._start = 0.0
        self._asleep_s = 0.0
        self._last_error = ""

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
        if not obs.samples and self._last_error:
            obs.note(f"no sample succeeded: {self._last_error}")
        if obs.image is None or machine.memory is None:
            return False
        obs.memory = machine.memory
        obs.vcpu_regs = list(machine.final_regs)
        obs.opener = self._program
        if self._guest is not None:  # drgn is open already: the snapshot is cheap
            obs.final_snapshot()
        return True

    # --- drgn, on demand ---

    def _program(self) -> GuestProgram | None:
        if self._guest is None:
            machine = self._machine
            assert machine is not None and machine.memory is not None
            try:
                guest = open_program(machine.memory, self.files)
            except ObserveError as err:
                self.observation.note(str(err))
                return None
            guest.prog.cache["ktstr_hz"] = self.hz
            self.observation.open_s = guest.open_s
            # Located again now: paging mode and direct map as the booted kernel set them.
            self.observation.image = guest.image
            self._guest = guest
        return self._guest

    # --- the thread ---

    def _main(self) -> None:
        cost = self.observation.cost
        began, cpu0 = time.monotonic(), thread_time()
        try:
            raw = self._locate()
            if raw is not None:
                self._watch(raw)
        except Exception as err:  # never into the VM: the run goes on without us
            self.observation.note(f"observer: {type(err).__name__}: {err}")
        finally:
            cost.life_s = time.monotonic() - began
            cost.busy_s = max(0.0, cost.life_s - self._asleep_s)
            cpu1 = thread_time()
            if cpu0 is not None and cpu1 is not None:
                cost.cpu_s = (cpu1.run_ns - cpu0.run_ns) / 1e9

    def _sleep(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds or until stopped (True); the wait is not busy time."""
        began = time.monotonic()
        try:
            return self._stop.wait(timeout)
        finally:
            self._asleep_s += time.monotonic() - began

    def _mismatch(self, symbols: dict[str, int]) -> str | None:
        """Why the debug files cannot describe the booted bzImage, before any guest read."""
        if self.kernel is None:
            return None
        why = banner_mismatch(vmlinux_banner(self.files.vmlinux, symbols["linux_banner"]),
                              read_kernel_version(self.kernel))
        if why is None:
            return None
        return (f"{self.files.vmlinux} is not the booted kernel ({why}); the run goes on "
                "without the observer")

    def _locate(self) -> RawReader | None:
        """Wait for the decompressed kernel, check it, and get its layout."""
        machine = self._machine
        assert machine is not None and machine.memory is not None
        mem = machine.memory
        obs = self.observation
        try:
            self.files.check()
            symbols = read_symbols(self.files.system_map)
            build_id = vmlinux_build_id(self.files.vmlinux)
            mismatch = self._mismatch(symbols)
        except ObserveError as err:
            obs.note(str(err))
            return None
        if mismatch is not None:
            obs.note(mismatch)
            return None
        banner = kernel_phys(symbols["linux_banner"])
        deadline = time.monotonic() + OPEN_DEADLINE_S
        while not self._sleep(OPEN_RETRY_S):
            # Cheap test first: the decompressed image's banner in place.
            if not mem.contains(banner, 16) or mem.read(banner, 14) != b"Linux version ":
                if time.monotonic() > deadline:
                    obs.note("the guest kernel never appeared in RAM")
                    return None
                continue
            start = time.monotonic()
            try:
                image = locate(mem, symbols, build_id)
            except ObserveError as err:
                if time.monotonic() > deadline or "build id" in str(err):
                    obs.note(str(err))
                    return None
                continue
            obs.image, obs.vmlinux = image, self.files.vmlinux
            root = self.layout_root or cache_root()
            layout = load_layout(root, build_id)
            if layout is None:  # the first run of this kernel build: ask drgn once
                guest = self._program()
                if guest is None:
                    return None
                layout = layout_from_program(guest.prog, build_id)
                save_layout(root, layout)
                # Opened this early, its paging mode may predate the kernel's own set-up:
                # whatever needs drgn later opens it afresh.
                self._guest = None
            obs.layout_s = time.monotonic() - start
            return RawReader(mem, image, layout, len(machine.vcpus), hz=self.hz)
        return None

    def _watch(self, raw: RawReader) -> None:
        """Sample until stopped, and count the vCPU threads' host CPU meanwhile (what the
        observer's own CPU time is set against)."""
        machine = self._machine
        assert machine is not None
        tids = [v.thread.native_id for v in machine.vcpus
                if v.thread is not None and v.thread.native_id is not None]
        before = _host_run_ns(tids)
        try:
            self._sample_until_stopped(raw, tids)
        finally:
            # At a stop the vCPU threads have often exited: their last sampled reading
            # stands in for a final one that can no longer be taken.
            samples = self.observation.samples
            last = samples[-1].host_run_ns if samples else before
            after = tuple(max(now, then) for now, then in
                          zip(_host_run_ns(tids), last, strict=True))
            ran = [b - a for a, b in zip(before, after, strict=True) if a >= 0 and b >= 0]
            self.observation.cost.vcpu_cpu_s = sum(ran) / 1e9 if ran else None

    def _sample_until_stopped(self, raw: RawReader, tids: list[int]) -> None:
        """Sample and poll within the CPU budget: each interval stretches so that its
        measured cost stays under ``budget`` of one host CPU (under emulation a sample costs
        milliseconds; on real hardware the defaults hold)."""
        machine = self._machine
        assert machine is not None
        sched_ext = raw.layout.sched_ext
        last_kind = 0
        now = time.monotonic()
        next_sample = next_poll = now
        enabled = False
        poll_cost = 0.0
        while True:
            # The fast exit poll only while a scheduler is attached.
            wake = min(next_sample, next_poll) if enabled else next_sample
            if self._sleep(max(0.0, wake - time.monotonic())):
                return
            now = time.monotonic()
            if sched_ext and (now >= next_poll or now >= next_sample):
                # scx_exit_kind shows the error from its claim until the disable work
                # starts (the moment to catch); scx_exit_info's kind until it ends.
                kind = max(raw.symbol_u32("scx_exit_kind") or 0, raw.exit_kind())
                if kind != last_kind and kind >= SCX_EXIT_ERROR:
                    self._capture_exit(machine, raw)
                last_kind = kind
                done = time.monotonic()
                poll_cost = 0.8 * poll_cost + 0.2 * (done - now)
                next_poll = done + max(self.exit_poll_s, poll_cost / (self.budget / 2))
            if now >= next_sample:
                if sched_ext:
                    enabled = raw.symbol_u32("scx_ops_enable_state_var") == SCX_OPS_ENABLED
                self._sample(raw, tids, now, enabled)
                cost = self.observation.sample_cost_s[-1:] or [0.0]
                self.effective_interval_s = min(MAX_INTERVAL_S, max(
                    self.interval_s, statistics.fmean(self.observation.sample_cost_s[-20:]
                                                      or cost) / (self.budget / 2)))
                next_sample = now + self.effective_interval_s
                self.observation.interval_s = self.effective_interval_s
                self.observation.poll_s = next_poll - now if enabled else None

    def _sample(self, raw: RawReader, tids: list[int], now: float, scx_enabled: bool) -> None:
        obs = self.observation
        try:
            cpus = raw.cpus()
            if scx_enabled:
                self._note_stalls(raw, now)
        except RawReadError as err:  # early boot: run queues not set up yet
            if obs.samples:
                obs.note(f"sample: {err}")
            self._last_error = str(err)
            return
        obs.samples.append(Sample(t=now - self._start, cpus=cpus, host_run_ns=_host_run_ns(tids),
                                  scx_enabled=scx_enabled))
        obs.sample_cost_s.append(time.monotonic() - now)
        if len(obs.sample_cost_s) > MAX_SAMPLES:
            del obs.sample_cost_s[: MAX_SAMPLES // 2]
        if self.watch_maps and len(obs.samples) == 1:
            # Watched maps need drgn, whose open costs seconds under emulation: open it
            # now (the run queues exist, so the kernel's paging is final), not when the
            # scheduler attaches, or a short run ends before its maps are ever read.
            self._program()
        if scx_enabled and self.watch_maps and now >= self._next_maps:
            self._next_maps = now + MAPS_EVERY_S
            guest = self._program()
            if guest is not None:
                # Programs first: cheap, and what a short run (the verifier's) needs.
                if now >= self._next_progs:
                    self._next_progs = now + PROGS_EVERY_S
                    try:
                        obs.progs = read_progs(guest.prog)
                    except Exception as err:  # being unloaded: keep the last, say why
                        obs.note(f"BPF programs: {type(err).__name__}: {err}")
                self._sample_maps(guest.prog, now)

    def _sample_maps(self, prog: Any, now: float) -> None:
        try:
            maps = list(read_maps(prog, keep=lambda name: watched(name, self.watch_maps)))
        except Exception as err:  # a map freed under us: next time
            self.observation.note(f"watched maps: {type(err).__name__}: {err}")
            return
        self.observation.map_samples.append(MapSample(t=now - self._start, maps=tuple(maps)))

    def _note_stalls(self, raw: RawReader, now: float) -> None:
        """Tasks on a runnable list for longer than half the watchdog timeout."""
        hz = raw.hz
        timeout = raw.watchdog_timeout()  # each time: a new scheduler may set another
        timeout_ms = timeout * 1000 / hz if timeout else None
        threshold = int((timeout_ms or 30000.0) / 2 * hz / 1000)
        for st in raw.stalls(threshold):
            self._record_stall(StallCandidate(
                pid=st.pid, comm=st.comm, cpu=st.cpu,
                dsq=None if st.dsq_id is None else f"0x{st.dsq_id:x}",
                ops_state=OPS_STATES.get(st.ops_state, str(st.ops_state)),
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

    def _capture_exit(self, machine: Machine, raw: RawReader) -> None:
        """The guest at its scheduler's error exit, with every vCPU held: the stalls by
        raw reads first, then drgn (opened now if need be) for the exit info and tasks."""
        obs = self.observation
        if obs.exit_snapshot is not None:
            return
        start = time.monotonic()
        paused = machine.pause()
        try:
            with contextlib.suppress(RawReadError):
                self._note_stalls(raw, start)
            guest = self._program()
            if guest is None:
                return
            prog = guest.prog
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
            obs.exit_bpf = read_bpf(prog)
            obs.progs = obs.exit_bpf.progs or obs.progs
        finally:
            if paused:
                machine.resume()
            obs.exit_pause_s = round(time.monotonic() - start, 4)
        if not paused:
            obs.note("could not pause the vCPUs for the exit snapshot; it was taken live")
