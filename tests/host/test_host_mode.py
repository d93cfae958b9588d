"""Host mode for real: scenarios run on this machine in a ktstr-<pid> cgroup subtree.

Needs root and a cpuset cgroup controller (v1 or v2). Short runs only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktstr.checks import evaluate
from ktstr.errors import KtstrError
from ktstr.scenario.cgroups import cgroup_mounts
from ktstr.scenario.host import host_session, run_host
from ktstr.scenario.model import CgroupDef, CpusetSpec, SetCpuset, Step
from ktstr.scenario.runner import Runner, ScenarioContext, execute_steps

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup_mounts() == (None, None),
    reason="host mode needs root and a cpuset cgroup controller",
)


def _base() -> str:
    v2, v1 = cgroup_mounts()
    return str(v2 or v1)


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _in_group(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_fifo_hog_starves_a_cgroup_on_its_cpu() -> None:
    (res,) = run_host(["fifo_hog_starvation"], duration=3.0)
    starvation = next(c for c in res.checks if c["name"] == "starvation")
    assert not starvation["passed"], starvation
    assert starvation["cgroup"] == "victims"
    assert "victims[" in starvation["message"]
    victims = [w for w in res.workers if w.cgroup == "victims"]
    hog = next(w for w in res.workers if w.cgroup == "hog")
    assert len(victims) == 2
    assert all(v.cpu_share < 0.10 for v in victims)
    assert hog.cpu_share > 0.5 and hog.policy == "fifo:10"
    assert not res.passed
    assert not any(n.startswith("ktstr-") for n in os.listdir(_base()))
    assert _children_of(os.getpid()) == []


def test_worker_moved_outside_its_cpuset_is_reported() -> None:
    with host_session() as s:
        if s.topology.nr_cpus < 2:
            pytest.skip("needs two CPUs")
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids)
        runner = Runner(ctx, "inject")
        try:
            runner.add(CgroupDef("a", CpusetSpec.exact([0]), workers=1))
            runner.add(CgroupDef("b", CpusetSpec.exact([1]), workers=0))
            runner.hold(0.3)
            victim = runner.live[0]
            runner.backend.attach("b", victim.pid)  # behind the runner's back
            runner.hold(0.5)
            res = runner.finish()
        finally:
            runner.close()
    iso = next(r for r in evaluate(res) if r.name == "isolation")
    assert not iso.passed
    cpu1 = s.cpu_ids[1]
    assert iso.message == (f"worker a[0] pid {victim.pid} in cgroup a ran on CPU {cpu1} "
                           f"outside its cpuset {s.cpu_ids[0]}")


def test_fair_steady_passes_20_of_20() -> None:
    failures = []
    for _ in range(20):
        (res,) = run_host(["steady"], duration=2.0)
        if not res.passed:
            failures.append([c["message"] for c in res.checks if not c["passed"]])
    assert failures == []


def test_midrun_cpuset_change_keeps_isolation() -> None:
    (res,) = run_host(["cpuset_swap_midrun"], duration=1.5)
    iso = next(c for c in res.checks if c["name"] == "isolation")
    assert iso["passed"], iso["message"]
    assert sum(w.work_units for w in res.workers) > 0


def test_exception_midrun_cleans_up() -> None:
    with pytest.raises(KtstrError, match="no cgroup 'missing'"), host_session() as s:
        root = s.root
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids)
        execute_steps(ctx, [Step(), Step((SetCpuset("missing", CpusetSpec.all()),))],
                      setup=[CgroupDef("a", workers=2)])
    assert not os.path.exists(root)
    assert _children_of(os.getpid()) == []


def _cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ktstr", *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw,  # type: ignore[call-overload]
    )


def test_cli_run_steady_json() -> None:
    p = _cli("run", "steady", "--duration", "3", "--json")
    out, err = p.communicate(timeout=60)
    assert p.returncode in (0, 1), err
    data = json.loads(out)
    (sc,) = data["scenarios"]
    assert data["passed"] == sc["passed"] == (p.returncode == 0)
    assert {c["name"] for c in sc["cgroups"]} == {"cg0", "cg1"}
    assert all(w["work_units"] > 0 and w["cpu_ns"] > 0 and w["cpus_used"] for w in sc["workers"])
    assert not os.path.exists(os.path.join(_base(), f"ktstr-{p.pid}"))


def test_cli_errors_are_one_line_exit_2() -> None:
    for args, needle in ((["run", "nosuch"], "no scenario named 'nosuch'"),
                         (["run", "steady", "--cpuset", "llc:5"], "no LLC 5")):
        p = _cli(*args)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 2
        assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_subtree_and_reaps_workers(sig: signal.Signals) -> None:
    p = _cli("run", "oversubscribed", "--duration", "30")
    root = os.path.join(_base(), f"ktstr-{p.pid}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(_in_group(p.pid)) < 5:
        time.sleep(0.1)
    assert os.path.isdir(root), "the run should have created its cgroup subtree"
    assert len(_in_group(p.pid)) >= 5, "workers should be running"
    p.send_signal(sig)
    p.communicate(timeout=30)
    assert p.returncode == 130
    assert not os.path.exists(root)
    time.sleep(0.2)
    assert _in_group(p.pid) == []
