"""Monitor samples without drgn: a per-kernel layout learnt once through drgn, then raw reads.

Opening drgn over a guest costs seconds of host CPU (its DWARF index), and under
emulation that time comes out of the guest's vCPUs while it boots. So drgn computes the
few struct offsets and addresses the monitor needs once per kernel build
(:class:`KernelLayout`, cached under ``<cache>/observe/<build-id>.json``), and every
later run samples run queues by ``struct`` reads of guest RAM at those offsets; drgn is
opened only when something needs it (an error exit, a watched map, a failure dump).
Per-CPU run queues and tasks live in the kernel image or the direct map, whose
guest-physical addresses are a subtraction away; any other pointer is a
:class:`RawReadError` and that sample is dropped.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ktstr.observe.kimage import START_KERNEL_MAP, KernelImage
from ktstr.observe.state import MAX_TASKS, SCHED_CLASSES, CpuSample

if TYPE_CHECKING:
    import drgn

    from ktstr.observe.program import GuestRam

LAYOUT_VERSION = 3
DIRECT_MAP_SPAN = 1 << 46
RQ_FIELDS = ("nr_running", "clock", "curr", "scx.nr_running", "scx.local_dsq.nr",
             "scx.runnable_list")
TASK_FIELDS = ("pid", "comm", "sched_class", "scx.runnable_node", "scx.runnable_at",
               "scx.ops_state", "scx.dsq")
SYMBOLS = ("runqueues", "__per_cpu_offset", "jiffies", "scx_exit_kind", "scx_exit_info",
           "scx_ops_enable_state_var", "scx_watchdog_timeout", "page_offset_base")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RawReadError(Exception):
    """A pointer the fast path cannot translate, or one outside guest RAM."""


@dataclass(frozen=True)
class KernelLayout:
    """What the raw reader needs of one kernel build: offsets and addresses."""

    build_id: str
    rq: dict[str, int]
    task: dict[str, int]
    dsq_id: int | None
    symbols: dict[str, int]
    exit_kind: int | None = None
    """Offset of ``kind`` in ``struct scx_exit_info``."""
    classes: dict[str, int] = field(default_factory=dict)
    """Sched class name -> address of its ``*_sched_class``."""
    version: int = LAYOUT_VERSION

    @property
    def sched_ext(self) -> bool:
        return "scx.runnable_list" in self.rq and "scx_exit_info" in self.symbols \
            and self.exit_kind is not None


def _offset(prog: drgn.Program, type_name: str, member: str) -> int | None:
    from drgn import offsetof

    try:
        return int(offsetof(prog.type(type_name), member))
    except LookupError:
        return None


def layout_from_program(prog: drgn.Program, build_id: bytes | None) -> KernelLayout:
    rq = {f: o for f in RQ_FIELDS if (o := _offset(prog, "struct rq", f)) is not None}
    task = {f: o for f in TASK_FIELDS
            if (o := _offset(prog, "struct task_struct", f)) is not None}
    symbols = {}
    for name in SYMBOLS:
        with contextlib.suppress(LookupError):
            symbols[name] = int(prog[name].address_ or 0)
    classes = {}
    for name in SCHED_CLASSES:
        with contextlib.suppress(LookupError):
            classes[name] = int(prog[f"{name}_sched_class"].address_ or 0)
    return KernelLayout(build_id=build_id.hex() if build_id else "", rq=rq, task=task,
                        dsq_id=_offset(prog, "struct scx_dispatch_q", "id"),
                        symbols=symbols, classes=classes,
                        exit_kind=_offset(prog, "struct scx_exit_info", "kind"))


def layout_path(root: Path, build_id: bytes) -> Path:
    return root / "observe" / f"{build_id.hex()}.json"


def load_layout(root: Path, build_id: bytes | None) -> KernelLayout | None:
    """The cached layout of this build, or None (absent, unreadable, another version)."""
    if not build_id:
        return None
    try:
        data = json.loads(layout_path(root, build_id).read_text())
        layout = KernelLayout(**data)
    except (OSError, ValueError, TypeError):
        return None
    required = ("nr_running", "clock", "curr")
    if layout.version != LAYOUT_VERSION or layout.build_id != build_id.hex() or \
            not all(isinstance(layout.rq.get(k), int) for k in required) or \
            not all(isinstance(v, int) for v in (*layout.task.values(),
                                                 *layout.symbols.values())):
        return None
    return layout


def save_layout(root: Path, layout: KernelLayout) -> None:
    """Write atomically (``kernel.cache.write_json_atomic``: a half-written layout is never
    read under its name); failure to write is fine, the next run learns it again."""
    from ktstr.kernel.cache import write_json_atomic

    if not layout.build_id:
        return
    path = layout_path(root, bytes.fromhex(layout.build_id))
    with contextlib.suppress(OSError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(layout))


@dataclass(frozen=True)
class RawStall:
    pid: int
    comm: str
    cpu: int
    age_jiffies: int
    ops_state: int
    dsq_id: int | None


class RawReader:
    """Run-queue and runnable-list reads at a :class:`KernelLayout`'s offsets."""

    def __init__(self, mem: GuestRam, image: KernelImage, layout: KernelLayout,
                 ncpus: int, *, hz: int) -> None:
        self.mem = mem
        self.image = image
        self.layout = layout
        self.hz = hz
        self.rq_off = layout.rq
        self.task_off = layout.task
        self.classes = {addr: name for name, addr in layout.classes.items()}
        self.rq_span = max(self.rq_off.values()) + 16
        self.task_lo = min(self.task_off.get(k, 1 << 30) for k in ("pid", "comm", "sched_class"))
        self.task_hi = max(self.task_off.get(k, 0) for k in ("pid", "comm", "sched_class")) + 16
        self.ncpus = ncpus
        self.rq_addrs: dict[int, int] = {}
        self.page_offset = image.page_offset

    def _locate_rqs(self) -> None:
        """Per-CPU run queues: ``runqueues`` plus each CPU's ``__per_cpu_offset``, which
        early boot has not filled in yet (then: not ready, ask again next sample)."""
        sym = self.layout.symbols
        if "page_offset_base" in sym:
            # Early boot still holds the 4-level default; a 5-level guest changes it.
            self.page_offset = self.u64(sym["page_offset_base"]) or self.page_offset
        offsets = [self.u64(sym["__per_cpu_offset"] + 8 * cpu) for cpu in range(self.ncpus)]
        if self.ncpus > 1 and not all(offsets[1:]):
            raise RawReadError("per-CPU areas are not set up yet")
        self.rq_addrs = {cpu: (sym["runqueues"] + off) & (2**64 - 1)
                         for cpu, off in enumerate(offsets)}

    def phys(self, vaddr: int) -> int:
        if vaddr >= START_KERNEL_MAP:
            return vaddr - START_KERNEL_MAP + self.image.phys_base
        delta = vaddr - self.page_offset
        if 0 <= delta < DIRECT_MAP_SPAN:
            return delta
        self.rq_addrs = {}  # look again (and at page_offset_base) next time
        raise RawReadError(f"0x{vaddr:x} is neither kernel image nor direct map")

    def read(self, vaddr: int, n: int) -> bytes:
        try:
            return self.mem.read(self.phys(vaddr), n)
        except RawReadError:
            raise
        except Exception as err:  # GuestMemoryError: outside guest RAM
            raise RawReadError(str(err)) from None

    def u32(self, vaddr: int) -> int:
        return int(_U32.unpack(self.read(vaddr, 4))[0])

    def u64(self, vaddr: int) -> int:
        return int(_U64.unpack(self.read(vaddr, 8))[0])

    def _comm(self, raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def jiffies(self) -> int:
        return self.u64(self.layout.symbols["jiffies"])

    def symbol_u32(self, name: str) -> int | None:
        addr = self.layout.symbols.get(name)
        return self.u32(addr) if addr else None

    def exit_kind(self) -> int:
        """The kind of the sched_ext exit under way (``scx_exit_info->kind``; 0: none).
        The kernel keeps it from the error's claim until the disable has finished, unlike
        ``scx_exit_kind``, which the disable work resets at once."""
        addr = self.layout.symbols.get("scx_exit_info")
        if not addr or self.layout.exit_kind is None:
            return 0
        info = self.u64(addr)
        return self.u32(info + self.layout.exit_kind) if info else 0

    def watchdog_timeout(self) -> int:
        """sched_ext's watchdog timeout in jiffies (0: none set)."""
        addr = self.layout.symbols.get("scx_watchdog_timeout")
        return self.u64(addr) if addr else 0

    def cpus(self) -> tuple[CpuSample, ...]:
        """Every CPU's run queue: one read of the run queue, one of its current task."""
        o, t = self.rq_off, self.task_off
        lo = self.task_lo
        if not self.rq_addrs:
            self._locate_rqs()
        out = []
        for cpu, rq_addr in self.rq_addrs.items():
            rq = self.read(rq_addr, self.rq_span)
            curr = _U64.unpack_from(rq, o["curr"])[0]
            if not curr:
                self.rq_addrs = {}
                raise RawReadError(f"CPU {cpu}'s run queue has no current task yet")
            task = self.read(curr + lo, self.task_hi - lo)
            out.append(CpuSample(
                cpu=cpu, nr_running=_U32.unpack_from(rq, o["nr_running"])[0],
                scx_nr_running=_U32.unpack_from(rq, o["scx.nr_running"])[0]
                if "scx.nr_running" in o else 0,
                clock_ns=_U64.unpack_from(rq, o["clock"])[0],
                local_dsq_nr=_U32.unpack_from(rq, o["scx.local_dsq.nr"])[0]
                if "scx.local_dsq.nr" in o else 0,
                curr_pid=_U32.unpack_from(task, t["pid"] - lo)[0],
                curr_comm=self._comm(task[t["comm"] - lo:t["comm"] - lo + 16]),
                curr_class=self.classes.get(_U64.unpack_from(task, t["sched_class"] - lo)[0],
                                            "?")))
        return tuple(out)

    def stalls(self, min_age_jiffies: int) -> list[RawStall]:
        """Tasks on a CPU's sched_ext runnable list, not running, for ``min_age_jiffies``+."""
        o, t = self.rq_off, self.task_off
        if not self.layout.sched_ext or "scx.runnable_node" not in t:
            return []
        now = self.jiffies()
        out = []
        if not self.rq_addrs:
            self._locate_rqs()
        for cpu, rq in self.rq_addrs.items():
            head = rq + o["scx.runnable_list"]
            curr = self.u64(rq + o["curr"])
            node = self.u64(head)
            for _ in range(MAX_TASKS):
                if node == head or node == 0:
                    break
                task = node - t["scx.runnable_node"]
                age = (now - self.u64(task + t["scx.runnable_at"])) & (2**64 - 1)
                if task != curr and min_age_jiffies <= age < 2**63:
                    dsq = self.u64(task + t["scx.dsq"])
                    out.append(RawStall(
                        pid=self.u32(task + t["pid"]),
                        comm=self._comm(self.read(task + t["comm"], 16)), cpu=cpu,
                        age_jiffies=age, ops_state=self.u64(task + t["scx.ops_state"]) & 0x3,
                        dsq_id=self.u64(dsq + self.layout.dsq_id)
                        if dsq and self.layout.dsq_id is not None else None))
                node = self.u64(node)
        return out
