"""Tiny hand-assembled real-mode guests through /dev/kvm (no kernel; fine on a slow KVM).

Each test checks the exit dispatch end to end and that teardown leaves no
vCPU thread and no fd behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.probe import measure_guest_mips
from ktstr.vmm import kvm
from ktstr.vmm.machine import Machine
from ktstr.vmm.memory import thp_unavailable
from ktstr.vmm.performance import Performance
from ktstr.vmm.vcpu import MAX_EXIT_SITES, SITE_OTHER, SITE_QUEUED_OUT

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm"),
]

LOAD = 0x1000


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def pio_read(self, port: int, size: int) -> bytes:
        self.log.append(("in", port, size))
        return b"\x5a" * size

    def pio_write(self, port: int, data: bytes) -> None:
        self.log.append(("out", port, data))

    def mmio_read(self, offset: int, size: int) -> bytes:
        self.log.append(("read", offset, size))
        return bytes(range(0x40, 0x40 + size))

    def mmio_write(self, offset: int, data: bytes) -> None:
        self.log.append(("write", offset, data))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    fds, threads = _fds(), set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= threads, "a vCPU thread survived"
    assert _fds() == fds, "an fd leaked"


def real_mode(code: bytes, *, irqchip: bool = False, cs: int = 0, rip: int = LOAD,
              ram: int = 0x10000, performance: Performance | None = None) -> Machine:
    machine = Machine([(0, ram)], irqchip=irqchip, performance=performance)
    assert machine.memory is not None
    machine.memory.write(LOAD, code)
    vcpu = machine.add_vcpu(0)
    sregs = vcpu.fd.get_sregs()
    sregs.cs.base, sregs.cs.selector = cs << 4, cs
    vcpu.fd.set_sregs(sregs)
    regs = kvm.kvm_regs()
    regs.rip, regs.rflags = rip, 2
    vcpu.fd.set_regs(regs)
    return machine


def test_out_reaches_the_pio_device() -> None:
    # mov dx, 0x3f9; mov al, 0x42; out dx, al; mov ax, 0x1234; out dx, ax; in al, dx; hlt
    code = bytes.fromhex("BAF903B042EEB83412EFECF4")
    rec, other = Recorder(), Recorder()
    with real_mode(code) as m:
        m.pio.add(0x3F8, 8, rec)
        m.pio.add(0x2F8, 8, other)
        out = m.run(10)
    assert out.reason == "halted" and out.error is None
    assert rec.log == [("out", 0x3F9, b"\x42"), ("out", 0x3F9, b"\x34\x12"), ("in", 0x3F9, 1)]
    assert other.log == []
    assert out.exit_counts[0]["io"] == 3


def test_string_out_delivers_each_element() -> None:
    # mov si, 0x1100; mov cx, 3; mov dx, 0x80; rep outsb; hlt
    code = bytes.fromhex("BE0011B90300BA8000F36EF4")
    rec = Recorder()
    with real_mode(code) as m:
        assert m.memory is not None
        m.memory.write(0x1100, b"abc")
        m.pio.add(0x80, 1, rec)
        out = m.run(10)
    assert out.error is None
    assert [entry[2] for entry in rec.log] == [b"a", b"b", b"c"]


def test_mmio_write_and_read_reach_the_device_at_its_offset() -> None:
    # mov ax, 0x2000; mov ds, ax; mov byte [0x10], 0x5a; mov al, [0x14]; out 0x80, al;
    # mov al, [0x800]; out 0x81, al; hlt      (0x20010 is inside the device, 0x20800 is not)
    code = bytes.fromhex("B800208ED8C60610005AA01400E680A00008E681F4")
    rec, port = Recorder(), Recorder()
    with real_mode(code) as m:
        m.mmio.add(0x20000, 0x100, rec)
        m.pio.add(0x80, 2, port)
        out = m.run(10)
    assert out.error is None
    assert rec.log == [("write", 0x10, b"\x5a"), ("read", 0x14, 1)]
    # the device's byte came back; an unclaimed address reads as all ones
    assert port.log == [("out", 0x80, b"\x40"), ("out", 0x81, b"\xff")]


def test_hlt_ends_the_run() -> None:
    with real_mode(bytes.fromhex("F4")) as m:
        out = m.run(10)
    assert out.reason == "halted"
    assert out.exit_counts == [{"hlt": 1}]
    assert not out.timed_out


@pytest.mark.parametrize("irqchip", [False, True])
def test_spinning_guest_is_stopped_by_the_timeout(irqchip: bool) -> None:
    start = time.monotonic()
    with real_mode(bytes.fromhex("EBFE"), irqchip=irqchip) as m:  # jmp $
        out = m.run(1.0)
    elapsed = time.monotonic() - start
    assert out.timed_out and out.reason == "timeout"
    assert 1.0 <= elapsed < 3.0


def test_a_vcpu_sharing_its_host_cpu_is_dilated() -> None:
    # The vCPU thread inherits the main thread's affinity: put it on one host CPU with a
    # spinning process; a halted vCPU sleeps, so it never waits runnable.
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        os.sched_setaffinity(0, {cpu})
        with real_mode(bytes.fromhex("EBFE")) as m:  # jmp $
            shared = m.run(1.5)
    finally:
        spinner.kill()
        spinner.wait()
        os.sched_setaffinity(0, saved)
    # cli; hlt under the in-kernel irqchip: the thread sleeps in KVM for the whole second.
    with real_mode(bytes.fromhex("FAF4"), irqchip=True) as m:
        alone = m.run(1.0)
    assert shared.timed_out and len(shared.vcpu_dilation) == 1
    assert shared.vcpu_dilation[0] is not None and shared.vcpu_dilation[0] > 0.25, shared
    assert alone.duration_s >= 0.9
    assert alone.vcpu_dilation[0] is not None and alone.vcpu_dilation[0] < 0.05, alone


def test_performance_mode_pins_the_vcpu_and_backs_ram_with_huge_pages() -> None:
    cpu = max(os.sched_getaffinity(0))
    perf = Performance(cpus=(cpu,), hugepages=True, fifo=True)
    seen: dict[str, str] = {}

    def look(m: Machine) -> None:
        time.sleep(0.3)
        tid = m.vcpus[0].thread.native_id  # type: ignore[union-attr]
        for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            seen[key] = value.strip()
        seen["policy"] = str(os.sched_getscheduler(tid))

    with real_mode(bytes.fromhex("EBFE"), ram=32 << 20, performance=perf) as m:
        assert m.memory is not None
        m.memory.write(8 << 20, b"\1" * (8 << 20))  # touched: faulted in as huge pages
        watcher = threading.Thread(target=look, args=(m,))
        watcher.start()
        out = m.run(1.0)
        watcher.join()
    assert seen["Cpus_allowed_list"] == str(cpu)
    assert seen["policy"] == str(os.SCHED_FIFO)
    applied = out.performance
    assert applied is not None and applied.pinned == [cpu] and applied.fifo == [True]
    if thp_unavailable() is None:
        assert applied.memory == "thp" and applied.huge_kb and applied.huge_kb >= 4096, applied
    else:
        assert applied.memory == "4k" and any("2 MB pages" in x for x in applied.missing)
    # HLT/PAUSE exits: either disabled, or the reason this KVM could not is recorded.
    for name in ("hlt", "pause"):
        assert name in applied.disabled_exits or any(
            x.startswith(f"{name} exits") or x.startswith("hlt/pause") for x in applied.missing)


def test_performance_mode_refuses_more_vcpus_than_cpus() -> None:
    with pytest.raises(KtstrError, match=r"4 vCPUs cannot be pinned one per host CPU on the 2"):
        Performance(cpus=(0, 1)).check_fits(4)
    with pytest.raises(KtstrError, match="distinct host CPUs"):
        Performance(cpus=(1, 1))


def test_guest_spinning_with_interrupts_off_is_detected_as_hung() -> None:
    # cli; jmp $ -- with the in-kernel irqchip its timer keeps firing, but nothing is
    # delivered, no port is touched, nothing is printed: hung, long before the timeout.
    start = time.monotonic()
    with real_mode(bytes.fromhex("FAEBFE"), irqchip=True) as m:
        out = m.run(60.0, stall_s=1.5)
    elapsed = time.monotonic() - start
    assert out.reason == "hung" and not out.timed_out
    assert 1.5 <= elapsed < 6.0
    assert "no guest progress for 1.5 s" in out.detail
    assert "vcpu 0: io_exits=0" in out.detail  # the counters that were looked at
    assert len(out.vcpu_states) == 1
    state = out.vcpu_states[0]
    assert "if=off" in state and "rip=1001" in state and "last exits: none" in state


def test_a_guest_doing_port_io_is_not_hung() -> None:
    # mov dx, 0x80; L: out dx, al; jmp L -- busy, so only the timeout ends it.
    rec = Recorder()
    with real_mode(bytes.fromhex("BA8000EEEBFD"), irqchip=True) as m:
        m.pio.add(0x80, 1, rec)
        out = m.run(3.0, stall_s=1.0)
    assert out.reason == "timeout" and out.timed_out
    assert rec.log and rec.log[0][0] == "out"
    assert "last exits: out 0x80" in out.vcpu_states[0]
    assert "rip=100" in out.vcpu_states[0]


def test_timeout_works_from_a_non_main_thread() -> None:
    results: list[tuple[str, float]] = []

    def body() -> None:
        start = time.monotonic()
        with real_mode(bytes.fromhex("EBFE"), irqchip=True) as m:
            out = m.run(0.5)
        results.append((out.reason, time.monotonic() - start))

    worker = threading.Thread(target=body)
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert results and results[0][0] == "timeout" and results[0][1] < 2.5


def test_fetch_from_mmio_is_an_internal_error_with_a_diagnostic() -> None:
    # CS base 0x10000 is beyond the 64 KiB of RAM: KVM cannot fetch the first instruction.
    with real_mode(bytes.fromhex("EBFE"), cs=0x1000) as m:
        out = m.run(10)
    assert out.reason == "error"
    assert out.error is not None
    assert "KVM_EXIT_INTERNAL_ERROR" in out.error
    assert "rip=1000" in out.error and "cs=1000 base=10000" in out.error


def test_device_exception_drops_the_access_and_the_guest_runs_on(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def pio_read(self, port: int, size: int) -> bytes:
            raise ValueError("device exploded")

        def pio_write(self, port: int, data: bytes) -> None:
            raise ValueError("device exploded")

    # out 0x80, al; in al, 0x80; out 0x81, al (the value read); mov dx, 0x80; rep outsb
    # (3 bytes); hlt
    code = bytes.fromhex("B042E680E480E681BE0011B90300BA8000F36EF4")
    rec = Recorder()
    with real_mode(code) as m:
        m.pio.add(0x80, 1, Broken())
        m.pio.add(0x81, 1, rec)
        out = m.run(10)
    assert out.reason == "halted" and out.error is None
    assert rec.log == [("out", 0x81, b"\xff")]  # the failed read answered all ones
    assert out.device_errors == {"Broken pio 0x80": 5}
    assert "ValueError: device exploded" in out.device_error_messages[0]
    assert [r.name for r in caplog.records] == ["ktstr.vmm.bus"]  # logged once
    assert "Traceback" not in capsys.readouterr().err


def test_exit_sites_are_bounded_per_vcpu() -> None:
    # mov cx, 1000; mov dx, 0x1000; L: in al, dx; inc dx; loop L; hlt
    code = bytes.fromhex("B9E803BA0010EC42E2FCF4")
    with real_mode(code) as m:
        out = m.run(30)
    assert out.reason == "halted" and out.error is None
    sites = out.site_counts[0]
    assert len(sites) == MAX_EXIT_SITES + 1
    assert sites[SITE_OTHER] == 1000 - MAX_EXIT_SITES


def test_triple_fault_is_a_reboot() -> None:
    # Long mode with an empty page table and no IDT: the first fetch page-faults, the
    # fault cannot be delivered, the double fault neither -> shutdown (triple fault).
    with real_mode(bytes.fromhex("EBFE")) as m:
        fd = m.vcpus[0].fd
        sregs = fd.get_sregs()
        sregs.cr0 |= 0x80000001
        sregs.cr3 = 0x2000  # zeroed RAM: nothing is present
        sregs.cr4 |= 0x20
        sregs.efer = 0x500
        sregs.cs.l = 1
        fd.set_sregs(sregs)
        out = m.run(10)
    assert out.reason == "reboot", out
    assert "triple fault" in out.detail and "last exits:" in out.detail
    # Either the state at the fault (cr3 0x2000), or, where KVM re-INITs the vCPU at the
    # shutdown (AMD), a plain statement that it is lost, never reset registers as evidence.
    assert "cr3=2000" in out.detail or "where it faulted is lost" in out.detail, out.detail


def test_throughput_probe_measures_something() -> None:
    mips = measure_guest_mips(0.2)
    assert mips > 0.1


def test_coalesced_port_writes_reach_the_device_in_order_without_exits() -> None:
    # mov dx, 0x3f8; mov al, 'a'; out dx, al; mov al, 'b'; out dx, al; mov dl, 0xfd;
    # in al, dx; mov dl, 0xf8; mov al, 'c'; out dx, al; hlt
    code = bytes.fromhex("BAF803B061EEB062EEB2FDECB2F8B063EEF4")
    rec = Recorder()
    machine = Machine([(0, 0x10000)], irqchip=False)
    with machine as m:
        assert m.memory is not None
        m.memory.write(LOAD, code)
        ctx = m.context()
        ctx.add_pio(0x3F8, 8, rec)
        queued = ctx.coalesce_pio_writes(0x3F8, 1)
        vcpu = m.add_vcpu(0)
        sregs = vcpu.fd.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.fd.set_sregs(sregs)
        regs = kvm.kvm_regs()
        regs.rip, regs.rflags = LOAD, 2
        vcpu.fd.set_regs(regs)
        assert not ctx.coalesce_pio_writes(0x2F8, 1)  # too late: the vCPUs exist
        out = m.run(10)
    assert out.reason == "halted" and out.error is None
    # The device sees the queued writes before the read that follows them, and the last
    # one (queued just before HLT) too.
    assert rec.log == [
        ("out", 0x3F8, b"a"), ("out", 0x3F8, b"b"), ("in", 0x3FD, 1), ("out", 0x3F8, b"c"),
    ]
    with kvm.Kvm() as k:
        supported = bool(k.ioctl(kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_COALESCED_PIO))
    assert queued == supported
    if supported:
        assert out.exit_counts[0]["io"] == 1
        assert out.queued_sites == {SITE_QUEUED_OUT | 0x3F8: 3}
    else:
        assert out.exit_counts[0]["io"] == 4


class _PausingObserver:
    """A RunObserver that pauses the guest mid-run and counts its port writes meanwhile."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.during_pause: int | None = None
        self.after_resume: int | None = None
        self.paused: bool | None = None
        self.stopped_called = False

    def started(self, machine: Machine) -> None:
        threading.Thread(target=self._poke, args=(machine,), daemon=True).start()

    def _poke(self, machine: Machine) -> None:
        time.sleep(0.5)
        self.paused = machine.pause()
        before = len(self.rec.log)
        time.sleep(0.5)
        self.during_pause = len(self.rec.log) - before
        machine.resume()
        time.sleep(0.5)
        self.after_resume = len(self.rec.log) - before - self.during_pause

    def stopped(self, machine: Machine) -> bool:
        self.stopped_called = True
        assert all(not v.thread.is_alive() for v in machine.vcpus if v.thread)
        return False


def test_pause_holds_every_vcpu_out_of_the_guest_until_resume() -> None:
    # mov dx, 0x80; L: out dx, al; jmp L -- one port write per loop.
    rec = Recorder()
    obs = _PausingObserver(rec)
    with real_mode(bytes.fromhex("BA8000EEEBFD"), irqchip=True) as m:
        m.pio.add(0x80, 1, rec)
        out = m.run(2.0, observer=obs)
    assert out.reason == "timeout"
    assert obs.paused is True
    assert obs.during_pause == 0, "the guest ran while paused"
    assert obs.after_resume and obs.after_resume > 0, "the guest did not resume"
    assert obs.stopped_called


class _BrokenObserver:
    def started(self, machine: Machine) -> None:
        raise RuntimeError("observer bug")

    def stopped(self, machine: Machine) -> bool:
        return True


def test_an_observer_that_raises_never_ends_the_run() -> None:
    with real_mode(bytes.fromhex("F4")) as m:  # hlt
        out = m.run(5.0, observer=_BrokenObserver())
        assert out.reason == "halted"
        assert m.observer_error == "RuntimeError: observer bug"
        assert m.keep_memory  # stopped() asked to keep RAM: the observer closes it
        memory = m.memory
    assert memory is not None and memory.contains(0)  # teardown left it open
    memory.close()
    assert not memory.contains(0)
