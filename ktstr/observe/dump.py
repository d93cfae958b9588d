"""The failure dump of a VM test: what the observer saw, written next to the sidecar.

``<sidecar stem>.files/state.json`` holds the frozen guest's snapshot (every CPU, every
runnable task with its sched_ext state and stack, the DSQs), the snapshot taken when the
scheduler began an error exit, the stalled tasks the monitor saw and its last samples;
``vmcore`` is guest RAM as an ELF core (``drgn -c vmcore -s vmlinux``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ktstr.observe.kimage import ObserveError
from ktstr.observe.monitor import Observation

LAST_SAMPLES = 50


def dump_record(obs: Observation) -> dict[str, Any]:
    return {
        "final": obs.final.to_dict() if obs.final else None,
        "exit_snapshot": obs.exit_snapshot.to_dict() if obs.exit_snapshot else None,
        "stalls": [asdict(s) for s in obs.stalls.values()],
        "vcpus": [{"vcpu": r.index, "kernel": r.kernel, "regs": r.gprs, "cs": r.cs,
                   "stack": list(obs.vcpu_stacks.get(r.index, ()))} for r in obs.vcpu_regs],
        "last_samples": [asdict(s) for s in list(obs.samples)[-LAST_SAMPLES:]],
        "bpf_at_exit": asdict(obs.exit_bpf) if obs.exit_bpf else None,
        "bpf": asdict(obs.bpf) if obs.bpf else None,
        "problems": obs.problems,
        "kernel": {"osrelease": obs.image.osrelease,
                   "build_id": obs.image.build_id.hex() if obs.image.build_id else None}
        if obs.image else None,
    }


def write_dump(obs: Observation, directory: Path, *, vmcore: bool = True) -> dict[str, str]:
    """Write the dump into ``directory``; the paths written, by name. Never raises for
    the guest's sake: what could not be written is a note in ``obs.problems``."""
    directory.mkdir(parents=True, exist_ok=True)
    obs.final_snapshot()  # the frozen guest, read now while its RAM is still kept
    out: dict[str, str] = {}
    state_path = directory / "state.json"
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dump_record(obs), fh, indent=1, default=str)
        os.replace(tmp, state_path)
        out["state"] = str(state_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if vmcore and obs.memory is not None:
        try:
            stats = obs.write_vmcore(directory / "vmcore")
            out["vmcore"] = str(stats.path)
        except (ObserveError, OSError, ValueError) as err:
            obs.note(f"vmcore not written: {err}")
    return out


def findings(obs: Observation) -> list[str]:
    """What guest memory says went wrong, one line each (for the failure message)."""
    lines = []
    for s in sorted(obs.stalls.values(), key=lambda s: -s.runnable_age_ms)[:3]:
        timeout = f" (watchdog timeout {s.watchdog_timeout_ms:g} ms)" \
            if s.watchdog_timeout_ms else ""
        lines.append(f"from guest memory: {s.comm}[{s.pid}] runnable on CPU {s.cpu} for "
                     f"{s.runnable_age_ms:.0f} ms without running{timeout}; "
                     f"dsq {s.dsq or 'none'}, {s.ops_state}")
    for index, stack in sorted(obs.vcpu_stacks.items()):
        if stack:
            lines.append(f"from guest memory: vcpu {index} was in the kernel at "
                         + " <- ".join(stack[:8]))
    snap = obs.exit_snapshot or obs.final
    ext = snap.sched_ext.exit if snap is not None and snap.sched_ext is not None else None
    if ext is not None:
        bt = " <- ".join(ext.backtrace[:6])
        lines.append(f"from guest memory: sched_ext exit {ext.kind} ({ext.reason}): "
                     f"{ext.message}" + (f"; backtrace {bt}" if bt else ""))
    return lines
