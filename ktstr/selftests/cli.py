"""``ktstr selftests``: the kernel's sched_ext selftests, one VM, one runner process per test.

Everything is checked before a VM starts: the topology and memory, the
kernel (a cache entry with sched_ext), the runner (built on the host if the
entry has none, so the build never runs under emulation) and every ``-t``
name against the runner's own test list. Then, like ``ktstr shell``, the
command re-runs itself in the sandbox where KVM is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from ktstr.cliargs import add_vm_arguments, console_stream, sandbox_exit_code, vm_topology
from ktstr.errors import KtstrError

if TYPE_CHECKING:
    from ktstr.selftests.build import RunnerBuild


def register(sub: argparse._SubParsersAction) -> None:
    from ktstr.selftests.run import DEFAULT_TIMEOUT_PER_TEST_S

    p = sub.add_parser(
        "selftests",
        help="run the kernel's sched_ext selftests in a test VM",
        description="Build tools/testing/selftests/sched_ext for KERNEL (cached with the "
        "kernel) and run every test, or those named with -t, each as its own runner process "
        "in one VM. Exit 0 only if no test failed or timed out.",
    )
    add_vm_arguments(p)
    p.add_argument("-t", "--test", dest="tests", action="append", default=[], metavar="NAME",
                   help="run only this test (exact name; repeatable); see --list")
    p.add_argument("--timeout-per-test", type=float, default=DEFAULT_TIMEOUT_PER_TEST_S,
                   metavar="S", help="kill a test after S seconds "
                   f"(default {DEFAULT_TIMEOUT_PER_TEST_S:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--list", action="store_true",
                   help="list the runner's tests and their descriptions; boots nothing")
    p.set_defaults(func=_cmd_selftests)


def _cmd_selftests(args: argparse.Namespace) -> int:
    topology = vm_topology(args)
    if not args.timeout_per_test > 0:
        raise KtstrError(f"--timeout-per-test must be positive, got {args.timeout_per_test:g}")

    from ktstr.kernel import list_entries, resolve_kernel

    # Refuse a kernel known to lack sched_ext before resolve_kernel builds anything.
    known = [e for e in list_entries() if e.id == args.kernel and e.flavour == "test"]
    if known and not any(e.sched_ext for e in known):
        raise KtstrError(f"kernel {args.kernel} ({known[0].version}) has no sched_ext "
                         "(CONFIG_SCHED_CLASS_EXT unset): the sched_ext selftests need a 6.12+ "
                         "kernel, e.g. --kernel 6.12")
    resolved = resolve_kernel(args.kernel)
    entry = resolved.entry
    if entry is None:
        raise KtstrError(f"--kernel {args.kernel}: the selftests are built against a cached "
                         "kernel's vmlinux and source tree; give a catalog id (e.g. 6.12) or a "
                         "cache entry directory, not a bzImage")
    from ktstr.selftests.build import ensure_runner

    build = ensure_runner(entry)
    names = build.select(args.tests)
    if args.list:
        return _print_list(build, args.json)

    code = sandbox_exit_code(args)
    if code is not None:
        return code

    from ktstr.results.sidecar import write_sidecar
    from ktstr.selftests.run import print_results, run_selftests, sidecar_records

    def live(text: str) -> None:
        print(text, flush=True)

    for name in names:
        for other in build.also_selected(name):
            print(f"ktstr: note: this runner selects by substring: -t {name} also runs "
                  f"{other}", file=sys.stderr)
    printed: set[str] = set()
    started = time.time()
    run = run_selftests(resolved.bzimage, build, names, topology=topology,
                        memory_mb=args.memory_mb, timeout_per_test=args.timeout_per_test,
                        on_console=console_stream(args.console),
                        on_line=None if args.json else live, printed=printed)
    paths = [write_sidecar(record) for record in
             sidecar_records(run, entry, topology, args.memory_mb, started)]
    results_dir = paths[0].parent if paths else None
    if args.json:
        print(json.dumps({"kernel": {"id": entry.id, "version": entry.version,
                                     "key": entry.key},
                          "topology": topology.label, "exact_selection": build.exact,
                          "results_dir": str(results_dir) if results_dir else None,
                          **run.to_dict()}, indent=1))
    else:
        print_results(run, printed)
        if results_dir is not None:
            print(f"results: {results_dir}")
    return 0 if run.ok else 1


def _print_list(build: RunnerBuild, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"runner": str(build.runner), "exact_selection": build.exact,
                          "tests": [{"name": t.name, "description": t.description}
                                    for t in build.tests]}, indent=1))
        return 0
    width = max(len(t.name) for t in build.tests)
    for t in build.tests:
        print(f"{t.name:<{width}}  {t.description}".rstrip())
    print(f"{len(build.tests)} tests in {build.runner}")
    return 0
