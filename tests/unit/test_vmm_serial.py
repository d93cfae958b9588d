"""The 16550A model, driven the way Linux's 8250 driver drives it."""

from __future__ import annotations

from ktstr.vmm.devices import serial as s
from ktstr.vmm.devices.serial import Serial
from ktstr.vmm.irq import NullIrq

BASE = 0x3F8


def rd(uart: Serial, off: int) -> int:
    return uart.pio_read(BASE + off, 1)[0]


def wr(uart: Serial, off: int, value: int) -> None:
    uart.pio_write(BASE + off, bytes([value]))


def make() -> tuple[Serial, NullIrq, list[bytes]]:
    irq = NullIrq()
    seen: list[bytes] = []
    return Serial(irq, BASE, on_output=seen.append), irq, seen


def test_transmit_collects_and_streams() -> None:
    uart, _, seen = make()
    for ch in b"hi\n":
        assert rd(uart, s.LSR) & s.LSR_THRE
        wr(uart, s.RBR_THR_DLL, ch)
    assert bytes(uart.output) == b"hi\n"
    assert b"".join(seen) == b"hi\n"
    assert uart.text() == "hi\n"


def test_ier_keeps_low_nibble_and_scratch_register() -> None:
    uart, _, _ = make()
    wr(uart, s.IER_DLM, 0xFF)
    assert rd(uart, s.IER_DLM) == 0x0F
    wr(uart, s.SCR, 0x5A)
    assert rd(uart, s.SCR) == 0x5A


def test_divisor_latch() -> None:
    uart, _, _ = make()
    wr(uart, s.LCR, s.LCR_DLAB | 0x03)
    wr(uart, s.RBR_THR_DLL, 0x01)
    wr(uart, s.IER_DLM, 0x00)
    assert (rd(uart, s.RBR_THR_DLL), rd(uart, s.IER_DLM)) == (0x01, 0x00)
    wr(uart, s.LCR, 0x03)
    wr(uart, s.RBR_THR_DLL, ord("x"))
    assert bytes(uart.output) == b"x"  # the DLL write did not transmit


def test_fifo_reported_in_iir() -> None:
    uart, _, _ = make()
    wr(uart, s.IIR_FCR, s.FCR_ENABLE_FIFO)
    assert rd(uart, s.IIR_FCR) & 0xC0 == 0xC0
    wr(uart, s.IIR_FCR, 0)
    assert rd(uart, s.IIR_FCR) & 0xC0 == 0


def test_thre_interrupt_raised_on_enable_and_cleared_by_iir_read() -> None:
    uart, irq, _ = make()
    assert not irq.level
    wr(uart, s.IER_DLM, s.IER_THRI)
    assert irq.level
    assert rd(uart, s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert not irq.level
    assert rd(uart, s.IIR_FCR) & 0x0F == s.IIR_NO_INT
    wr(uart, s.RBR_THR_DLL, ord("a"))  # THR empties at once: THRE pending again
    assert irq.level
    edges = irq.edges
    wr(uart, s.IER_DLM, 0)
    assert not irq.level
    wr(uart, s.IER_DLM, s.IER_THRI)  # re-enabling re-asserts (8250 THRE test)
    assert irq.edges == edges + 1


def test_receive_path_and_rx_interrupt() -> None:
    uart, irq, _ = make()
    wr(uart, s.IER_DLM, s.IER_RDI)
    assert not rd(uart, s.LSR) & s.LSR_DR
    uart.queue_input(b"ok")
    assert irq.level
    assert rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.IIR_FCR) & 0x0F == s.IIR_RDI
    assert rd(uart, s.RBR_THR_DLL) == ord("o")
    assert rd(uart, s.RBR_THR_DLL) == ord("k")
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert not irq.level


def test_loopback_msr_and_data() -> None:
    uart, _, seen = make()
    wr(uart, s.MCR, s.MCR_LOOP | s.MCR_RTS | s.MCR_OUT2)
    assert rd(uart, s.MSR) & 0xF0 == 0x90  # what 8250 autoconfig checks
    wr(uart, s.RBR_THR_DLL, 0x42)
    assert rd(uart, s.RBR_THR_DLL) == 0x42
    assert seen == [] and not uart.output
    wr(uart, s.MCR, s.MCR_OUT2)
    assert rd(uart, s.MSR) & s.MSR_DCD


def test_fcr_clears_receiver() -> None:
    uart, _, _ = make()
    uart.queue_input(b"abc")
    wr(uart, s.IIR_FCR, s.FCR_ENABLE_FIFO | s.FCR_CLEAR_RCVR)
    assert not rd(uart, s.LSR) & s.LSR_DR


def test_output_keeps_head_and_tail_and_counts_what_it_dropped() -> None:
    seen: list[bytes] = []
    uart = Serial(NullIrq(), BASE, on_output=seen.append, keep_head=16, keep_tail=64)
    sent = bytes(i % 251 for i in range(10_000))
    for ch in sent:
        wr(uart, s.RBR_THR_DLL, ch)
    assert b"".join(seen) == sent  # streaming sees every byte
    assert uart.dropped == len(sent) - 16 - 64
    assert uart.head == sent[:16]
    assert uart.tail == sent[-64:]
    marker = s.DROPPED_MARKER % uart.dropped
    assert bytes(uart.output) == sent[:16] + marker + sent[-64:]
    assert uart.text() == (sent[:16] + marker + sent[-64:]).decode("utf-8", "replace")
    assert f"{uart.dropped} bytes dropped" in uart.text()


def test_output_buffer_stays_bounded() -> None:
    uart = Serial(NullIrq(), BASE, keep_head=8, keep_tail=1000)
    for _ in range(20_000):
        wr(uart, s.RBR_THR_DLL, 0x41)
        assert uart.buffered <= 8 + 1000 + s.tail_slack(1000)
    assert uart.dropped == 20_000 - 1008
    assert s.KEEP_HEAD_BYTES == 256 << 10 and s.KEEP_TAIL_BYTES == 4 << 20


def test_short_output_is_kept_whole_without_a_marker() -> None:
    uart, _, _ = make()
    for ch in b"boot ok\n":
        wr(uart, s.RBR_THR_DLL, ch)
    assert bytes(uart.output) == b"boot ok\n" and uart.dropped == 0


def test_any_register_access_is_answered() -> None:
    uart, _, _ = make()
    for off in range(-4, 12):
        for size in (0, 1, 2, 4):
            assert len(uart.pio_read(BASE + off, size)) == size
        uart.pio_write(BASE + off, b"")
        uart.pio_write(BASE + off, b"\xff\xff\xff\xff")
