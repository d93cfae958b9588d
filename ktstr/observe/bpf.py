"""The scheduler's BPF programs and maps, read from guest memory with drgn.

Programs: name, type, verified instructions, JIT size, and the run count and time the
kernel keeps when ``kernel.bpf_stats_enabled=1``. Maps: name, type, key/value sizes and,
for array, per-CPU array and hash maps, their entries rendered through the map's own BTF
(:mod:`ktstr.observe.btf`), so a ``.bss`` map reads as the scheduler's global variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ktstr.observe.btf import Btf, BtfError, Rendered, parse_btf, render

if TYPE_CHECKING:
    from collections.abc import Callable

    import drgn

MAX_ENTRIES = 32
"""Entries rendered per map (the rest are counted, not read)."""
MAX_VALUE = 1 << 16


@dataclass(frozen=True)
class BpfProgInfo:
    id: int
    name: str
    type: str
    verified_insns: int
    xlated_bytes: int
    jited_bytes: int
    run_count: int
    run_time_ns: int


@dataclass(frozen=True)
class BpfMapEntry:
    key: Rendered
    value: Rendered
    cpu: int | None = None


@dataclass(frozen=True)
class BpfMapInfo:
    id: int
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    entries: tuple[BpfMapEntry, ...] = ()
    truncated: bool = False
    problem: str = ""


@dataclass
class BpfState:
    progs: tuple[BpfProgInfo, ...] = ()
    maps: tuple[BpfMapInfo, ...] = ()
    problems: list[str] = field(default_factory=list)


def _enum(value: drgn.Object) -> str:
    try:
        return value.format_(type_name=False).removeprefix("(").split(")")[-1]
    except Exception:  # a value outside its enum
        return str(int(value))


def _percpu_sum(prog: drgn.Program, stats: drgn.Object, member: str) -> int:
    from drgn.helpers.linux.cpumask import for_each_possible_cpu
    from drgn.helpers.linux.percpu import per_cpu_ptr

    total = 0
    for cpu in for_each_possible_cpu(prog):
        total += int(getattr(per_cpu_ptr(stats, cpu), member).counter)
    return total


def read_progs(prog: drgn.Program) -> tuple[BpfProgInfo, ...]:
    from drgn.helpers.linux.bpf import bpf_prog_for_each

    out = []
    for p in bpf_prog_for_each(prog):
        aux = p.aux
        cnt = nsecs = 0
        if p.stats:
            try:
                cnt = _percpu_sum(prog, p.stats, "cnt.v")
                nsecs = _percpu_sum(prog, p.stats, "nsecs.v")
            except Exception:  # u64_stats_t's layout differs on this kernel
                pass
        out.append(BpfProgInfo(
            id=int(aux.id), name=aux.name.string_().decode(errors="replace"),
            type=_enum(p.type), verified_insns=int(aux.verified_insns),
            xlated_bytes=int(p.len) * 8, jited_bytes=int(p.jited_len),
            run_count=cnt, run_time_ns=nsecs))
    return tuple(out)


def _btf_of(prog: drgn.Program, bmap: drgn.Object, cache: dict[int, Btf | None]) -> Btf | None:
    addr = int(bmap.btf)
    if not addr:
        return None
    if addr not in cache:
        btf = bmap.btf
        size = int(btf.data_size)
        try:
            cache[addr] = parse_btf(prog.read(int(btf.data), size)) if size > 0 else None
        except (BtfError, ValueError):
            cache[addr] = None
    return cache[addr]


def _typed(btf: Btf | None, type_id: int, data: bytes) -> Rendered:
    if btf is None or not type_id:
        if len(data) in (4, 8):
            return int.from_bytes(data, "little")
        return data.hex()
    return render(btf, type_id, data)


def read_maps(prog: drgn.Program, *, keep: Callable[[str], bool] | None = None,
              entries: bool = True) -> tuple[BpfMapInfo, ...]:
    """Every map (or those whose name ``keep`` accepts: the others' entries are never
    read), with up to :data:`MAX_ENTRIES` entries."""
    from drgn.helpers.linux.bpf import bpf_map_for_each

    btfs: dict[int, Btf | None] = {}
    out = []
    for m in bpf_map_for_each(prog):
        name = m.name.string_().decode(errors="replace")
        if keep is not None and not keep(name):
            continue
        kind = _enum(m.map_type)
        info = BpfMapInfo(id=int(m.id), name=name, type=kind, key_size=int(m.key_size),
                          value_size=int(m.value_size), max_entries=int(m.max_entries))
        if entries:
            try:
                found, truncated = _entries(prog, m, kind, _btf_of(prog, m, btfs))
                info = replace(info, entries=found, truncated=truncated)
            except Exception as err:  # drgn.FaultError in a map being torn down
                info = replace(info, problem=f"{type(err).__name__}: {err}")
        out.append(info)
    return tuple(out)


def _entries(prog: drgn.Program, m: drgn.Object, kind: str,
             btf: Btf | None) -> tuple[tuple[BpfMapEntry, ...], bool]:
    from drgn import cast, container_of
    from drgn.helpers.linux.cpumask import for_each_possible_cpu
    from drgn.helpers.linux.percpu import per_cpu_ptr

    key_id, value_id = int(m.btf_key_type_id), int(m.btf_value_type_id)
    value_size, key_size = int(m.value_size), int(m.key_size)
    if value_size > MAX_VALUE or key_size > MAX_VALUE:
        return (), True
    out: list[BpfMapEntry] = []
    n = int(m.max_entries)
    if kind in ("BPF_MAP_TYPE_ARRAY", "BPF_MAP_TYPE_PERCPU_ARRAY"):
        array = container_of(m, "struct bpf_array", "map")
        elem = int(array.elem_size)
        for i in range(min(n, MAX_ENTRIES)):
            if kind == "BPF_MAP_TYPE_ARRAY":
                raw = prog.read(int(array.value.address_ or 0) + i * elem, value_size)
                out.append(BpfMapEntry(i, _typed(btf, value_id, raw)))
                continue
            pptr = cast("void *", array.pptrs[i])
            for cpu in for_each_possible_cpu(prog):
                raw = prog.read(int(per_cpu_ptr(pptr, cpu)), value_size)
                out.append(BpfMapEntry(i, _typed(btf, value_id, raw), cpu=cpu))
        return tuple(out), n > MAX_ENTRIES
    if kind in ("BPF_MAP_TYPE_HASH", "BPF_MAP_TYPE_LRU_HASH"):
        from drgn.helpers.linux.list_nulls import hlist_nulls_for_each_entry

        htab = container_of(m, "struct bpf_htab", "map")
        key_room = (key_size + 7) & ~7
        for b in range(int(htab.n_buckets)):
            for elem in hlist_nulls_for_each_entry("struct htab_elem",
                                                   htab.buckets[b].head.address_of_(),
                                                   "hash_node"):
                key_at = int(elem.key.address_ or 0)
                key = _typed(btf, key_id, prog.read(key_at, key_size))
                value = _typed(btf, value_id, prog.read(key_at + key_room, value_size))
                out.append(BpfMapEntry(key, value))
                if len(out) >= MAX_ENTRIES:
                    return tuple(out), True
        return tuple(out), False
    return (), False  # other kinds are listed, not read


def read_bpf(prog: drgn.Program) -> BpfState:
    state = BpfState()
    try:
        state.progs = read_progs(prog)
    except Exception as err:
        state.problems.append(f"programs: {type(err).__name__}: {err}")
    try:
        state.maps = read_maps(prog)
    except Exception as err:
        state.problems.append(f"maps: {type(err).__name__}: {err}")
    return state
