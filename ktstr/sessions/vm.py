"""The `vm_tests` and `gauntlet` nox sessions.

`vm_tests` runs the suite in ``tests/vm`` for one (kernel, scheduler)
combination: it builds or reuses the kernel and its schedulers, then runs
pytest with that kernel and scheduler, inside one sandbox VM when this
machine's KVM cannot boot a kernel. The sandbox run first ensures every disk
template the suite declares (templates are built by booting a VM, so they
need the same KVM the tests do).

This module is imported by ``noxfile.py`` in nox's own Python, which has no
ktstr dependencies: only the standard library and stdlib-only ktstr modules
at import time.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nox

from ktstr.scheduler import BUILTIN
from ktstr.sessions import kernels, system

SCHEDULERS = tuple(BUILTIN)
"""Every built-in scheduler; the matrix's second axis."""
SUITE = "tests/vm"
VM_KERNELS_ENV = "KTSTR_VM_KERNELS"
GUEST_MEMORY_MB = 1024
"""Typical memory of one test VM, for the parallelism budget."""
SCHED_EXT_SINCE = (6, 12)


def catalog() -> tuple[str, list[str]]:
    """(default id, ids with the default first)."""
    ids = kernels.catalog_ids()
    return ids[0], ids


def kernel_has_sched_ext(kernel_id: str) -> bool | None:
    """From the catalog id's version (sched_ext is upstream since 6.12); None if unknown."""
    match = re.match(r"^(\d+)\.(\d+)", kernel_id)
    if not match:
        return None
    return (int(match.group(1)), int(match.group(2))) >= SCHED_EXT_SINCE


def combinations(kernels: Sequence[str]) -> list[tuple[str, str]]:
    return [(k, s) for k in kernels for s in SCHEDULERS]


def session_name(kernel: str, scheduler: str) -> str:
    """The id nox gives a parametrized `vm_tests` run; also the name of the named ones."""
    return f"vm_tests(kernel='{kernel}', scheduler='{scheduler}')"


def skip_reason(kernel: str, scheduler: str, selected: Sequence[str] | None = None) -> str | None:
    """Why a combination does not run here, or None."""
    if BUILTIN[scheduler].sched_ext and kernel_has_sched_ext(kernel) is False:
        return (
            f"{scheduler} is a sched_ext scheduler and kernel {kernel} has no sched_ext "
            f"(upstream since {'.'.join(map(str, SCHED_EXT_SINCE))})"
        )
    if selected is not None and kernel not in selected:
        return (
            f"kernel {kernel} is not in {VM_KERNELS_ENV}={','.join(selected)}; "
            f"set {VM_KERNELS_ENV}={kernel} (or 'all') to run it"
        )
    return None


def selected_kernels(default: str, all_ids: Sequence[str]) -> list[str]:
    raw = os.environ.get(VM_KERNELS_ENV, "").strip()
    if not raw:
        return [default]
    if raw == "all":
        return list(all_ids)
    return [k.strip() for k in raw.split(",") if k.strip()]


def parallel_jobs(cpus: int | None = None, memory_mb: int | None = None) -> int:
    """How many VMs at once: one per two host CPUs, bounded by memory (>= 1)."""
    cpus = cpus or os.cpu_count() or 1
    if memory_mb is None:
        memory_mb = _host_memory_mb()
    by_cpu = cpus // 2
    by_mem = (memory_mb // 2) // GUEST_MEMORY_MB
    return max(1, min(by_cpu, by_mem))


def _host_memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


def run_id(kernel: str, label: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kernel}-{label}"


def install(session: nox.Session) -> None:
    """Host packages (installed as root when missing) and the doctor's tool check, then ktstr
    into the session's venv."""
    system.prepare_host(session)
    session.install("-e", ".[dev,report]")


def kvm_usable(session: nox.Session) -> bool:
    """Ask the venv's ktstr (which has ioctl_opt) whether VMs can boot natively."""
    out = session.run(
        "python", "-c",
        "from ktstr.sandbox.detect import detect_kvm; s = detect_kvm(); "
        "print('usable' if s.usable else 'unusable', s.reason)",
        silent=True,
    )
    text = str(out or "").strip()
    session.log(f"KVM: {text}")
    return text.startswith("usable")


SANDBOX_RETRIES = 1
"""A test run is safe to repeat, so one crash of the emulated host itself is retried."""


def sandboxed(argv: list[str]) -> list[str]:
    """``argv`` run inside one sandbox VM (the emulated KVM host)."""
    return ["python", "-m", "ktstr", "sandbox", "run", "--retries", str(SANDBOX_RETRIES),
            "--", *argv]


def in_sandbox_argv(session: nox.Session, argv: list[str]) -> list[str]:
    """``argv`` as run through the sandbox when KVM is unusable here."""
    return argv if kvm_usable(session) else sandboxed(argv)


def prepare(session: nox.Session, kernel: str) -> None:
    """Build or reuse the kernel; for a sched_ext kernel that includes its schedulers."""
    session.run("python", "-m", "ktstr", "kernel", "build", kernel)


def pytest_argv(kernel: str, scheduler: str | None, jobs: int, extra: Sequence[str]) -> list[str]:
    # Plugins the VM suite does not use cost ~40 s of start-up inside the sandbox.
    argv = ["python", "-m", "ktstr.sessions.vm", "pytest", "--", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", "-p", "no:benchmark", "-ra", "--ktstr-kernel", kernel]
    if scheduler:
        argv += ["--ktstr-scheduler", scheduler]
    if jobs > 1:
        argv += ["-n", str(jobs)]
    return [*argv, *extra]


def vm_tests(session: nox.Session, kernel: str, scheduler: str) -> None:
    """The VM suite for one (kernel, scheduler); posargs go to pytest."""
    default, ids = catalog()
    reason = skip_reason(kernel, scheduler, selected_kernels(default, ids))
    if reason:
        session.skip(reason)
    install(session)
    prepare(session, kernel)
    jobs = parallel_jobs()
    env = {"KTSTR_RUN_ID": run_id(kernel, scheduler), "KTSTR_SCHEDULER": scheduler,
           "KTSTR_KERNEL": kernel}
    session.log(f"results: ktstr-results/{env['KTSTR_RUN_ID']} ({jobs} VM(s) at a time)")
    argv = pytest_argv(kernel, scheduler, jobs, [*(session.posargs or [SUITE])])
    session.run(*in_sandbox_argv(session, argv), env=env)


def vm_tests_for(kernel: str, scheduler: str) -> Callable[[nox.Session], None]:
    def session_func(session: nox.Session) -> None:
        vm_tests(session, kernel, scheduler)

    session_func.__doc__ = f"VM test suite on kernel {kernel} under {scheduler}."
    return session_func


def gauntlet(session: nox.Session) -> None:
    """The suite x topology presets x flag profiles; `-- --budget SECONDS [--kernel ID]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="nox -s gauntlet --")
    parser.add_argument("--budget", type=float, default=None, help="estimated seconds to spend")
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--scheduler", action="append", default=None, choices=SCHEDULERS)
    parser.add_argument("pytest_args", nargs="*")
    opts = parser.parse_args(session.posargs)
    default, _ids = catalog()
    kernel = opts.kernel or default
    install(session)
    sched_ext = bool(kernel_has_sched_ext(kernel))
    prepare(session, kernel)
    tmp = Path(session.create_tmp())
    specs = tmp / "specs.json"
    session.run("python", "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                "--ktstr-dump-specs", str(specs), SUITE, silent=True)
    plan = tmp / "gauntlet-plan.json"
    plan_argv = ["python", "-m", "ktstr.sessions.vm", "plan", str(specs), str(plan)]
    if opts.budget is not None:
        plan_argv += ["--budget", str(opts.budget)]
    if not sched_ext:
        plan_argv += ["--no-sched-ext"]
    for name in opts.scheduler or ():
        plan_argv += ["--scheduler", name]
    session.run(*plan_argv)
    env = {"KTSTR_RUN_ID": run_id(kernel, "gauntlet"), "KTSTR_KERNEL": kernel}
    argv = pytest_argv(kernel, None, parallel_jobs(),
                        ["--ktstr-gauntlet", str(plan), *opts.pytest_args, SUITE])
    session.run(*in_sandbox_argv(session, argv), env=env)


# ---- helpers run inside the session's venv (and the sandbox): python -m ktstr.sessions.vm ----


def _ensure_disk_templates(specs_path: Path) -> None:
    rows = json.loads(specs_path.read_text())
    disks = {(d["filesystem"], d["capacity_mb"]) for row in rows for d in row.get("disks", [])}
    if not disks:
        return
    from ktstr.disk import DiskConfig, Filesystem
    from ktstr.vmm.disk_template import ensure_template  # type: ignore[import-not-found,unused-ignore]

    for fs, capacity in sorted(disks):
        config = DiskConfig(capacity_mb=int(capacity), filesystem=Filesystem(fs))
        path = ensure_template(config)
        print(f"ktstr: disk template {fs} {capacity} MiB: {path}", flush=True)


def _main_pytest(args: list[str]) -> int:
    """Ensure the suite's disk templates, then run pytest (one process, inside the sandbox)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        specs = Path(tmp) / "specs.json"
        collect = [sys.executable, "-m", "pytest", *args, "-q", "--collect-only",
                   "--ktstr-dump-specs", str(specs)]
        if subprocess.run(collect, stdout=subprocess.DEVNULL, check=False).returncode == 0:
            _ensure_disk_templates(specs)
    return subprocess.run([sys.executable, "-m", "pytest", *args], check=False).returncode


def _main_plan(argv: list[str]) -> int:
    import argparse

    from ktstr.gauntlet import GauntletTest, HostCapacity, expand, select, write_plan

    parser = argparse.ArgumentParser(prog="python -m ktstr.sessions.vm plan")
    parser.add_argument("specs", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--no-sched-ext", action="store_true")
    parser.add_argument("--scheduler", action="append", default=None, choices=SCHEDULERS)
    opts = parser.parse_args(argv)
    rows = [r for r in json.loads(opts.specs.read_text()) if r.get("gauntlet", True)]
    tests = [GauntletTest.from_dict(r) for r in rows]
    scheds = [BUILTIN[name] for name in (opts.scheduler or SCHEDULERS)]
    variants = expand(tests, scheds, HostCapacity.detect(), sched_ext=not opts.no_sched_ext)
    chosen = select(variants, opts.budget)
    write_plan(chosen, opts.plan)
    covered = {v.coverage() for v in chosen}
    total = {v.coverage() for v in variants}
    print(
        f"gauntlet: {len(chosen)} of {len(variants)} variant(s), "
        f"~{sum(v.cost_s for v in chosen):.0f} s estimated, covering {len(covered)} of "
        f"{len(total)} (scheduler, topology class, flags) combination(s)"
    )
    return 0


def matrix_from_listing(listing: list[dict[str, object]]) -> dict[str, list[str]]:
    """The CI job matrix from ``nox -l --json -k vm_tests``: one entry per combination."""
    sessions = [str(row["session"]) for row in listing
                if str(row.get("session", "")).startswith("vm_tests(")]
    return {"session": sessions}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["matrix"]:
        print(json.dumps(matrix_from_listing(json.load(sys.stdin))))
        return 0
    if args[:1] == ["plan"]:
        return _main_plan(args[1:])
    if args[:1] == ["pytest"]:
        rest = args[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return _main_pytest(rest)
    print("usage: python -m ktstr.sessions.vm "
          "{matrix < nox-listing.json | plan SPECS PLAN [--budget S] | pytest -- ARGS}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
