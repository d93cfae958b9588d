"""`ktstr boot` input validation and report parsing (no VM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ktstr import initramfs
from ktstr.boot import (
    build_initramfs,
    parse_report,
    topology_mismatches,
    topology_seen,
)
from ktstr.topology import Topology


def run_boot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktstr", "boot", "--sandbox", "never", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kernel", "/nonexistent/bzImage"], "no such file"),
        (["--kernel", __file__], "not a bzImage"),
        (["--kernel", __file__, "--topology", "3n2l1c1t"], "multiple of numa_nodes"),
        (["--kernel", __file__, "--memory-mb", "16"], "too small"),
        (["--kernel", __file__, "--topology", "2n2l1c1t", "--memory-mb", "1025"], "divide"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    proc = run_boot(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kernel", __file__, "--memory-mb", "16"], "--memory-mb 16 is too small"),
        (["--kernel", __file__, "--topology", "3n2l1c1t"], "multiple of numa_nodes"),
        (["--kernel", "/nonexistent/bzImage"], "no such file"),
    ],
)
def test_boot_and_shell_start_alike(args: list[str], needle: str) -> None:
    """One body starts both commands: the same bad input gets the same one-line error."""
    errors = []
    for command, extra in (("boot", []), ("shell", ["--exec", "true"])):
        proc = subprocess.run(
            [sys.executable, "-m", "ktstr", command, "--sandbox", "never", *args, *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 2, proc.stderr
        errors.append(proc.stderr.strip())
    assert errors[0] == errors[1] and needle in errors[0]


def test_report_parsing_and_comparison() -> None:
    topo = Topology.parse("1n2l1c2t")
    lines = ['[    1.0] KTSTR-REPORT {"kernel":"6.12","online":"0-3","sched_ext":"yes"}']
    for c in range(4):
        llc = topo.cpus_in_llc(c // 2)
        sib = ",".join(map(str, topo.siblings(c)))
        lines.append(
            f'KTSTR-REPORT-CPU {{"cpu":"{c}","package":"0","siblings":"{sib}",'
            f'"llc":"{llc[0]}-{llc[-1]}","apic":"{c}"}}\r'
        )
    lines += ['KTSTR-REPORT-NODE {"node":"0","cpus":"0-3"}', "noise", "KTSTR-REPORT-END"]
    report = parse_report("\n".join(lines))
    assert report is not None
    seen = topology_seen(report)
    assert seen.cpus == 4 and seen.siblings == [[0, 1], [2, 3]] and seen.llcs == [[0, 1], [2, 3]]
    assert seen.nodes == [[0, 1, 2, 3]]
    assert topology_mismatches(seen, topo) == []
    assert topology_mismatches(seen, Topology.parse("1n1l4c1t"))
    assert parse_report("\n".join(lines[:-1])) is None  # no END line: incomplete
    assert parse_report(b"garbage") is None


def test_builtin_initramfs_has_init_and_busybox(tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static not installed")
    path = build_initramfs(tmp_path / "i.cpio")
    names = {e.name for e in initramfs.decode_newc(path.read_bytes())}
    assert {"init", "bin/busybox", "dev/console"} <= names
