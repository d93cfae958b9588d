"""The host's TSC frequency, handed to the sandbox kernel as `tsc_early_khz=`.

Under QEMU TCG the guest's RDTSC reads the host's TSC, but microvm has no
HPET or ACPI PM timer to calibrate it against and PIT calibration fails under
emulation; the kernel then marks the TSC unstable and stalls. Telling it the
frequency (plus `tsc=reliable`) makes the TSC its clocksource from the start.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from collections.abc import Callable

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")


def _rdtsc_function() -> tuple[mmap.mmap, Callable[[], int]]:
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_RDTSC_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    return buf, fn


def measure_tsc_khz(interval_s: float = 0.05) -> int:
    """Count TSC ticks over a short wall-clock interval (best of three)."""
    buf, rdtsc = _rdtsc_function()
    try:
        rates = []
        for _ in range(3):
            t0 = time.perf_counter_ns()
            c0 = rdtsc()
            time.sleep(interval_s)
            c1 = rdtsc()
            t1 = time.perf_counter_ns()
            rates.append((c1 - c0) / (t1 - t0) * 1e6)  # ticks per ms = kHz
        rates.sort()
        return round(rates[1])  # the median rejects one preempted sample
    finally:
        del rdtsc
        buf.close()


def _cpuinfo_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, or None when it cannot be told."""
    try:
        khz = measure_tsc_khz()
    except (OSError, ValueError, TypeError):
        khz = 0
    if khz > 100_000:   # a sane x86 TSC runs at hundreds of MHz at least
        return khz
    return _cpuinfo_khz()
