"""``ktstr verifier``: one short VM per cell, three answers per cell.

- **verifies**: every program of the scheduler loaded (it attached, which libbpf does
  only after loading them all), or its log shows the verifier rejecting one;
- **attaches**: the kernel's sched_ext state went to enabled with the scheduler's ops;
- **dispatches**: the host-side monitor saw a task running under the ext class (or
  queued on a sched_ext run queue) and the probe's workers made progress.

Verified-instruction counts come from the kernel's ``bpf_prog_aux.verified_insns``, read
from guest memory by :mod:`ktstr.observe`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TextIO

from ktstr.cliargs import add_vm_arguments, sandbox_exit_code, vm_topology
from ktstr.errors import KtstrError
from ktstr.telemetry import telemetry_of
from ktstr.verifier.log import collapse, looks_like_verifier_log

if TYPE_CHECKING:
    from ktstr.kernel.cache import KernelEntry
    from ktstr.runner import GuestRun
    from ktstr.scheduler import Scheduler
    from ktstr.topology import Topology

DEFAULT_SCHEDULERS = ("scx_simple", "scx_qmap", "scx_central", "scx_flatcg")
PROBE = "ktstr.verifier.probe"
PROBE_S = 3.0
LOG_LINES = 200


@dataclass
class Cell:
    scheduler: str
    topology: str
    verifies: bool | None
    attaches: bool
    dispatches: bool
    programs: dict[str, int] = field(default_factory=dict)
    """Program name -> verified instructions."""
    failure: str = ""
    log: str = ""
    """The collapsed verifier log of a program that did not verify."""

    @property
    def ok(self) -> bool:
        return bool(self.verifies and self.attaches and self.dispatches)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verifier",
        help="does each scheduler's BPF verify, attach and dispatch, per kernel x topology",
        description="Boot one short VM per scheduler and topology and answer three questions "
        "separately: do all of the scheduler's BPF programs verify, does it attach, does a "
        "workload get dispatched; with each program's verified-instruction count. Exit 0 "
        "only if every cell answers yes to all three.")
    add_vm_arguments(p)
    p.set_defaults(kernel="6.12", memory_mb=256)
    p.add_argument("--scheduler", dest="schedulers", action="append", default=[],
                   metavar="S", help=f"a scheduler (repeatable; default "
                   f"{', '.join(DEFAULT_SCHEDULERS)}); NAME@PROFILE for flags")
    p.add_argument("--also-topology", dest="topologies", action="append", default=[],
                   metavar="T", help="more topologies besides --topology (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_verifier)
    for action in p._actions:  # --kernel defaults to the catalog's 6.12 here
        if action.dest == "kernel":
            action.required = False


def _cmd_verifier(args: argparse.Namespace) -> int:
    from ktstr.scheduler import parse_scheduler_option
    from ktstr.topology import Topology

    first = vm_topology(args)
    topologies = [first, *(Topology.parse(t) for t in args.topologies)]
    chosen = [parse_scheduler_option(s) for s in args.schedulers or DEFAULT_SCHEDULERS]
    for sched, _ in chosen:
        if not sched.sched_ext:
            raise KtstrError(f"{sched.name} is not a sched_ext scheduler: nothing to verify")

    from ktstr.kernel import resolve_kernel

    resolved = resolve_kernel(args.kernel)
    entry = resolved.entry
    if entry is None:
        raise KtstrError(f"--kernel {args.kernel}: give a catalog id or a cache entry; the "
                         "verifier reads the kernel's vmlinux")
    if not entry.sched_ext:
        raise KtstrError(f"kernel {entry.id} ({entry.version}) has no sched_ext")
    code = sandbox_exit_code(args)
    if code is not None:
        return code
    cells = [probe_cell(entry, sched, profile.name, topo, args.memory_mb)
             for sched, profile in chosen for topo in topologies]
    if args.json:
        print(json.dumps({"kernel": {"id": entry.id, "version": entry.version},
                          "cells": [asdict(c) for c in cells]}, indent=1))
    else:
        print_cells(cells)
    return 0 if all(c.ok for c in cells) else 1


def probe_cell(entry: KernelEntry, sched: Scheduler, profile: str, topology: Topology,
               memory_mb: int) -> Cell:
    from ktstr.observe.program import KernelFiles
    from ktstr.runner import GuestRequest, run_guest

    binary = sched.resolve_binary(entry)
    if binary is None:
        return Cell(sched.name, topology.label, None, False, False,
                    failure=f"no {sched.name} binary for kernel {entry.id}: "
                    "ktstr kernel schedulers")
    spec = sched.guest_spec(binary, sched.profile(profile))
    run = run_guest(GuestRequest(
        kernel=entry.bzimage, scenario=f"{PROBE}:run", modules=(PROBE,), topology=topology,
        memory_mb=memory_mb, duration_s=PROBE_S, scheduler=spec,
        observe=KernelFiles.of_entry(entry.path), watch_maps=(".bss",)))
    return judge_cell(sched.name, topology.label, run)


def judge_cell(name: str, topology: str, run: GuestRun) -> Cell:
    """The three answers from one probe run."""
    obs = run.observation
    attached = any(m.get("type") == "sched_attached" for m in run.messages)
    log = str(run.details.get("log_tail") or "")
    verifies: bool | None
    if attached or run.failure == "scheduler_ejected":
        # Ejected while attaching (scx_bpf_error in ops.init, say): the kernel ran the
        # scheduler's programs, so every one of them had loaded, verified.
        verifies = True
    elif looks_like_verifier_log(log) or looks_like_verifier_log(run.message):
        verifies = False
    else:
        verifies = None  # it failed before or beside loading: the log does not say
    ran_ext = bool(obs and any(
        (c.curr_class == "ext" and c.curr_pid != 0) or c.scx_nr_running > 0
        for s in obs.samples if s.scx_enabled for c in s.cpus))
    workers = telemetry_of(run.result).get("workers") or []
    progressed = bool(workers) and all(w.get("work_units") for w in workers)
    progs = (obs.progs or (obs.exit_bpf.progs if obs.exit_bpf else ())) if obs else ()
    cell = Cell(name, topology, verifies, attached, attached and ran_ext and progressed,
                programs={p.name: p.verified_insns for p in progs})
    if not run.ok:
        cell.failure = f"{run.failure}: {run.message.splitlines()[0] if run.message else ''}"
    if verifies is False:
        cell.log = "\n".join(collapse(log).splitlines()[-LOG_LINES:])
    if obs is not None and attached and not cell.programs:
        cell.failure = cell.failure or f"no program counts from guest memory: {obs.problems}"
    return cell


def _yes(value: bool | None) -> str:
    return "yes" if value else "unknown" if value is None else "NO"


def print_cells(cells: list[Cell], stream: TextIO = sys.stdout) -> None:
    for c in cells:
        print(f"{c.scheduler} {c.topology}: verifies {_yes(c.verifies)}, attaches "
              f"{_yes(c.attaches)}, dispatches {_yes(c.dispatches)}", file=stream)
        for prog, insns in sorted(c.programs.items()):
            print(f"  {prog:<24} {insns:>8} verified insns", file=stream)
        if c.failure:
            print(f"  {c.failure}", file=stream)
        if c.log:
            print("  verifier log:", file=stream)
            for line in c.log.splitlines():
                print(f"    {line}", file=stream)
