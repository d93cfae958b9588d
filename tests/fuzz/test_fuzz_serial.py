"""The 16550 model under any register access: any port offset, size 1/2/4, any value,
host input interleaved. Nothing raises, reads answer their size, the IRQ line
follows the chip's state, and the kept output stays bounded while the callback
sees every byte."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hypothesis import given
from hypothesis import strategies as st

from ktstr.vmm.devices import serial as s
from ktstr.vmm.devices.serial import Serial
from ktstr.vmm.irq import NullIrq

Bound = Callable[[int], AbstractContextManager[None]]
BASE = 0x3F8
HEAD, TAIL = 32, 256
EXAMPLE_BYTES = 256 << 10

op = st.one_of(
    st.tuples(st.just("in"), st.integers(-4, 11), st.sampled_from([1, 2, 4]), st.just(b"")),
    st.tuples(st.just("out"), st.integers(-4, 11), st.sampled_from([1, 2, 4]),
              st.binary(min_size=4, max_size=4)),
    # A burst of THR writes, the way the console prints (keeps the output buffer busy).
    st.tuples(st.just("print"), st.just(0), st.just(1), st.binary(max_size=400)),
    st.tuples(st.just("input"), st.just(0), st.just(1), st.binary(max_size=40)),
)


@given(st.lists(op, max_size=200))
def test_any_register_access_is_handled(bounded_memory: Bound,
                                        ops: list[tuple[str, int, int, bytes]]) -> None:
    irq = NullIrq()
    streamed: list[bytes] = []
    uart = Serial(irq, BASE, on_output=streamed.append, keep_head=HEAD, keep_tail=TAIL)
    with bounded_memory(EXAMPLE_BYTES):
        for kind, off, size, data in ops:
            if kind == "in":
                assert len(uart.pio_read(BASE + off, size)) == size
            elif kind == "out":
                uart.pio_write(BASE + off, data[:size])
            elif kind == "print":
                for byte in data:
                    uart.pio_write(BASE + s.RBR_THR_DLL, bytes([byte]))
            else:
                uart.queue_input(data)
            assert irq.level == (uart._iir_id() != s.IIR_NO_INT)
            assert uart.buffered <= HEAD + TAIL + s.tail_slack(TAIL)
    sent = b"".join(streamed)
    assert len(uart.head) + uart.dropped + len(uart.tail) == len(sent)
    assert uart.head == sent[:HEAD]
    assert uart.tail == sent[len(uart.head) + uart.dropped:]
