"""The host-side observer given debug files that are not the booted kernel's: one clear
line in the observation, and the run goes on without the observer.

Two copies of the kernel entry's own vmlinux, each wrong in one way: a rebuilt kernel's
banner (caught before the guest is read, against the bzImage's version string), and
another build id under the same banner (caught in guest RAM, against the running
kernel's notes). The VM boots the real kernel both times.

Only pytest is imported at module level: this module is imported again in the guest.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.pins_scheduler("eevdf")]
THIS = Path(__file__).resolve()
MODULE = "test_observer_input"


def scenario_idle(ctx: Any) -> dict[str, Any]:
    time.sleep(ctx.args.get("seconds", 1.0))
    return {"cpus": ctx.cpus}


def _copy_entry(ktstr_kernel: Any, out: Path) -> tuple[Path, bytes]:
    """The entry's vmlinux and System.map copied to ``out``; returns the copy and its bytes."""
    entry = ktstr_kernel.entry
    if entry is None:
        pytest.fail("the kernel under test has no cache entry (no vmlinux to copy)")
    out.mkdir()
    shutil.copyfile(entry.path / "System.map", out / "System.map")
    data = (entry.path / "vmlinux").read_bytes()
    return out / "vmlinux", data


def _run_with(guest: Any, files: Any) -> Any:
    from ktstr.topology import Topology

    run = guest(scenario=f"{MODULE}:scenario_idle", test_file=THIS, args={"seconds": 2.0},
                topology=Topology.parse("1n1l2c1t"), memory_mb=1024, timeout=180,
                observe=files)
    assert run.ok, run.summary()
    assert run.observation is not None, "no observer (drgn missing?)"
    return run.observation


def test_a_vmlinux_of_another_build_is_refused_before_the_guest_is_read(
        guest: Any, ktstr_kernel: Any, tmp_path: Path) -> None:
    from ktstr.observe.kimage import read_symbols, vmlinux_banner
    from ktstr.observe.program import KernelFiles

    vmlinux, data = _copy_entry(ktstr_kernel, tmp_path / "rebuilt")
    symbols = read_symbols(ktstr_kernel.entry.path / "System.map")
    banner = vmlinux_banner(ktstr_kernel.entry.path / "vmlinux", symbols["linux_banner"])
    assert banner is not None and banner.rstrip()[-4:].isdigit(), banner
    assert data.count(banner.encode()) >= 1, "the banner is not in the vmlinux file"
    # The same tree built a year later: only the year of its build time differs.
    year = banner.rstrip()[-4:]
    rebuilt = banner.rstrip()[:-4] + str(int(year) + 1) + "\n"
    vmlinux.write_bytes(data.replace(banner.encode(), rebuilt.encode()))

    obs = _run_with(guest, KernelFiles(vmlinux, tmp_path / "rebuilt" / "System.map"))
    problems = [p for p in obs.problems if "is not the booted kernel" in p]
    assert problems, obs.problems
    assert str(int(year) + 1) in problems[0] and "without the observer" in problems[0]
    assert "\n" not in problems[0]
    assert obs.image is None and not obs.samples and obs.open_s is None, obs.problems
    assert obs.cost.life_s < 5.0, obs.cost  # it stopped at once, not at the run's end
    print(f"\n{problems[0]}")


def test_a_vmlinux_with_another_build_id_is_refused_from_guest_memory(
        guest: Any, ktstr_kernel: Any, tmp_path: Path) -> None:
    from ktstr.observe.kimage import vmlinux_build_id
    from ktstr.observe.program import KernelFiles

    vmlinux, data = _copy_entry(ktstr_kernel, tmp_path / "other-id")
    build_id = vmlinux_build_id(ktstr_kernel.entry.path / "vmlinux")
    assert build_id is not None, "the kernel has no build id"
    assert data.count(build_id) >= 1
    other = bytes(b ^ 0xFF for b in build_id)
    vmlinux.write_bytes(data.replace(build_id, other))
    assert vmlinux_build_id(vmlinux) == other

    obs = _run_with(guest, KernelFiles(vmlinux, tmp_path / "other-id" / "System.map"))
    problems = [p for p in obs.problems if "is not the vmlinux given" in p]
    assert problems, obs.problems
    assert build_id.hex() in problems[0] and other.hex() in problems[0]
    assert obs.image is None and not obs.samples, obs.problems
    print(f"\n{problems[0]}")
