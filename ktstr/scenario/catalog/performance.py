"""Performance scenarios: real benchmarks as steps, and latency or throughput gates."""

from __future__ import annotations

from ktstr.scenario.catalog.base import Params, Scenario, even, one
from ktstr.scenario.model import CgroupDef, RunPayload, Step, WaitPayload
from ktstr.scenario.payload import CYCLICTEST, HACKBENCH, STRESS_NG_CPU
from ktstr.scenario.work import CpuSpin, FutexPingPong

_HACKBENCH = HACKBENCH.with_args("-g", "1", "-l", "50", "-s", "100")
_CYCLICTEST = CYCLICTEST.with_args("-q", "-D", "1", "-t", "2", "-i", "1000", "-h", "20000")
_STRESS = STRESS_NG_CPU.with_args("--cpu", "2", "--timeout", "1s", "--metrics-brief")


def _hackbench(p: Params) -> list[Step]:
    return [Step((*one(CgroupDef("spin", workers=max(1, p.w // 2)))[0].ops,
                  RunPayload(_HACKBENCH, wait=True)), hold=1.0)]


def _cyclictest(p: Params) -> list[Step]:
    return [Step((*one(CgroupDef("spin", workers=p.w))[0].ops, RunPayload(_CYCLICTEST)),
                 hold=0.9),
            Step((WaitPayload("cyclictest"),), hold=0.1)]


def _stress_ng(p: Params) -> list[Step]:
    return [Step((*one(CgroupDef("spin", workers=max(1, p.w // 2)))[0].ops,
                  RunPayload(_STRESS)), hold=0.9),
            Step((WaitPayload("stress-ng"),), hold=0.1)]


def _wake_latency(p: Params) -> list[Step]:
    return one(CgroupDef("pingpong", workers=even(p.w), work=FutexPingPong()))


def _throughput(p: Params) -> list[Step]:
    return one(CgroupDef("spin", workers=p.n, work=CpuSpin()))


ENTRIES = [
    Scenario("perf_hackbench", "performance", "hackbench (1 group, 50 loops) beside spinners",
             _hackbench, payloads=(_HACKBENCH,)),
    Scenario("perf_cyclictest", "performance", "cyclictest's timer wake-up latency under load",
             _cyclictest, payloads=(_CYCLICTEST,)),
    Scenario("perf_stress_ng_cpu", "performance", "stress-ng CPU stressors' bogo ops/s beside "
             "spinners", _stress_ng, payloads=(_STRESS,)),
    Scenario("perf_wake_latency", "performance", "futex ping-pong pairs: p99 wake latency "
             "under 50 ms", _wake_latency, {"wake_p99_us": 50_000.0}),
    Scenario("perf_throughput", "performance", "one spinner per CPU: work rates within a CV "
             "of 0.35", _throughput, {"throughput_cv": 0.35}),
]
