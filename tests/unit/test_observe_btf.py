"""Map values rendered through a BPF object's BTF, from blobs built here by hand."""

from __future__ import annotations

import struct

import pytest

from ktstr.observe.btf import (
    ARRAY,
    DATASEC,
    INT,
    PTR,
    STRUCT,
    TYPEDEF,
    VAR,
    BtfError,
    parse_btf,
    render,
)


class Blob:
    """A BTF blob builder: types get ids 1, 2, ... in the order added."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""

    def name(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, size_or_type: int, extra: bytes = b"", vlen: int = 0,
            kflag: int = 0) -> None:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name) if name else 0, info, size_or_type)
        self.types += extra

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strings))
        return hdr + self.types + self.strings


def qmap_like() -> bytes:
    b = Blob()
    b.add(INT, "unsigned long long", 8, struct.pack("<I", 64))              # 1
    b.add(INT, "int", 4, struct.pack("<I", (1 << 24) | 32))                 # 2 signed
    b.add(INT, "char", 1, struct.pack("<I", 8))                             # 3
    b.add(TYPEDEF, "u64", 1)                                                # 4
    b.add(ARRAY, "", 0, struct.pack("<III", 3, 2, 8))                       # 5 char[8]
    b.add(STRUCT, "pair", 16, struct.pack("<III", b.name("a"), 2, 0)
          + struct.pack("<III", b.name("tag"), 5, 64), vlen=2)              # 6
    b.add(VAR, "nr_enqueued", 4, struct.pack("<I", 1))                      # 7
    b.add(VAR, "p", 6, struct.pack("<I", 1))                                # 8
    b.add(PTR, "", 6)                                                       # 9
    b.add(VAR, "ptr", 9, struct.pack("<I", 1))                              # 10
    b.add(DATASEC, ".bss", 32, struct.pack("<III", 7, 0, 8)
          + struct.pack("<III", 8, 8, 16) + struct.pack("<III", 10, 24, 8), vlen=3)  # 11
    return b.bytes()


def test_a_bss_section_renders_as_its_variables() -> None:
    btf = parse_btf(qmap_like())
    value = (struct.pack("<Q", 1234) + struct.pack("<i", -5) + b"\0" * 4 + b"hello\0\0\0"
             + struct.pack("<Q", 0xFFFF888000001000))
    assert render(btf, 11, value) == {
        "nr_enqueued": 1234, "p": {"a": -5, "tag": "hello"}, "ptr": "0xffff888000001000"}
    assert render(btf, 4, struct.pack("<Q", 7)) == 7  # through the typedef


@pytest.mark.parametrize("blob", [
    b"", b"\x00" * 24, struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 100, 0, 0),
    qmap_like()[:40] + qmap_like()[40:50],
])
def test_bad_blobs_are_btf_errors(blob: bytes) -> None:
    with pytest.raises(BtfError):
        parse_btf(blob)


def test_unknown_kind_and_type_loops_do_not_escape() -> None:
    b = Blob()
    b.add(31, "x", 0)
    with pytest.raises(BtfError, match="unknown BTF kind"):
        parse_btf(b.bytes())
    loop = Blob()
    loop.add(TYPEDEF, "a", 2)
    loop.add(TYPEDEF, "b", 1)
    btf = parse_btf(loop.bytes())
    assert render(btf, 1, b"\1\2") == "0102"  # a typedef cycle renders as bytes
