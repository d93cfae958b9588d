"""Monitor samples without drgn objects: offsets learnt once through drgn, then raw reads.

A drgn sample of every run queue costs tens of milliseconds of host CPU under emulation;
the same fields read with ``struct`` from guest RAM at offsets drgn computed once cost
microseconds. Per-CPU run queues and tasks live in the kernel image or the direct map,
whose guest-physical addresses are a subtraction away; a pointer anywhere else (or
outside RAM) makes the sample fail and the monitor fall back to drgn for it.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ktstr.observe.kimage import START_KERNEL_MAP, KernelImage
from ktstr.observe.state import MAX_TASKS, CpuSample

if TYPE_CHECKING:
    import drgn

    from ktstr.observe.program import GuestRam

DIRECT_MAP_SPAN = 1 << 46
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RawReadError(Exception):
    """A pointer the fast path cannot translate, or one outside guest RAM."""


@dataclass(frozen=True)
class RawStall:
    pid: int
    comm: str
    cpu: int
    age_jiffies: int
    ops_state: int
    dsq_id: int | None


def _off(prog: drgn.Program, type_name: str, member: str) -> int:
    from drgn import offsetof

    return int(offsetof(prog.type(type_name), member))


class RawReader:
    """Run-queue and runnable-list reads at fixed offsets (built by :meth:`build`)."""

    def __init__(self, mem: GuestRam, image: KernelImage, rq_addrs: dict[int, int],
                 offsets: dict[str, int], classes: dict[int, str], jiffies_addr: int,
                 *, hz: int, watchdog_addr: int | None = None) -> None:
        self.hz = hz
        self.watchdog_addr = watchdog_addr
        self.mem = mem
        self.image = image
        self.rq_addrs = rq_addrs
        self.o = offsets
        self.classes = classes
        self.jiffies_addr = jiffies_addr

    @classmethod
    def build(cls, prog: drgn.Program, mem: GuestRam, image: KernelImage,
              cpus: list[int], *, hz: int) -> RawReader:
        from drgn.helpers.linux.percpu import per_cpu_ptr

        from ktstr.observe.state import _class_names

        rq_addrs = {cpu: int(per_cpu_ptr(prog["runqueues"].address_of_(), cpu)) for cpu in cpus}
        o = {
            "nr_running": _off(prog, "struct rq", "nr_running"),
            "clock": _off(prog, "struct rq", "clock"),
            "curr": _off(prog, "struct rq", "curr"),
            "pid": _off(prog, "struct task_struct", "pid"),
            "comm": _off(prog, "struct task_struct", "comm"),
            "sched_class": _off(prog, "struct task_struct", "sched_class"),
        }
        with contextlib.suppress(LookupError):  # a kernel without sched_ext
            o.update({
                "scx_nr_running": _off(prog, "struct rq", "scx.nr_running"),
                "local_dsq_nr": _off(prog, "struct rq", "scx.local_dsq.nr"),
                "runnable_list": _off(prog, "struct rq", "scx.runnable_list"),
                "runnable_node": _off(prog, "struct task_struct", "scx.runnable_node"),
                "runnable_at": _off(prog, "struct task_struct", "scx.runnable_at"),
                "ops_state": _off(prog, "struct task_struct", "scx.ops_state"),
                "dsq": _off(prog, "struct task_struct", "scx.dsq"),
                "dsq_id": _off(prog, "struct scx_dispatch_q", "id"),
            })
        watchdog = None
        with contextlib.suppress(LookupError):
            watchdog = int(prog["scx_watchdog_timeout"].address_ or 0) or None
        return cls(mem, image, rq_addrs, o, _class_names(prog),
                   int(prog["jiffies"].address_ or 0), hz=hz, watchdog_addr=watchdog)

    def phys(self, vaddr: int) -> int:
        if vaddr >= START_KERNEL_MAP:
            return vaddr - START_KERNEL_MAP + self.image.phys_base
        delta = vaddr - self.image.page_offset
        if 0 <= delta < DIRECT_MAP_SPAN:
            return delta
        raise RawReadError(f"0x{vaddr:x} is neither kernel image nor direct map")

    def _read(self, vaddr: int, n: int) -> bytes:
        try:
            return self.mem.read(self.phys(vaddr), n)
        except RawReadError:
            raise
        except Exception as err:  # GuestMemoryError: outside guest RAM
            raise RawReadError(str(err)) from None

    def u32(self, vaddr: int) -> int:
        return int(_U32.unpack(self._read(vaddr, 4))[0])

    def u64(self, vaddr: int) -> int:
        return int(_U64.unpack(self._read(vaddr, 8))[0])

    def comm(self, task: int) -> str:
        return self._read(task + self.o["comm"], 16).split(b"\0", 1)[0].decode(errors="replace")

    def watchdog_timeout(self) -> int:
        """sched_ext's watchdog timeout in jiffies (0: none set)."""
        return self.u64(self.watchdog_addr) if self.watchdog_addr else 0

    def jiffies(self) -> int:
        return self.u64(self.jiffies_addr)

    def cpus(self) -> tuple[CpuSample, ...]:
        o = self.o
        out = []
        for cpu, rq in self.rq_addrs.items():
            curr = self.u64(rq + o["curr"])
            out.append(CpuSample(
                cpu=cpu, nr_running=self.u32(rq + o["nr_running"]),
                scx_nr_running=self.u32(rq + o["scx_nr_running"]) if "scx_nr_running" in o else 0,
                clock_ns=self.u64(rq + o["clock"]),
                local_dsq_nr=self.u32(rq + o["local_dsq_nr"]) if "local_dsq_nr" in o else 0,
                curr_pid=self.u32(curr + o["pid"]), curr_comm=self.comm(curr),
                curr_class=self.classes.get(self.u64(curr + o["sched_class"]), "?")))
        return tuple(out)

    def stalls(self, min_age_jiffies: int) -> list[RawStall]:
        """Tasks on a CPU's sched_ext runnable list, not running, for ``min_age_jiffies``+."""
        o = self.o
        if "runnable_list" not in o:
            return []
        now = self.jiffies()
        out = []
        for cpu, rq in self.rq_addrs.items():
            head = rq + o["runnable_list"]
            curr = self.u64(rq + o["curr"])
            node = self.u64(head)
            for _ in range(MAX_TASKS):
                if node == head or node == 0:
                    break
                task = node - o["runnable_node"]
                age = (now - self.u64(task + o["runnable_at"])) & (2**64 - 1)
                if task != curr and min_age_jiffies <= age < 2**63:
                    dsq = self.u64(task + o["dsq"])
                    out.append(RawStall(
                        pid=self.u32(task + o["pid"]), comm=self.comm(task), cpu=cpu,
                        age_jiffies=age, ops_state=self.u64(task + o["ops_state"]) & 0x3,
                        dsq_id=self.u64(dsq + o["dsq_id"]) if dsq else None))
                node = self.u64(node)
        return out
