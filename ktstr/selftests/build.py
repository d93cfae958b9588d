"""Build the kernel's sched_ext selftests runner for a cached kernel entry.

``tools/testing/selftests/sched_ext`` builds one ``runner`` binary with every
test's BPF skeleton embedded, against the kernel's own BTF (``VMLINUX_BTF``),
with clang >= 16 (:func:`ktstr.kernel.schedulers.find_clang`) and the tree's
libbpf and bpftool. It links ``libelf``, ``libz`` and ``libzstd``. The tree is
built out of tree (``O=``) under ``<cache>/build/<key>/selftests-sched_ext``
(incremental on a rebuild), and the runner is stored with the kernel entry
as ``<entry>/selftests/sched_ext/runner`` plus ``build.json`` (checksum, test
list, build time), installed by renaming a complete temporary directory.

Exact selection: the runner's ``-t`` is a substring filter (``-t
select_cpu_dfl`` also runs ``select_cpu_dfl_nodispatch``). The link is
wrapped (``-Wl,--wrap=scx_test_register``, through :data:`WRAPPER_MK`) with
:data:`SELECT_C`, which registers only the test named by :data:`SELECT_ENV`
when it is set; unset, the runner is the stock one. The tests' own code is
untouched. A tree without ``scx_test_register`` gets a stock runner
(``exact: false``) and selection falls back to the substring filter.

The test list comes from the built binary, run on the host with ``-s -t
'\\n'``: ``main()`` then only prints every registered test's preamble and an
``ok N name # SKIP`` line (the filter matches nothing), and the only
constructors register tests: nothing touches BPF (checked with strace, see
``docs/selftests.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.kernel import cache
from ktstr.kernel.build import jobs, run_logged
from ktstr.kernel.cache import KernelEntry
from ktstr.kernel.locks import file_lock
from ktstr.kernel.schedulers import find_clang
from ktstr.selftests.parse import (
    LIST_FILTER,
    SELECT_ENV,
    SelftestInfo,
    parse_listing,
    substring_matches,
)

SUITE = "sched_ext"
SELFTESTS_DIR = Path("tools") / "testing" / "selftests" / SUITE
SUBDIR = "selftests"
"""Directory in the kernel entry: ``<entry>/selftests/sched_ext/{runner,build.json}``."""
BUILD_FORMAT = 1
LIST_TIMEOUT_S = 30.0

SELECT_C = r"""// SPDX-License-Identifier: GPL-2.0
/*
 * Written by ktstr. The sched_ext runner's -t is a substring filter; with
 * @SELECT_ENV@ set, only the test of exactly that name registers (the
 * runner is linked with -Wl,--wrap=scx_test_register). Unset: every test.
 */
#include <stdlib.h>
#include <string.h>

struct scx_test { const char *name; };	/* the name is the first member */

void __real_scx_test_register(struct scx_test *test);
void __wrap_scx_test_register(struct scx_test *test);

void __wrap_scx_test_register(struct scx_test *test)
{
	const char *only = getenv("@SELECT_ENV@");

	if (only && strcmp(test->name, only))
		return;
	__real_scx_test_register(test);
}
"""

WRAPPER_MK = r"""# Written by ktstr: the kernel's sched_ext selftests Makefile, with the
# runner's link wrapped by ktstr_select.c (exact test selection).
include Makefile

KTSTR_SELECT_OBJ := $(OBJ_DIR)/ktstr_select.o

$(KTSTR_SELECT_OBJ): $(KTSTR_SELECT_SRC) | $(SCXOBJ_DIR)
	$(CC) -O2 -Wall -Werror -c $< -o $@

$(OUTPUT)/runner: $(KTSTR_SELECT_OBJ)
$(OUTPUT)/runner: private LDFLAGS += -Wl,--wrap=scx_test_register
"""


@dataclass(frozen=True)
class RunnerBuild:
    """A runner stored with a kernel entry, and what it holds."""

    runner: Path
    tests: tuple[SelftestInfo, ...]
    exact: bool
    """Built with the exact-selection wrap (:data:`SELECT_ENV`)."""
    kernel_key: str
    build_seconds: float | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tests]

    def select(self, wanted: Sequence[str] = ()) -> list[str]:
        """The tests to run, in the runner's order; every test when ``wanted`` is empty.

        An unknown name is a one-line :class:`KtstrError` naming the known ones.
        """
        names = self.names
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise KtstrError(
                f"unknown sched_ext selftest{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; this kernel's runner has: {', '.join(names)}")
        chosen = set(wanted)
        return [n for n in names if not chosen or n in chosen]

    def also_selected(self, name: str) -> list[str]:
        """Other tests ``runner -t name`` runs too (none with the exact-selection wrap)."""
        if self.exact:
            return []
        return [n for n in substring_matches(name, self.names) if n != name]


def runner_dir(entry: KernelEntry) -> Path:
    return entry.path / SUBDIR / SUITE


def workdir(entry: KernelEntry) -> Path:
    """Where the tree is built (``O=``): next to the kernel's own build tree."""
    return entry.path.parent.parent / "build" / entry.key / f"selftests-{SUITE}"


def cached_runner(entry: KernelEntry) -> RunnerBuild | None:
    """The entry's runner if it is installed and intact, else None."""
    directory = runner_dir(entry)
    try:
        meta = json.loads((directory / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != BUILD_FORMAT:
        return None
    runner = directory / "runner"
    record = _file_record(meta.get("runner"))
    if record is None or cache.check_file(runner, record, stamped=False) is not None:
        return None
    tests = tuple(SelftestInfo(str(t["name"]), str(t.get("description", "")))
                  for t in meta.get("tests", []) if isinstance(t, dict) and "name" in t)
    if not tests:
        return None
    seconds = meta.get("build_seconds")
    return RunnerBuild(runner, tests, bool(meta.get("exact")), entry.key,
                       float(seconds) if isinstance(seconds, int | float) else None)


def _file_record(value: object) -> cache.FileRecord | None:
    if not isinstance(value, dict):
        return None
    size, sha = value.get("size"), value.get("sha256")
    if type(size) is not int or not isinstance(sha, str):
        return None
    return cache.FileRecord(size, sha)


def ensure_runner(entry: KernelEntry) -> RunnerBuild:
    """The entry's runner: cached, or built now (under the entry's lock)."""
    if not entry.sched_ext:
        raise KtstrError(
            f"kernel {entry.id} ({entry.version}) has no sched_ext (CONFIG_SCHED_CLASS_EXT "
            "unset): the sched_ext selftests need a 6.12+ kernel, e.g. --kernel 6.12")
    found = cached_runner(entry)
    if found is not None:
        return found
    root = entry.path.parent.parent
    with file_lock(cache.lock_path(root, entry.key)):
        found = cached_runner(entry)
        if found is not None:
            return found
        return _build_locked(entry)


def _source_tree(entry: KernelEntry) -> Path:
    src = Path(cache.read_metadata(entry.path).source_tree or "")
    if not (src / SELFTESTS_DIR / "Makefile").is_file():
        if not (src / "Makefile").is_file():
            raise KtstrError(f"the source tree of {entry.key} ({src}) is gone: "
                             f"rebuild it with `ktstr kernel build {entry.id}`")
        raise KtstrError(f"{src} has no {SELFTESTS_DIR}: this kernel predates the sched_ext "
                         "selftests")
    return src


def _build_locked(entry: KernelEntry) -> RunnerBuild:
    src = _source_tree(entry)
    for leftover in entry.path.glob(f".{SUBDIR}-tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    work = workdir(entry)
    log = work / "build.log"
    print(f"ktstr: building the sched_ext selftests for {entry.id} {entry.version} "
          f"(log: {log})", file=sys.stderr, flush=True)
    start = time.monotonic()
    runner, exact = build_runner(src, entry.vmlinux, work, log)
    seconds = round(time.monotonic() - start, 1)
    tests = list_tests(runner)
    if not tests:
        raise KtstrError(f"the sched_ext selftests runner {runner} lists no tests; see {log}")
    build = install_runner(entry, runner, tests, exact=exact, build_seconds=seconds)
    print(f"ktstr: built the sched_ext selftests runner ({len(tests)} tests) in {seconds:.0f} s",
          file=sys.stderr, flush=True)
    return build


def build_runner(src: Path, vmlinux: Path, work: Path, log: Path) -> tuple[Path, bool]:
    """``make`` the selftests out of tree into ``work``; (runner path, exact selection)."""
    tree = src / SELFTESTS_DIR
    clang = find_clang()
    work.mkdir(parents=True, exist_ok=True)
    exact = "scx_test_register" in (tree / "runner.c").read_text(errors="replace")
    cmd = ["make", "-C", str(tree), f"-j{jobs()}", f"CC={clang.name}", f"LLVM={clang.llvm}",
           f"O={work}", f"VMLINUX_BTF={vmlinux}"]
    runner = work / "runner"
    if exact:
        (work / "ktstr_select.c").write_text(SELECT_C.replace("@SELECT_ENV@", SELECT_ENV))
        (work / "ktstr.mk").write_text(WRAPPER_MK)
        cmd += ["-f", str(work / "ktstr.mk"), f"KTSTR_SELECT_SRC={work / 'ktstr_select.c'}"]
    # Relink every time: make does not know whether the last link was wrapped.
    runner.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    run_logged(cmd, log, what="building the sched_ext selftests", progress=None)
    if not runner.is_file():
        raise KtstrError(f"the sched_ext selftests build finished without {runner}; see {log}")
    return runner, exact


def list_tests(runner: Path, env: dict[str, str] | None = None) -> list[SelftestInfo]:
    """Every test ``runner`` registers, in its order, without running any (see module doc)."""
    try:
        proc = subprocess.run([str(runner), "-s", "-t", LIST_FILTER], capture_output=True,
                              text=True, errors="replace", timeout=LIST_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KtstrError(f"cannot list the tests of {runner}: {err}") from err
    if proc.returncode != 0:
        raise KtstrError(f"{runner} -s -t '\\n' exited with {proc.returncode}: "
                         f"{proc.stderr.strip()[-300:]}")
    return parse_listing(proc.stdout)


def install_runner(entry: KernelEntry, runner: Path, tests: Sequence[SelftestInfo], *,
                   exact: bool, build_seconds: float | None) -> RunnerBuild:
    """Store ``runner`` and its metadata in the entry: all of it appears at once, or none."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{SUBDIR}-tmp-", dir=entry.path))
    try:
        tmp.chmod(0o755)
        inner = tmp / SUITE
        inner.mkdir()
        cache._copy_synced(runner, inner / "runner")
        (inner / "runner").chmod(0o755)  # the guest execs it, whatever mode make left
        meta = {
            "format": BUILD_FORMAT, "suite": SUITE, "exact": exact,
            "runner": cache.describe_file(inner / "runner", stamped=False).to_json(),
            "tests": [{"name": t.name, "description": t.description} for t in tests],
            "build_seconds": build_seconds, "built_at": time.time(),
        }
        cache.write_json_atomic(inner / "build.json", meta)  # fsyncs the file and the dir
        cache._fsync_path(tmp)
        final = entry.path / SUBDIR
        cache.discard(final)
        os.rename(tmp, final)
        cache._fsync_path(entry.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    found = cached_runner(entry)
    if found is None:
        raise KtstrError(f"installing the selftests runner into {entry.path} failed")
    return found

