"""``ktstr stats compare``: Welch's t-test over repeats, gates, refusals, bad input."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from stats_sidecars import Dist, plan, record, write_run

from ktstr.errors import KtstrError
from ktstr.results.cli import register
from ktstr.results.compare import Status, compare_runs, compare_samples
from ktstr.results.metrics import METRICS
from ktstr.results.sidecar import dilation_record, load_run

N = 10


def stats(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["stats", *argv])
    return int(args.func(args))


def runs(tmp_path: Path, a: Dist, b: Dist, n_a: int = N, n_b: int = N, seed: int = 1,
         tests: tuple[str, ...] = ("t::a", "t::b")) -> None:
    rng = random.Random(seed)
    write_run(tmp_path, "a", [record(plan(t), rng, a, n_a) for t in tests])
    write_run(tmp_path, "b", [record(plan(t), rng, b, n_b) for t in tests])


# Arbitrary seeds; at alpha 0.05 an A/A pair is flagged now and then (seed 1 here is such
# a pair: a -11.8% draw at p=0.047), so the false-alarm *rate* is tested below as well.
@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_aa_same_distribution_reports_no_regression(
    tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    runs(tmp_path, Dist(), Dist(), seed=seed)
    assert stats(["--root", str(tmp_path), "compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert " 0 regression(s)" in out and "FAIL" not in out
    # The noise is real: run against run (the first repeats alone), the gates would be
    # comparing single draws 15% apart (sd); the repeats' means are what keeps this quiet.
    cmp = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    rates = [r for r in cmp.results if r.metric.name == "work_rate.sum"]
    assert len(rates) == 2 and all(r.a and r.a.n == N and r.a.stddev > 0 for r in rates)


def test_single_draws_of_the_same_distribution_would_cry_wolf() -> None:
    # Why repeats: one run against one run of the same noise (sd 15%) crosses a 10% gate
    # often; over the same draws the t-test on ten repeats does not.
    rng = random.Random(7)
    metric = METRICS["work_rate.sum"]
    draws = [[rng.gauss(1000.0, 150.0) for _ in range(N)] for _ in range(20)]
    single = [compare_samples("k", metric, [a[0]], [b[0]]).status
              for a, b in zip(draws[::2], draws[1::2], strict=True)]
    tested = [compare_samples("k", metric, a, b).status
              for a, b in zip(draws[::2], draws[1::2], strict=True)]
    assert single.count(Status.REGRESSED) >= 2
    assert Status.REGRESSED not in tested


def test_false_alarm_and_detection_rates() -> None:
    rng = random.Random(11)
    metric = METRICS["work_rate.sum"]

    def flagged(shift: float, pairs: int = 200) -> float:
        hits = 0
        for _ in range(pairs):
            a = [rng.gauss(1000.0, 150.0) for _ in range(N)]
            b = [rng.gauss(1000.0 * shift, 150.0) for _ in range(N)]
            hits += compare_samples("k", metric, a, b).status is Status.REGRESSED
        return hits / pairs

    # Same distribution: regressions only at well under alpha (one tail, and the gate).
    assert flagged(1.0) <= 0.05
    # 30% less work, same noise: nearly always caught.
    assert flagged(0.7) >= 0.95


def test_shifted_distribution_is_a_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs(tmp_path, Dist(), Dist(work_rate=700.0))  # 30% less work, same noise
    assert stats(["--root", str(tmp_path), "compare", "a", "b"]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "REGRESSION" in line]
    assert any(line.lstrip().startswith("work_rate.min") for line in flagged), out
    assert all("p=" in line for line in flagged)
    assert "FAIL: " in out and "significant regression(s) >= --fail-threshold 1" in out
    cmp = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    reg = {r.metric.name for r in cmp.regressions}
    assert {"work_rate.min", "work_rate.sum", "work_units.sum"} <= reg
    assert all(r.p_value is not None and r.p_value < 0.05 for r in cmp.regressions)
    assert not {"max_gap_ms.max", "boot_ms"} & reg
    # The same runs the other way round: improvements, exit 0.
    assert stats(["--root", str(tmp_path), "compare", "b", "a"]) == 0
    # A high --fail-threshold lets them pass, unless a listed metric regressed.
    root = ["--root", str(tmp_path), "compare", "a", "b", "--fail-threshold", "100"]
    assert stats(root) == 0
    assert stats([*root, "--must-not-regress", "max_gap_ms.max"]) == 0
    assert stats([*root, "--must-not-regress", "max_gap_ms.max,work_rate.min"]) == 1
    assert "--must-not-regress metric(s) regressed: work_rate.min" in capsys.readouterr().out
    # --threshold is the relative gate of every metric: 60% hides a 30% drop (38% in
    # these draws).
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--threshold", "60"]) == 0
    # --abs sets an absolute gate by name fragment.
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--abs", "work_=1e9"]) == 0


def test_compare_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs(tmp_path, Dist(), Dist(work_rate=700.0))
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    row = next(m for m in data["metrics"] if m["metric"] == "work_rate.min")
    assert row["status"] == "regressed" and row["a"]["n"] == N and row["p_value"] < 0.05
    assert data["failures"]


def test_zero_variance() -> None:
    metric = METRICS["migrations.sum"]
    same = compare_samples("k", metric, [12.0] * 5, [12.0] * 5)
    assert same.status is Status.UNCHANGED and "zero variance" in same.note
    # Exactly 500 more migrations every time: a change without noise is significant.
    moved = compare_samples("k", metric, [12.0] * 5, [512.0] * 5)
    assert moved.status is Status.REGRESSED and moved.p_value == 0.0
    # Zero variance on one side only: Welch's test copes.
    one = compare_samples("k", metric, [12.0] * 5, [500.0, 520.0, 510.0, 505.0, 515.0])
    assert one.status is Status.REGRESSED and one.p_value is not None and 0 < one.p_value < 0.05


def test_one_run_falls_back_to_the_gates_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs(tmp_path, Dist(work_sd=0.0), Dist(work_rate=700.0, work_sd=0.0), n_a=1, n_b=5)
    assert stats(["--root", str(tmp_path), "compare", "a", "b"]) == 1
    out = capsys.readouterr().out
    assert "N=1 in A: gates only, no significance test" in out
    assert "judged by the gates alone" in out
    r = compare_samples("k", METRICS["wall_s"], [5.0], [5.1])
    assert r.status is Status.UNCHANGED and r.p_value is None
    assert r.note.startswith("N=1 in A and B")


def test_missing_on_one_side_is_not_comparable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs(tmp_path, Dist(), Dist(wake_us=None), n_a=3, n_b=3)
    assert stats(["--root", str(tmp_path), "compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.lstrip().startswith("wake_latency_p99_us.max"))
    assert "not comparable" in line and "missing in B" in line


def test_no_common_tests_is_one_line(tmp_path: Path) -> None:
    rng = random.Random(3)
    write_run(tmp_path, "a", [record(plan("t::a"), rng, Dist(), 2)])
    write_run(tmp_path, "b", [record(plan("t::b"), rng, Dist(), 2)])
    for force in ([], ["--force"]):
        with pytest.raises(KtstrError, match="no test in common") as err:
            stats(["--root", str(tmp_path), "compare", "a", "b", *force])
        assert "\n" not in str(err.value)


def test_different_tests_or_topologies_need_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(4)
    write_run(tmp_path, "a", [record(plan("t::a"), rng, Dist(), 3),
                              record(plan("t::b"), rng, Dist(), 3)])
    write_run(tmp_path, "b", [record(plan("t::a"), rng, Dist(), 3)])
    write_run(tmp_path, "c", [record(plan("t::a", topology="1n1l2c1t"), rng, Dist(), 3),
                              record(plan("t::b"), rng, Dist(), 3)])
    with pytest.raises(KtstrError, match=r"1 result\(s\) only in A .*--force"):
        stats(["--root", str(tmp_path), "compare", "a", "b"])
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--force"]) == 0
    assert "t::b [eevdf@default 1n2l2c1t]: only in A" in capsys.readouterr().out
    with pytest.raises(KtstrError, match=r"other topologies .*1n2l2c1t vs 1n1l2c1t"):
        stats(["--root", str(tmp_path), "compare", "a", "c"])
    assert stats(["--root", str(tmp_path), "compare", "a", "c", "--force"]) in (0, 1)
    assert "topology 1n2l2c1t (A) vs 1n1l2c1t (B)" in capsys.readouterr().out


def test_two_schedulers_pair_by_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(5)
    write_run(tmp_path, "a", [record(plan("t::a"), rng, Dist(), 3)])
    write_run(tmp_path, "b", [record(plan("t::a", scheduler="scx_simple"), rng, Dist(), 3)])
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--all"]) == 0
    assert "t::a [scx_simple@default 1n2l2c1t]" in capsys.readouterr().out


def test_host_context_differences_are_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(6)
    write_run(tmp_path, "a", [record(plan("t::a"), rng, Dist(), 2)])
    other = record(plan("t::a", key="k2"), rng, Dist(), 2)
    other["host"] = {**other["host"], "cpu_model": "Other CPU", "loadavg": [7.5, 7.0, 6.0]}
    write_run(tmp_path, "b", [other])
    stats(["--root", str(tmp_path), "compare", "a", "b"])
    out = capsys.readouterr().out
    assert "context differs: host CPU: " in out and "vs Other CPU (B)" in out
    assert "context differs: kernel cache key: k1 (A) vs k2 (B)" in out
    assert "B 7.50..7.50" in out
    assert "ktstr version" not in out  # the same on both sides


def test_dilation_is_shown_and_a_difference_that_confounds_is_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(7)
    quiet, busy, similar = (record(plan("t::a"), rng, Dist(), 2) for _ in range(3))
    quiet["dilation"] = dilation_record([0.01, 0.03])
    busy["dilation"] = dilation_record([0.30, None])
    similar["dilation"] = dilation_record([0.05, 0.07])
    for name, rec in (("q", quiet), ("b", busy), ("s", similar)):
        write_run(tmp_path, name, [rec])
    stats(["--root", str(tmp_path), "compare", "q", "b"])
    out = capsys.readouterr().out
    assert "vCPU dilation (host time runnable, not running): A 2.0%, B 30.0%" in out
    assert "warning: the runs' vCPU dilation differs by 28.0 points" in out
    stats(["--root", str(tmp_path), "compare", "q", "s"])
    out = capsys.readouterr().out
    assert "A 2.0%, B 6.0%" in out and "warning: the runs' vCPU dilation" not in out


def test_dilation_record() -> None:
    assert dilation_record([]) is None and dilation_record([None]) is None
    assert dilation_record([0.1, None, 0.3]) == {"per_vcpu": [0.1, None, 0.3], "mean": 0.2,
                                                 "max": 0.3}


def test_old_single_run_sidecar_compares_with_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before repeats and the host block: what a sidecar of the previous schema held.
    rng = random.Random(8)
    old = record(plan("t::a"), rng, Dist(), 1)
    del old["host"]
    assert "repeats" not in old
    write_run(tmp_path, "a", [old])
    write_run(tmp_path, "b", [record(plan("t::a"), rng, Dist(), 4)])
    assert stats(["--root", str(tmp_path), "compare", "a", "b", "--all"]) == 0
    out = capsys.readouterr().out
    assert "host CPU: not recorded (A)" in out and "(n=4)" in out and "N=1 in A" in out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not a readable sidecar"),
        (b'{"test": "t::a", "repeats": {"a": 1}}', "'repeats' must be a list of objects"),
        (b'{"test": "t::a", "repeats": [{"summary": 3}]}', r"repeats\[1\].summary must be"),
        (b'{"test": "t::a", "host": []}', "'host' must be an object"),
        (b'{"test": "t::a", "timings": {"total_wall_s": "x"}}', "total_wall_s must be"),
    ],
)
def test_corrupt_sidecar_is_a_clear_error(tmp_path: Path, content: bytes, reason: str) -> None:
    rng = random.Random(9)
    write_run(tmp_path, "a", [record(plan("t::a"), rng, Dist(), 2)])
    bad = write_run(tmp_path, "b", [record(plan("t::a"), rng, Dist(), 2)]) / "zz-bad.json"
    bad.write_bytes(content)
    with pytest.raises(KtstrError, match=reason) as err:
        stats(["--root", str(tmp_path), "compare", "a", "b"])
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alpha", "0"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--fail-threshold", "0"], "--fail-threshold"),
        (["--must-not-regress", "work_rate"], "unknown metric 'work_rate'; known: work_rate.min"),
        (["--threshold", "nan"], "--threshold"),
    ],
)
def test_bad_options(tmp_path: Path, argv: list[str], message: str) -> None:
    runs(tmp_path, Dist(), Dist(), n_a=2, n_b=2)
    with pytest.raises(KtstrError, match=message):
        stats(["--root", str(tmp_path), "compare", "a", "b", *argv])


def test_show_says_what_the_host_gave(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = record(plan("t::a"), random.Random(9), Dist(), 1)
    rec["dilation"] = dilation_record([0.02, 0.04])
    rec["performance"] = {"pinned": [2, 3], "memory": "4k", "huge_kb": None, "fifo": [False],
                          "disabled_exits": ["hlt"], "hints_realtime": True,
                          "missing": ["2 MB pages: transparent hugepages are off"]}
    write_run(tmp_path, "a", [rec])
    assert stats(["--root", str(tmp_path), "show", "a"]) == 0
    out = capsys.readouterr().out
    assert "host: vCPU dilation 3.0% mean, 4.0% max; performance mode: pinned to CPUs [2, 3]" \
        in out
    assert "not given: 2 MB pages: transparent hugepages are off" in out
    rec["overhead"] = {"harness_cpu_ms": 504.3, "harness_cpu_pct": 19.5, "harness_pid": 1,
                       "steal_pct": {"0": 48.2, "1": 50.4}}
    write_run(tmp_path, "b", [rec])
    assert stats(["--root", str(tmp_path), "show", "b"]) == 0
    assert "; guest steal 48-50% per CPU; harness 20% of one CPU" in capsys.readouterr().out
