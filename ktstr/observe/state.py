"""The guest scheduler's state, read from guest RAM with drgn: one type per thing read.

Every reader takes an open ``drgn.Program`` (:mod:`ktstr.observe.program`) and returns
plain frozen dataclasses, so samples and dumps are JSON without drgn objects in them. A
guest that has not set up what is read yet (early boot: no run queues, sched_ext off)
gives empty or ``None`` fields, not exceptions; a read that faults raises
``drgn.FaultError`` to the caller, who records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import drgn

    from ktstr.vmm.vcpu import VcpuRegs

MAX_TASKS = 4096
"""Bound on the tasks walked per snapshot (a guest's task list is hostile data)."""
MAX_STACK = 32
SCX_DSQ_LOCAL = 1 << 63 | 2
SCHED_CLASSES = ("stop", "dl", "rt", "fair", "ext", "idle")


@dataclass(frozen=True)
class CpuSample:
    """One CPU's run queue at one moment."""

    cpu: int
    nr_running: int
    scx_nr_running: int
    clock_ns: int
    local_dsq_nr: int
    curr_pid: int
    curr_comm: str
    curr_class: str


@dataclass(frozen=True)
class ExitInfo:
    """``scx_exit_info``: why the sched_ext scheduler is leaving (while it is)."""

    kind: str
    exit_code: int
    reason: str
    message: str
    backtrace: tuple[str, ...]


@dataclass(frozen=True)
class SchedExt:
    """The kernel's sched_ext globals."""

    enable_state: str
    ops_name: str
    exit_kind: str
    bypass_depth: int
    switching_all: bool
    watchdog_timeout_ms: float | None
    nr_rejected: int
    exit: ExitInfo | None = None

    @property
    def enabled(self) -> bool:
        return self.enable_state == "SCX_OPS_ENABLED"


@dataclass(frozen=True)
class TaskState:
    """A runnable task and, under sched_ext, where the scheduler holds it."""

    pid: int
    comm: str
    cpu: int
    sched_class: str
    running: bool
    dsq: str | None
    """The DSQ it is queued on (``local:<cpu>``, ``global``, ``0x<id>``), None if on none."""
    ops_state: str
    scx_flags: int
    slice_ns: int
    weight: int
    runnable_age_ms: float | None
    """How long it has been runnable without running (sched_ext's ``runnable_at``)."""
    stack: tuple[str, ...] = ()


@dataclass(frozen=True)
class DsqState:
    id: str
    nr: int
    pids: tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything one look at the guest saw."""

    jiffies: int
    hz: int
    cpus: tuple[CpuSample, ...]
    sched_ext: SchedExt | None
    tasks: tuple[TaskState, ...] = ()
    dsqs: tuple[DsqState, ...] = ()
    problems: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_names(prog: drgn.Program) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in SCHED_CLASSES:
        try:
            out[int(prog[f"{name}_sched_class"].address_ or 0)] = name
        except LookupError:
            continue
    return out


def _enum_name(prog: drgn.Program, enum: str, value: int) -> str:
    try:
        for name, v in prog.type(f"enum {enum}").enumerators or ():
            if v == value:
                return name
    except LookupError:
        pass
    return str(value)


def _comm(task: drgn.Object) -> str:
    return task.comm.string_().decode(errors="replace")


def present_cpus(prog: drgn.Program) -> list[int]:
    """The present CPUs: a powering-off kernel takes the others offline, and the dump of
    a frozen guest still wants every run queue."""
    from drgn.helpers.linux.cpumask import for_each_present_cpu

    return list(for_each_present_cpu(prog))


def read_cpus(prog: drgn.Program, cpus: list[int] | None = None) -> tuple[CpuSample, ...]:
    from drgn.helpers.linux.percpu import per_cpu

    classes = _class_names(prog)
    out = []
    for cpu in present_cpus(prog) if cpus is None else cpus:
        rq = per_cpu(prog["runqueues"], cpu)
        curr = rq.curr
        scx = getattr(rq, "scx", None)
        out.append(CpuSample(
            cpu=cpu, nr_running=int(rq.nr_running),
            scx_nr_running=int(scx.nr_running) if scx is not None else 0,
            clock_ns=int(rq.clock),
            local_dsq_nr=int(scx.local_dsq.nr) if scx is not None else 0,
            curr_pid=int(curr.pid), curr_comm=_comm(curr),
            curr_class=classes.get(int(curr.sched_class), "?")))
    return tuple(out)


def has_sched_ext(prog: drgn.Program) -> bool:
    try:
        prog["scx_ops_enable_state_var"]
    except LookupError:
        return False
    return True


def read_exit_info(prog: drgn.Program) -> ExitInfo | None:
    ei = prog["scx_exit_info"]
    if not ei:
        return None
    kind = int(ei.kind)
    if kind == 0:  # SCX_EXIT_NONE: allocated, nothing happened yet
        return None
    backtrace = []
    jitted: list[tuple[int, int, str]] | None = None
    for i in range(min(int(ei.bt_len), MAX_STACK)):
        addr = int(ei.bt[i])
        try:
            sym = prog.symbol(addr)
            backtrace.append(f"{sym.name}+0x{addr - sym.address:x}")
            continue
        except LookupError:
            pass
        if jitted is None:
            jitted = _jitted_programs(prog)
        where = next((f"bpf_prog:{name}+0x{addr - start:x}" for start, size, name in jitted
                      if start <= addr < start + size), f"0x{addr:x}")
        backtrace.append(where)
    return ExitInfo(
        kind=_enum_name(prog, "scx_exit_kind", kind), exit_code=int(ei.exit_code),
        reason=ei.reason.string_().decode(errors="replace") if ei.reason else "",
        message=ei.msg.string_().decode(errors="replace") if ei.msg else "",
        backtrace=tuple(backtrace))


def _jitted_programs(prog: drgn.Program) -> list[tuple[int, int, str]]:
    """(start, size, name) of every JITed BPF program: the scheduler's own frames in a
    backtrace, which kallsyms-less lookups leave as bare addresses."""
    from drgn.helpers.linux.bpf import bpf_prog_for_each

    out = []
    try:
        for p in bpf_prog_for_each(prog):
            if int(p.jited) and int(p.jited_len):
                out.append((int(p.bpf_func), int(p.jited_len),
                            p.aux.name.string_().decode(errors="replace")))
    except Exception:  # a program being freed: fewer names, not a failed snapshot
        pass
    return out


def read_sched_ext(prog: drgn.Program) -> SchedExt | None:
    if not has_sched_ext(prog):
        return None
    hz = kernel_hz(prog)
    timeout = int(prog["scx_watchdog_timeout"])
    state = int(prog["scx_ops_enable_state_var"].counter)
    return SchedExt(
        enable_state=_enum_name(prog, "scx_ops_enable_state", state),
        ops_name=prog["scx_ops"].name.string_().decode(errors="replace"),
        exit_kind=_enum_name(prog, "scx_exit_kind", int(prog["scx_exit_kind"].counter)),
        bypass_depth=int(prog["scx_ops_bypass_depth"]),
        switching_all=bool(prog["scx_switching_all"]),
        watchdog_timeout_ms=timeout * 1000 / hz if timeout else None,
        nr_rejected=int(prog["scx_nr_rejected"].counter),
        exit=read_exit_info(prog))


def kernel_hz(prog: drgn.Program) -> int:
    """CONFIG_HZ: DWARF has no macros, so the observer puts it in ``prog.cache`` from the
    kernel's ``.config`` (``KernelFiles.hz``)."""
    hz = prog.cache.get("ktstr_hz")
    return int(hz) if hz else 1000


def _dsq_name(prog: drgn.Program, dsq: drgn.Object, local_of: dict[int, int]) -> str | None:
    if not dsq:
        return None
    addr = int(dsq)
    if addr in local_of:
        return f"local:{local_of[addr]}"
    dsq_id = int(dsq.id)
    if dsq_id & (1 << 63):
        return "global" if dsq_id & 0xFFFFFFFF == 1 else f"builtin:0x{dsq_id:x}"
    return f"0x{dsq_id:x}"


def _ops_state(prog: drgn.Program, raw: int) -> str:
    return _enum_name(prog, "scx_ops_state", raw & 0x3)


def read_tasks(prog: drgn.Program, *, stacks: bool = True) -> tuple[TaskState, ...]:
    """Every runnable task (``on_rq``), bounded by :data:`MAX_TASKS`."""
    from drgn.helpers.linux.percpu import per_cpu
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.sched import task_cpu

    classes = _class_names(prog)
    jiffies = int(prog["jiffies"])
    hz = kernel_hz(prog)
    local_of: dict[int, int] = {}
    running: set[int] = set()
    for cpu in present_cpus(prog):
        rq = per_cpu(prog["runqueues"], cpu)
        running.add(int(rq.curr))
        if hasattr(rq, "scx"):
            local_of[int(rq.scx.local_dsq.address_ or 0)] = cpu
    scx_on = has_sched_ext(prog)
    out = []
    for n, task in enumerate(for_each_task(prog)):
        if n >= MAX_TASKS:
            break
        if not int(task.on_rq):
            continue
        is_running = int(task.value_()) in running
        scx = task.scx if scx_on else None
        age = None
        if scx is not None and not is_running and int(scx.runnable_node.next):
            age = (jiffies - int(scx.runnable_at)) * 1000 / hz
        stack: tuple[str, ...] = ()
        if stacks and not is_running:
            stack = _stack(prog, task)
        out.append(TaskState(
            pid=int(task.pid), comm=_comm(task), cpu=int(task_cpu(task)),
            sched_class=classes.get(int(task.sched_class), "?"), running=is_running,
            dsq=_dsq_name(prog, scx.dsq, local_of) if scx is not None else None,
            ops_state=_ops_state(prog, int(scx.ops_state.counter)) if scx is not None else "",
            scx_flags=int(scx.flags) if scx is not None else 0,
            slice_ns=int(scx.slice) if scx is not None else 0,
            weight=int(scx.weight) if scx is not None else 0,
            runnable_age_ms=age, stack=stack))
    return tuple(out)


def _stack(prog: drgn.Program, task: drgn.Object) -> tuple[str, ...]:
    try:
        trace = prog.stack_trace(task)
    except Exception:  # drgn cannot unwind this one (no CFI for a frame)
        return ()
    frames = []
    for frame in list(trace)[:MAX_STACK]:
        name = frame.name
        frames.append(name if name else f"0x{frame.pc:x}")
    return tuple(frames)


def dsqs_of(tasks: tuple[TaskState, ...], cpus: tuple[CpuSample, ...]) -> tuple[DsqState, ...]:
    """Every DSQ a task sits on (plus each CPU's local DSQ), with its queued pids."""
    queued: dict[str, list[int]] = {f"local:{c.cpu}": [] for c in cpus}
    for t in tasks:
        if t.dsq is not None:
            queued.setdefault(t.dsq, []).append(t.pid)
    nr = {f"local:{c.cpu}": c.local_dsq_nr for c in cpus}
    return tuple(DsqState(id=k, nr=nr.get(k, len(v)), pids=tuple(v))
                 for k, v in sorted(queued.items()))


def snapshot(prog: drgn.Program, *, tasks: bool = True) -> Snapshot:
    """One look at the whole guest (for a failure dump: with every runnable task)."""
    problems: list[str] = []
    cpus = read_cpus(prog)
    try:
        scx = read_sched_ext(prog)
    except Exception as err:  # drgn.FaultError on a half-torn-down scheduler
        scx, problems = None, [f"sched_ext state: {err}"]
    task_states: tuple[TaskState, ...] = ()
    if tasks:
        try:
            task_states = read_tasks(prog)
        except Exception as err:
            problems.append(f"tasks: {err}")
    return Snapshot(jiffies=int(prog["jiffies"]), hz=kernel_hz(prog), cpus=cpus,
                    sched_ext=scx, tasks=task_states, dsqs=dsqs_of(task_states, cpus),
                    problems=tuple(problems))


# ---- stopped vCPUs ---------------------------------------------------------------------

_PT_REGS = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di",
            "rsp": "sp", "rbp": "bp", "rip": "ip", "rflags": "flags",
            **{f"r{n}": f"r{n}" for n in range(8, 16)}}
"""kvm_regs names -> struct pt_regs members (x86-64)."""
SCAN_WORDS = 2048
"""Stack words read at RSP when the stack cannot be unwound (the kernel's ``?`` lines)."""
THREAD_SIZE = 16 << 10
"""x86-64 kernel stacks: 16 KB, aligned to their size (without KASAN)."""
NO_FUNCTION = "(in no function)"
"""How a stack frame at an address no kernel function covers ends."""
TEXT_PADDING = "(kernel text padding)"
"""How it ends when that address is inside the kernel's own text (``_stext``..``_etext``):
the int3 filler between sections, where no code runs."""


def _where(prog: drgn.Program, pc: int, *, functions_only: bool = False) -> str | None:
    import drgn

    try:
        sym = prog.symbol(pc)
    except LookupError:
        return None
    if functions_only and sym.kind != drgn.SymbolKind.FUNC:
        return None
    if not sym.address <= pc < sym.address + sym.size:  # past a marker like _etext
        return None
    return f"{sym.name}+0x{pc - sym.address:x}"


def _frame(prog: drgn.Program, pc: int) -> str:
    """``function+0xoff``, or the address marked :data:`TEXT_PADDING` or :data:`NO_FUNCTION`."""
    where = _where(prog, pc)
    if where is not None:
        return where
    try:
        in_text = prog.symbol("_stext").address <= pc < prog.symbol("_etext").address
    except LookupError:
        in_text = False
    return f"0x{pc:x} {TEXT_PADDING if in_text else NO_FUNCTION}"


def vcpu_stack(prog: drgn.Program, regs: VcpuRegs) -> tuple[str, ...]:
    """Where a stopped vCPU was in the guest kernel, innermost first.

    drgn unwinds from the registers (ORC or frame pointers); where it cannot (the PC is in
    no function), the kernel text addresses found in the words at RSP follow, marked
    ``?`` as the kernel marks unreliable entries. Empty for a vCPU in user mode.
    """
    import drgn

    if not regs.kernel:
        return ()
    value = {member: regs.gprs[name] for name, member in _PT_REGS.items()}
    value["cs"] = regs.cs
    frames: list[str] = []
    try:
        trace = prog.stack_trace(drgn.Object(prog, "struct pt_regs", value=value))
        last_pc = None
        for frame in list(trace)[:MAX_STACK]:
            if frame.pc != last_pc:  # inlined callees share their caller's pc
                frames.append(_frame(prog, frame.pc))
            last_pc = frame.pc
    except Exception:  # drgn cannot unwind from here: the scan below is all there is
        frames = [_frame(prog, regs.rip)]
    if len(frames) > 1:
        return tuple(frames)
    rsp = regs.gprs["rsp"] & ~7
    # Up to the end of the (16 KB, aligned) kernel stack RSP is on, and no further.
    end = min((rsp | (THREAD_SIZE - 1)) + 1, rsp + SCAN_WORDS * 8)
    try:
        words = prog.read(rsp, end - rsp)
    except drgn.FaultError:
        return tuple(frames)
    for i in range(len(words) // 8):
        word = int.from_bytes(words[i * 8 : i * 8 + 8], "little")
        where = _where(prog, word, functions_only=True) if word >> 47 == 0x1FFFF else None
        if where is not None:
            frames.append(f"? {where}")
        if len(frames) >= MAX_STACK:
            break
    return tuple(frames)
