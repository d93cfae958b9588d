"""The vm_tests matrix: nox listing -> CI matrix, skip rules, parallelism (the workflow:
test_workflow.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.gauntlet import Shard
from ktstr.paths import repo_root
from ktstr.reserve import HostTopology
from ktstr.sessions import vm

ROOT = repo_root()


def _nox_listing(*args: str) -> list[dict[str, object]]:
    if not shutil.which("nox"):
        pytest.skip("nox is not installed")
    out = subprocess.run(
        ["nox", "-l", "--json", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out))


def test_plain_vm_tests_selects_default_kernel_times_every_scheduler() -> None:
    default, _ = vm.catalog()
    listing = _nox_listing("-s", "vm_tests")
    assert [row["session"] for row in listing] == [
        vm.session_name(default, s) for s in vm.SCHEDULERS
    ]


def test_matrix_from_nox_listing_covers_every_combination() -> None:
    _, kernels = vm.catalog()
    proc = subprocess.run(
        f"nox -l --json -k vm_tests | {sys.executable} -m ktstr.sessions.vm matrix",
        shell=True, cwd=ROOT, capture_output=True, text=True, check=True,
    )
    matrix = json.loads(proc.stdout)
    assert matrix["session"] == [vm.session_name(k, s) for k, s in vm.combinations(kernels)]
    # Each entry is a session nox accepts by name.
    listing = _nox_listing("-s", matrix["session"][-1])
    assert [row["session"] for row in listing] == [matrix["session"][-1]]


def test_skip_rules() -> None:
    assert vm.skip_reason("6.12", "scx_qmap", ["6.12"]) is None
    reason = vm.skip_reason("6.1", "scx_simple", ["6.1"])
    assert reason and "no sched_ext" in reason
    assert vm.skip_reason("6.1", "eevdf", ["6.1"]) is None
    reason = vm.skip_reason("6.1", "eevdf", ["6.12"])
    assert reason and "KTSTR_VM_KERNELS" in reason
    assert vm.kernel_has_sched_ext("6.12") and not vm.kernel_has_sched_ext("6.1")
    assert vm.kernel_has_sched_ext("local") is None


def test_selected_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vm.VM_KERNELS_ENV, raising=False)
    assert vm.selected_kernels("6.12", ["6.12", "6.1"]) == ["6.12"]
    monkeypatch.setenv(vm.VM_KERNELS_ENV, "all")
    assert vm.selected_kernels("6.12", ["6.12", "6.1"]) == ["6.12", "6.1"]
    monkeypatch.setenv(vm.VM_KERNELS_ENV, "6.1, 6.12")
    assert vm.selected_kernels("6.12", ["6.12", "6.1"]) == ["6.1", "6.12"]


def _host(cpus: int, per_llc: int = 8) -> HostTopology:
    return HostTopology(tuple(tuple(range(i, min(i + per_llc, cpus)))
                              for i in range(0, cpus, per_llc)))


def test_parallel_jobs_are_what_reservations_fit() -> None:
    assert vm.parallel_jobs(_host(2), memory_mb=24576) == 1  # a 2-core machine: exactly one
    assert vm.parallel_jobs(_host(16), memory_mb=65536) == 8
    assert vm.parallel_jobs(_host(64), memory_mb=8192) == 4  # memory-bound
    assert vm.parallel_jobs(_host(1), memory_mb=512) == 1
    assert vm.parallel_jobs(_host(7, per_llc=3), memory_mb=65536) == 3
    assert vm.parallel_jobs(memory_mb=65536) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_gauntlet_plan_helper(tmp_path: Path) -> None:
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([
        {"name": "test_a", "duration_s": 1.0, "constraints": {}, "gauntlet": True},
        {"name": "test_b", "duration_s": 1.0, "constraints": {}, "gauntlet": False},
    ]))
    plan = tmp_path / "plan.json"
    assert vm.main(["plan", str(specs), str(plan), "--budget", "120"]) == 0
    rows = json.loads(plan.read_text())
    assert rows and {r["test"] for r in rows} == {"test_a"}
    assert sum(r["cost_s"] for r in rows) <= 120


def test_gauntlet_options() -> None:
    opts = vm.gauntlet_options(["--kernels", "6.12,6.1", "--shard", "2/3", "--", "-k", "x"],
                               "6.12")
    assert opts.kernels == ["6.12", "6.1"] and opts.shard == Shard(2, 3)
    assert opts.pytest_args == ["-k", "x"] and opts.budget is None
    plain = vm.gauntlet_options([], "6.12")
    assert plain.kernels == ["6.12"] and plain.shard is None
    assert vm.gauntlet_options(["--kernel", "6.6"], "6.12").kernels == ["6.6"]
    for spec in ("4/3", "0/2", "1/0", "a/b"):
        with pytest.raises(KtstrError, match="--shard") as info:
            vm.gauntlet_options(["--shard", spec], "6.12")
        assert "\n" not in str(info.value)
    with pytest.raises(KtstrError, match="not both"):
        vm.gauntlet_options(["--kernel", "6.6", "--kernels", "6.12"], "6.12")


def _plan(tmp_path: Path, name: str, *extra: str) -> list[dict[str, object]]:
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([
        {"name": f"test_{c}", "duration_s": 1.0, "constraints": {}, "gauntlet": True}
        for c in "abc"
    ]))
    plan = tmp_path / name
    assert vm.main(["plan", str(specs), str(plan), "--kernel", "6.12", "--kernel", "6.1",
                    *extra]) == 0
    rows: list[dict[str, object]] = json.loads(plan.read_text())
    per_kernel = [json.loads(vm.kernel_plan_path(plan, k).read_text()) for k in ("6.12", "6.1")]
    assert sorted(map(str, rows)) == sorted(map(str, per_kernel[0] + per_kernel[1]))
    assert {r["kernel"] for r in per_kernel[0]} <= {"6.12"}
    assert {r["kernel"] for r in per_kernel[1]} <= {"6.1"}
    return rows


def test_gauntlet_plan_helper_shards_and_kernels(tmp_path: Path) -> None:
    whole = _plan(tmp_path, "all.json", "--budget", "600")
    assert {r["kernel"] for r in whole} == {"6.12", "6.1"}
    assert {r["scheduler"] for r in whole if r["kernel"] == "6.1"} == {"eevdf"}
    parts = [_plan(tmp_path, f"s{i}.json", "--budget", "600", "--shard", f"{i}/3")
             for i in (1, 2, 3)]
    cells = [(r["kernel"], r["test"], r["scheduler"], r["profile"], r["preset"])
             for part in parts for r in part]
    assert len(cells) == len(set(cells)) == len(whole)
    assert set(cells) == {(r["kernel"], r["test"], r["scheduler"], r["profile"], r["preset"])
                          for r in whole}
    with pytest.raises(SystemExit):
        vm.main(["plan", str(tmp_path / "specs.json"), str(tmp_path / "x.json"),
                 "--shard", "1/0"])
