"""A BPF object's BTF, decoded from its raw blob, to render map values field by field.

The kernel keeps each loaded object's BTF as the blob the loader gave it
(``struct btf.data``: header, type section, string section). :func:`parse_btf` decodes
the kinds a scheduler's maps use and :func:`render` turns a value's bytes into plain
data (ints, nested dicts for structs and data sections, lists for arrays). The blob is
guest data: every offset and count is bounds-checked, and a bad blob is a
:class:`BtfError`, never an exception of another kind.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BTF_MAGIC = 0xEB9F
MAX_BTF_BYTES = 4 << 20
MAX_TYPES = 1 << 16
MAX_DEPTH = 8
MAX_ARRAY = 64
"""Array elements rendered; longer arrays end in ``"..."``."""

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)

Rendered = int | float | str | list["Rendered"] | dict[str, "Rendered"]


class BtfError(Exception):
    """The blob is not BTF we can read (one line: where it went wrong)."""


@dataclass(frozen=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int
    bit_size: int = 0


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size: int = 0
    """Bytes (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT)."""
    ref: int = 0
    """The referenced type (PTR, TYPEDEF, qualifiers, VAR, ARRAY's element)."""
    nelems: int = 0
    members: tuple[BtfMember, ...] = ()
    signed: bool = False
    int_bits: int = 0


@dataclass
class Btf:
    types: dict[int, BtfType] = field(default_factory=dict)

    def resolve(self, type_id: int) -> BtfType | None:
        """Through typedefs and qualifiers to the type that has a layout."""
        for _ in range(MAX_DEPTH * 4):
            t = self.types.get(type_id)
            if t is None or t.kind not in _QUALIFIERS:
                return t
            type_id = t.ref
        return None

    def size_of(self, type_id: int, depth: int = 0) -> int:
        t = self.resolve(type_id)
        if t is None or depth > MAX_DEPTH:
            return 0
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            return t.nelems * self.size_of(t.ref, depth + 1)
        if t.kind == VAR:
            return self.size_of(t.ref, depth + 1)
        return t.size


def _string(strings: bytes, off: int) -> str:
    if not 0 <= off < len(strings):
        return ""
    end = strings.find(b"\0", off)
    return strings[off:end if end >= 0 else len(strings)].decode(errors="replace")


def parse_btf(blob: bytes) -> Btf:
    """Decode a BTF blob (header, types, strings)."""
    if len(blob) > MAX_BTF_BYTES:
        raise BtfError(f"BTF of {len(blob)} bytes is over the {MAX_BTF_BYTES} limit")
    if len(blob) < 24:
        raise BtfError("BTF shorter than its header")
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", blob)
    if magic != BTF_MAGIC:
        raise BtfError(f"bad BTF magic 0x{magic:x}")
    types_at, strings_at = hdr_len + type_off, hdr_len + str_off
    if types_at + type_len > len(blob) or strings_at + str_len > len(blob):
        raise BtfError("BTF sections run past the blob")
    strings = blob[strings_at:strings_at + str_len]
    data = blob[types_at:types_at + type_len]
    btf = Btf()
    off, type_id = 0, 1
    try:
        while off < len(data):
            if type_id > MAX_TYPES:
                raise BtfError(f"more than {MAX_TYPES} BTF types")
            name_off, info, size_or_type = struct.unpack_from("<III", data, off)
            off += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            name = _string(strings, name_off)
            t: BtfType
            if kind == INT:
                (enc,) = struct.unpack_from("<I", data, off)
                off += 4
                t = BtfType(kind, name, size=size_or_type, signed=bool((enc >> 24) & 1),
                            int_bits=enc & 0xFF)
            elif kind == ARRAY:
                elem, _index, nelems = struct.unpack_from("<III", data, off)
                off += 12
                t = BtfType(kind, name, ref=elem, nelems=nelems)
            elif kind in (STRUCT, UNION):
                members = []
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, off)
                    off += 12
                    bit_off, bits = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                    members.append(BtfMember(_string(strings, m_name), m_type, bit_off, bits))
                t = BtfType(kind, name, size=size_or_type, members=tuple(members))
            elif kind == ENUM:
                off += 8 * vlen
                t = BtfType(kind, name, size=size_or_type, signed=bool(kflag))
            elif kind == ENUM64:
                off += 12 * vlen
                t = BtfType(kind, name, size=size_or_type, signed=bool(kflag))
            elif kind == FUNC_PROTO:
                off += 8 * vlen
                t = BtfType(kind, name)
            elif kind == VAR:
                off += 4
                t = BtfType(kind, name, ref=size_or_type)
            elif kind == DATASEC:
                members = []
                for _ in range(vlen):
                    v_type, v_off, _v_size = struct.unpack_from("<III", data, off)
                    off += 12
                    var = btf.types.get(v_type)
                    members.append(BtfMember(var.name if var else f"var{v_type}", v_type,
                                             v_off * 8))
                t = BtfType(kind, name, size=size_or_type, members=tuple(members))
            elif kind == DECL_TAG:
                off += 4
                t = BtfType(kind, name, ref=size_or_type)
            elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
                t = BtfType(kind, name, size=size_or_type if kind == FLOAT else 0,
                            ref=size_or_type)
            else:
                raise BtfError(f"unknown BTF kind {kind} at type {type_id}")
            btf.types[type_id] = t
            type_id += 1
    except struct.error:
        raise BtfError(f"BTF type {type_id} runs past the type section") from None
    return btf


def render(btf: Btf, type_id: int, data: bytes, depth: int = 0) -> Rendered:
    """``data`` (a map value) as plain data, following BTF type ``type_id``."""
    t = btf.resolve(type_id)
    if t is None or depth > MAX_DEPTH:
        return data.hex()
    if t.kind == VAR:
        return render(btf, t.ref, data, depth + 1)
    if t.kind in (INT, ENUM, ENUM64) and 0 < t.size <= 16 and len(data) >= t.size:
        if t.kind == INT and t.size == 1 and not t.signed and t.int_bits == 8:
            return data[0]
        return int.from_bytes(data[:t.size], "little", signed=t.signed)
    if t.kind == PTR:
        return f"0x{int.from_bytes(data[:8], 'little'):x}"
    if t.kind == FLOAT and t.size in (4, 8) and len(data) >= t.size:
        return float(struct.unpack_from("<f" if t.size == 4 else "<d", data)[0])
    if t.kind == ARRAY:
        size = btf.size_of(t.ref)
        elem = btf.resolve(t.ref)
        if elem is not None and elem.kind == INT and elem.size == 1 and size == 1:
            text = data[:t.nelems].split(b"\0", 1)[0]  # char[]: a string
            return text.decode(errors="replace")
        out: list[Rendered] = [render(btf, t.ref, data[i * size:(i + 1) * size], depth + 1)
                               for i in range(min(t.nelems, MAX_ARRAY)) if size]
        if t.nelems > MAX_ARRAY:
            out.append("...")
        return out
    if t.kind in (STRUCT, UNION, DATASEC):
        fields: dict[str, Rendered] = {}
        for i, m in enumerate(t.members):
            start = m.bit_offset // 8
            if m.bit_size:  # a bitfield
                raw = int.from_bytes(data[start:start + 8].ljust(8, b"\0"), "little")
                fields[m.name or f"_{i}"] = (raw >> (m.bit_offset % 8)) & ((1 << m.bit_size) - 1)
                continue
            size = btf.size_of(m.type_id)
            fields[m.name or f"_{i}"] = render(btf, m.type_id, data[start:start + size],
                                               depth + 1)
        return fields
    return data.hex()
