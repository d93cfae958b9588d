"""Configure and build a kernel out of tree (`make O=...`), output to a log file."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.kernel.kconfig import (
    KconfigIndex,
    Verification,
    parse_config,
    render_fragment,
    verify,
)
from ktstr.reap import pdeathsig_preexec

BASES = ("tinyconfig", "defconfig")
# Lines `make bzImage` prints for a fresh build, when no earlier log of the key exists
# (measured: tinyconfig + ktstr.kconfig on 6.12 prints ~2150).
DEFAULT_LINES = {"tinyconfig": 2200, "defconfig": 9000}
TAIL_LINES = 40


def jobs() -> int:
    return len(os.sched_getaffinity(0)) or 1


def run_logged(cmd: Sequence[str], log: Path, *, what: str, total: int | None = None,
               progress: bool | None = None, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> int:
    """Run `cmd`, appending its output to `log`; return the number of output lines.

    With a TTY, a tqdm bar counts output lines against `total`. On failure,
    KtstrError carries the last 40 lines of the log and its path. On any
    exception (Ctrl-C, SIGTERM) the whole make process group is stopped, so no
    orphaned compiler keeps writing into the build tree.
    """
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    count = 0
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", buffering=1) as out:  # line-buffered: `tail -f` works
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env, text=True,
                                errors="replace", start_new_session=True,
                                # if ktstr is killed outright, make gets SIGTERM
                                preexec_fn=pdeathsig_preexec(signal.SIGTERM))
        try:
            with tqdm(total=total, desc=what, unit="line", disable=not show,
                      leave=False) as bar:
                for line in proc.stdout or ():  # stdout=PIPE: never None
                    out.write(line)
                    tail.append(line.rstrip("\n"))
                    count += 1
                    bar.update(1)
            rc = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
    if rc != 0:
        lines = "\n".join(tail)
        raise KtstrError(f"{what} failed (exit {rc}); log: {log}; last {len(tail)} lines:\n"
                         f"{lines}")
    return count


def _stop_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def make(src: Path, out: Path, *targets: str, log: Path, what: str, total: int | None = None,
         progress: bool | None = False, parallel: bool = False) -> int:
    cmd = ["make", "-C", str(src), f"O={out}"]
    if parallel:
        cmd.append(f"-j{jobs()}")
    return run_logged([*cmd, *targets], log, what=what, total=total, progress=progress)


def configure(src: Path, out: Path, base: str, requested: dict[str, str | None],
              log: Path) -> Verification:
    """Base config + fragment options + olddefconfig, then verify the result.

    Appending the fragment to `.config` works because Kconfig takes the last
    assignment of a symbol (the same thing `merge_config.sh` relies on).
    """
    if base not in BASES:
        raise KtstrError(f"unknown base config {base!r}: use one of {', '.join(BASES)}")
    out.mkdir(parents=True, exist_ok=True)
    make(src, out, base, log=log, what=f"make {base}")
    config = out / ".config"
    with config.open("a") as fh:
        fh.write("\n# ktstr fragments\n" + render_fragment(requested))
    make(src, out, "olddefconfig", log=log, what="make olddefconfig")
    values = parse_config(config.read_text())
    return verify(requested, values, lambda: KconfigIndex(src))


def kernelrelease(src: Path, out: Path) -> str:
    proc = subprocess.run(["make", "-s", "-C", str(src), f"O={out}", "kernelrelease"],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("make")]
    if proc.returncode != 0 or not lines:
        raise KtstrError(f"`make kernelrelease` failed in {out}: {proc.stderr.strip()[-200:]}")
    return lines[-1].strip()


def previous_lines(log: Path) -> int | None:
    """How many lines the last `make bzImage` of this build tree printed."""
    with contextlib.suppress(OSError, ValueError):
        return int(log.read_text().strip())
    return None


def children_cpu() -> float:
    """CPU seconds (user + sys) of finished child processes: load-independent cost."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_bzimage(src: Path, out: Path, log: Path, *, base: str,
                  label: str) -> tuple[float, float]:
    """`make -jN bzImage`; returns (wall, CPU) seconds. Progress estimate from the last build."""
    count_file = out / ".ktstr-lines"
    estimate = previous_lines(count_file) or DEFAULT_LINES.get(base, 3000)
    start, cpu = time.monotonic(), children_cpu()
    lines = make(src, out, "bzImage", log=log, what=f"building {label}", total=estimate,
                 progress=None, parallel=True)
    seconds = time.monotonic() - start
    with contextlib.suppress(OSError):
        count_file.write_text(f"{lines}\n")
    return seconds, children_cpu() - cpu
