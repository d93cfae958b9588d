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
from dataclasses import dataclass
from pathlib import Path

import nox

from ktstr.gauntlet import Shard
from ktstr.meminfo import host_memory_mb
from ktstr.reserve import HostTopology, max_concurrent
from ktstr.scheduler import BUILTIN
from ktstr.sessions import kernels, system

SCHEDULERS = tuple(BUILTIN)
"""Every built-in scheduler; the matrix's second axis."""
SUITE = "tests/vm"
CATALOG_SUITE = "tests/catalog"
"""Every catalog scenario as a VM test (``nox -s vm_catalog``)."""
VM_KERNELS_ENV = "KTSTR_VM_KERNELS"
SUITE_MIN_VCPUS = 2
"""The vCPUs of the VM suite's smallest tests (1n1l2c1t and the like)."""
GUEST_MEMORY_MB = 1024
"""Host memory budgeted per parallel VM test, for the parallelism budget: its guest's RAM
(``Topology.default_memory_mb``, 256 MB for the suite's small topologies) plus the pytest
process running its VMM, with room to spare. A budget, not what guests boot with."""
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


def parallel_jobs(host: HostTopology | None = None, memory_mb: int | None = None) -> int:
    """How many VMs at once (pytest ``-n``): as many of the suite's smallest runs as the
    host CPU reservations fit side by side (:func:`ktstr.reserve.max_concurrent`), bounded
    by memory (>= 1). Larger tests wait on their reservations, so workers never overcommit."""
    if host is None:
        host = HostTopology.read(allowed=os.sched_getaffinity(0))
    if memory_mb is None:
        memory_mb = host_memory_mb()
    by_cpu = max_concurrent(SUITE_MIN_VCPUS, host)
    by_mem = (memory_mb // 2) // GUEST_MEMORY_MB
    return max(1, min(by_cpu, by_mem))


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


SANDBOX_RETRIES = 3
"""A test run is safe to repeat, so crashes of the emulated host itself are retried: one
main job lost its sandbox 4 times across 4 sessions (its kernel hung, exited, or
panicked "Fatal exception in interrupt"). A retry resumes the run, skipping the VM tests
that passed (``ktstr.testing.plugin``), so it costs only what was left."""


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
    # A test that pins its scheduler runs in the session of that scheduler only: the
    # matrix runs it once, not once per session.
    argv = pytest_argv(kernel, scheduler, jobs,
                       ["--ktstr-pinned", "own", *(session.posargs or [SUITE])])
    session.run(*in_sandbox_argv(session, argv), env=env)


def vm_catalog(session: nox.Session) -> None:
    """The catalog as a VM suite on the default kernel; posargs go to pytest (e.g.
    ``--ktstr-scheduler scx_simple``, ``-k weight``)."""
    default, _ids = catalog()
    install(session)
    prepare(session, default)
    env = {"KTSTR_RUN_ID": run_id(default, "catalog"), "KTSTR_KERNEL": default}
    session.log(f"results: ktstr-results/{env['KTSTR_RUN_ID']}")
    argv = pytest_argv(default, None, parallel_jobs(), [CATALOG_SUITE, *session.posargs])
    session.run(*in_sandbox_argv(session, argv), env=env)


def vm_tests_for(kernel: str, scheduler: str) -> Callable[[nox.Session], None]:
    def session_func(session: nox.Session) -> None:
        vm_tests(session, kernel, scheduler)

    session_func.__doc__ = f"VM test suite on kernel {kernel} under {scheduler}."
    return session_func


def kernel_plan_path(plan: Path, kernel: str) -> Path:
    """Where the plan helper writes the cells of one kernel (each kernel is one pytest run)."""
    return plan.with_name(f"{plan.stem}.{kernel}{plan.suffix}")


@dataclass(frozen=True)
class GauntletOptions:
    """The gauntlet session's posargs, parsed."""

    kernels: list[str]
    shard: Shard | None
    budget: float | None
    schedulers: list[str]
    pytest_args: list[str]


def gauntlet_options(posargs: Sequence[str], default_kernel: str) -> GauntletOptions:
    """Parse `nox -s gauntlet -- ...`; a bad --shard or --kernels is a one-line KtstrError."""
    import argparse

    from ktstr.errors import KtstrError
    from ktstr.gauntlet import Shard, parse_kernels

    parser = argparse.ArgumentParser(prog="nox -s gauntlet --")
    parser.add_argument("--budget", type=float, default=None, help="estimated seconds to spend")
    parser.add_argument("--kernel", default=None, help="one kernel id (default: the catalog's)")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel ids: 6.12,6.1")
    parser.add_argument("--shard", default=None, help="run shard I of N (1-based), e.g. 2/4")
    parser.add_argument("--scheduler", action="append", default=None, choices=SCHEDULERS)
    parser.add_argument("pytest_args", nargs="*")
    opts = parser.parse_args(list(posargs))
    if opts.kernels is not None and opts.kernel is not None:
        raise KtstrError("gauntlet: give --kernels or --kernel, not both")
    kernels = parse_kernels(opts.kernels) if opts.kernels is not None else [
        opts.kernel or default_kernel]
    return GauntletOptions(
        kernels=kernels,
        shard=Shard.parse(opts.shard) if opts.shard is not None else None,
        budget=opts.budget,
        schedulers=list(opts.scheduler or ()),
        pytest_args=list(opts.pytest_args),
    )


def gauntlet(session: nox.Session) -> None:
    """The suite x topology presets x flag profiles x kernels;
    `-- [--budget SECONDS] [--kernels ID,ID | --kernel ID] [--shard I/N] [--scheduler NAME]`.

    Every shard computes the same plan and runs its own cells (``ktstr.gauntlet.Shard``);
    each kernel runs as its own pytest session, and a failing kernel does not stop the rest.
    """
    from nox.command import CommandFailed

    from ktstr.errors import KtstrError  # stdlib-only, like everything imported here

    default, _ids = catalog()
    try:
        opts = gauntlet_options(session.posargs, default)
    except KtstrError as err:
        session.error(str(err))
    kernel_ids, shard = opts.kernels, opts.shard
    install(session)
    for kernel in kernel_ids:
        prepare(session, kernel)
    tmp = Path(session.create_tmp())
    specs = tmp / "specs.json"
    session.run("python", "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                "--ktstr-dump-specs", str(specs), SUITE, silent=True)
    plan = tmp / "gauntlet-plan.json"
    plan_argv = ["python", "-m", "ktstr.sessions.vm", "plan", str(specs), str(plan)]
    for kernel in kernel_ids:
        plan_argv += ["--kernel", kernel]
    if opts.budget is not None:
        plan_argv += ["--budget", str(opts.budget)]
    if shard is not None:
        plan_argv += ["--shard", str(shard)]
    for name in opts.schedulers:
        plan_argv += ["--scheduler", name]
    session.run(*plan_argv)
    label = "gauntlet" if shard is None else f"gauntlet-{shard.index}of{shard.count}"
    failed: list[str] = []
    for kernel in kernel_ids:
        kernel_plan = kernel_plan_path(plan, kernel)
        if not json.loads(kernel_plan.read_text()):
            session.log(f"kernel {kernel}: no gauntlet cells in this shard")
            continue
        env = {"KTSTR_RUN_ID": run_id(kernel, label), "KTSTR_KERNEL": kernel}
        argv = pytest_argv(kernel, None, parallel_jobs(),
                           ["--ktstr-gauntlet", str(kernel_plan), *opts.pytest_args, SUITE])
        try:
            session.run(*in_sandbox_argv(session, argv), env=env)
        except CommandFailed:
            failed.append(kernel)
    if failed:
        session.error(f"gauntlet failed on kernel(s) {', '.join(failed)}")


# ---- helpers run inside the session's venv (and the sandbox): python -m ktstr.sessions.vm ----


def _ensure_disk_templates(specs_path: Path) -> None:
    rows = json.loads(specs_path.read_text())
    disks = {(d["filesystem"], d["capacity_mb"]) for row in rows for d in row.get("disks", [])}
    if not disks:
        return
    from ktstr.disks import DiskConfig, Filesystem
    from ktstr.disks.template import ensure_template  # type: ignore[import-not-found,unused-ignore]

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
    """Expand and select the gauntlet, keep this shard's cells, write the plan.

    With ``--kernel`` (repeatable) every cell names its kernel, sched_ext support comes
    from the kernel id, and each kernel's cells also go to ``kernel_plan_path`` (written
    even when empty, so a stale file from an earlier run never stands in for it).
    """
    import argparse

    from ktstr.errors import KtstrError
    from ktstr.gauntlet import (
        GauntletTest,
        HostCapacity,
        Shard,
        expand,
        select,
        take_shard,
        write_plan,
    )

    parser = argparse.ArgumentParser(prog="python -m ktstr.sessions.vm plan")
    parser.add_argument("specs", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--no-sched-ext", action="store_true")
    parser.add_argument("--kernel", action="append", default=None)
    parser.add_argument("--shard", default=None)
    parser.add_argument("--scheduler", action="append", default=None, choices=SCHEDULERS)
    opts = parser.parse_args(argv)
    try:
        shard = Shard.parse(opts.shard) if opts.shard is not None else None
    except KtstrError as err:
        parser.error(str(err))
    rows = [r for r in json.loads(opts.specs.read_text()) if r.get("gauntlet", True)]
    tests = [GauntletTest.from_dict(r) for r in rows]
    scheds = [BUILTIN[name] for name in (opts.scheduler or SCHEDULERS)]
    kernel_map = None
    if opts.kernel:
        kernel_map = {k: not opts.no_sched_ext and bool(kernel_has_sched_ext(k))
                      for k in opts.kernel}
    variants = expand(tests, scheds, HostCapacity.detect(), sched_ext=not opts.no_sched_ext,
                      kernels=kernel_map)
    selected = select(variants, opts.budget)
    chosen = take_shard(selected, shard)
    write_plan(chosen, opts.plan)
    for kernel in kernel_map or ():
        write_plan([v for v in chosen if v.kernel == kernel], kernel_plan_path(opts.plan, kernel))
    covered = {v.coverage() for v in chosen}
    total = {v.coverage() for v in variants}
    where = f"shard {shard}: " if shard else ""
    print(
        f"gauntlet: {where}{len(chosen)} of {len(selected)} selected of {len(variants)} "
        f"variant(s), ~{sum(v.cost_s for v in chosen):.0f} s estimated, covering "
        f"{len(covered)} of {len(total)} (kernel, scheduler, topology class, flags) "
        "combination(s)"
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
          "{matrix < nox-listing.json | plan SPECS PLAN [--budget S] [--kernel ID]... "
          "[--shard I/N] | pytest -- ARGS}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
