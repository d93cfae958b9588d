"""Work types: what a worker process does in its loop.

Each type is a frozen dataclass; ``run(rt)`` executes in the forked worker
and calls ``rt.tick()`` after every unit of work (that is the progress
checkpoint the gap and starvation checks use). ``make_shared`` runs in the
parent before the fork and builds what a batch of workers shares (pipes,
futex words, a lock file). Blocking waits poll ``rt.poll()`` at least every
50 ms so a stop request is honoured promptly. Parameters are validated at
construction (a KtstrError naming the work and the field).

One module per theme: :mod:`.base` (the base class, shared lines, pipe and CPU
helpers), :mod:`.cpu`, :mod:`.memory`, :mod:`.io`, :mod:`.wake` (pairs, rings,
queues), :mod:`.fanout` (one leader, N followers), :mod:`.events` (epoll,
signals), :mod:`.lock`, :mod:`.churn` (processes, nice, policy, affinity,
NUMA, cgroups, idle), :mod:`.rt` (real-time pressure), :mod:`.compose`.
"""

from __future__ import annotations

from ktstr.scenario.work.base import Work, spin
from ktstr.scenario.work.churn import (
    AffinityChurn,
    CgroupChurn,
    CrossAffinityChurn,
    ForkExit,
    IdleChurn,
    NiceSweep,
    NumaMigrationChurn,
    PolicyChurn,
)
from ktstr.scenario.work.compose import Custom, Sequence, Sleep
from ktstr.scenario.work.cpu import (
    AluHot,
    Bursty,
    CpuSpin,
    IpcVariance,
    Mixed,
    SmtSiblingSpin,
    YieldHeavy,
)
from ktstr.scenario.work.events import EpollStorm, SignalStorm
from ktstr.scenario.work.fanout import FanOutCompute, FutexFanOut, ThunderingHerd
from ktstr.scenario.work.io import IoConvoy, IoRandRead, IoSync
from ktstr.scenario.work.lock import MutexContention, PriorityInversion
from ktstr.scenario.work.memory import CachePressure, CacheYield, NumaWorkingSetSweep
from ktstr.scenario.work.rt import PreemptStorm, RtStarvation
from ktstr.scenario.work.wake import (
    AsymmetricWaker,
    CachePipe,
    FutexPingPong,
    PipeIo,
    ProducerConsumerImbalance,
    WakeChain,
)

WORK_TYPES: dict[str, type[Work]] = {
    cls.name: cls
    for cls in (
        CpuSpin, YieldHeavy, Mixed, IoSync, Bursty, PipeIo, FutexPingPong, CachePressure,
        ForkExit, NiceSweep, AffinityChurn, PolicyChurn, MutexContention, Sleep, Sequence, Custom,
        AluHot, SmtSiblingSpin, IpcVariance, IoRandRead, IoConvoy, IdleChurn, CacheYield,
        CachePipe, FutexFanOut, FanOutCompute, AsymmetricWaker, WakeChain, EpollStorm,
        ThunderingHerd, CrossAffinityChurn, NumaMigrationChurn, CgroupChurn,
        NumaWorkingSetSweep, PriorityInversion, ProducerConsumerImbalance, SignalStorm,
        PreemptStorm, RtStarvation,
    )
}
"""Work types by name (``Sequence`` and ``Custom`` need arguments)."""

__all__ = [
    "WORK_TYPES",
    "AffinityChurn",
    "AluHot",
    "AsymmetricWaker",
    "Bursty",
    "CachePipe",
    "CachePressure",
    "CacheYield",
    "CgroupChurn",
    "CpuSpin",
    "CrossAffinityChurn",
    "Custom",
    "EpollStorm",
    "FanOutCompute",
    "ForkExit",
    "FutexFanOut",
    "FutexPingPong",
    "IdleChurn",
    "IoConvoy",
    "IoRandRead",
    "IoSync",
    "IpcVariance",
    "Mixed",
    "MutexContention",
    "NiceSweep",
    "NumaMigrationChurn",
    "NumaWorkingSetSweep",
    "PipeIo",
    "PolicyChurn",
    "PreemptStorm",
    "PriorityInversion",
    "ProducerConsumerImbalance",
    "RtStarvation",
    "Sequence",
    "SignalStorm",
    "Sleep",
    "SmtSiblingSpin",
    "ThunderingHerd",
    "WakeChain",
    "Work",
    "YieldHeavy",
    "spin",
]
