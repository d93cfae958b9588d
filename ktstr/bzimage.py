"""The bzImage format: validate a Linux x86 kernel image and read its setup header.

Pure functions over bytes. Both the kernel cache (is this file a bootable kernel?)
and the VMM's loader (what does the 64-bit boot need?) read images through here.
The VMM uses the 64-bit entry point (boot protocol >= 2.12 with XLF_KERNEL_64)
(``Documentation/arch/x86/boot.rst``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError

# Offsets into the bzImage file (== offsets into boot_params for the setup header).
SETUP_HEADER_OFFSET = 0x1F1
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"
BOOT_FLAG_OFFSET = 0x1FE
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C
"""2.12: first protocol with xloadflags, needed to know the 64-bit entry exists."""
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
BP_HDR_END = 0x290
"""The setup header area in boot_params ends here (edd_mbr_sig_buffer follows)."""

KERNEL_LOAD_ADDR = 0x100000
"""Where the boot protocol loads the protected-mode kernel (1 MiB)."""


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: the fields the loader needs and the 64-bit payload."""

    setup_sects: int
    """Real-mode setup sectors after the boot sector (0 in the file means 4)."""
    protocol: int
    """Boot protocol version, e.g. 0x020F for 2.15."""
    loadflags: int
    xloadflags: int
    pref_address: int
    """Where a relocatable kernel prefers to run (LOAD_PHYSICAL_ADDR)."""
    init_size: int
    """Bytes of memory the kernel needs from its run address while decompressing."""
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    """Maximum command-line length, terminating NUL excluded."""
    initrd_addr_max: int
    """Highest address the initrd may occupy (inclusive)."""
    setup_header: bytes
    """The raw setup header, file offset 0x1F1 up to its self-described end."""
    payload: bytes
    """The protected-mode kernel, loaded at ``KERNEL_LOAD_ADDR``."""

    @property
    def protocol_text(self) -> str:
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"

    def kernel_end(self, load_addr: int = KERNEL_LOAD_ADDR) -> int:
        """First address above everything the kernel may touch while booting.

        The decompressor runs the kernel at ``pref_address`` (LOAD_PHYSICAL_ADDR) when
        loaded below it: always for a non-relocatable kernel, and for a relocatable
        one without KASLR. The footprint is ``init_size`` from there; anything placed
        above this (the initrd) is safe.
        """
        run_addr = max(load_addr, self.pref_address)
        return max(run_addr + self.init_size, load_addr + len(self.payload))


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def _u64(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


def parse_bzimage(data: bytes, *, name: str = "kernel image") -> BzImage:
    """Validate a bzImage and extract what the 64-bit boot needs.

    ``name`` (usually the path) only appears in error messages.
    """
    if len(data) < HEADER_MAGIC_OFFSET + 4 or data[HEADER_MAGIC_OFFSET:][:4] != HEADER_MAGIC:
        raise KtstrError(
            f"{name}: not a bzImage (no 'HdrS' setup header at 0x202); pass "
            "arch/x86/boot/bzImage, not vmlinux or a compressed vmlinuz of another kind"
        )
    header_end = HEADER_MAGIC_OFFSET + data[0x201]
    if header_end > BP_HDR_END:
        header_end = BP_HDR_END
    if len(data) < max(header_end, 0x26C):
        raise KtstrError(f"{name}: truncated bzImage ({len(data)} bytes, setup header cut off)")
    protocol = _u16(data, 0x206)
    if protocol < MIN_PROTOCOL:
        raise KtstrError(
            f"{name}: boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is too old; the "
            "64-bit entry needs >= 2.12 (Linux 3.8 or newer)"
        )
    xloadflags = _u16(data, 0x236)
    if not xloadflags & XLF_KERNEL_64:
        raise KtstrError(
            f"{name}: kernel has no 64-bit entry point (XLF_KERNEL_64 unset); "
            "build an x86_64 kernel (CONFIG_64BIT=y)"
        )
    setup_sects = _u8(data, SETUP_HEADER_OFFSET) or 4
    payload_offset = (setup_sects + 1) * 512
    syssize = _u32(data, 0x1F4)
    if len(data) <= payload_offset or len(data) - payload_offset < syssize * 16:
        raise KtstrError(
            f"{name}: truncated bzImage: {len(data)} bytes, but the header promises "
            f"{payload_offset + syssize * 16}; rebuild or re-copy the kernel"
        )
    return BzImage(
        setup_sects=setup_sects,
        protocol=protocol,
        loadflags=_u8(data, 0x211),
        xloadflags=xloadflags,
        pref_address=_u64(data, 0x258),
        init_size=_u32(data, 0x260),
        kernel_alignment=_u32(data, 0x230),
        relocatable=bool(_u8(data, 0x234)),
        cmdline_size=_u32(data, 0x238),
        initrd_addr_max=_u32(data, 0x22C),
        setup_header=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        payload=bytes(data[payload_offset:]),
    )


KERNEL_VERSION_OFFSET = 0x20E
"""Setup header ``kernel_version``: where, less 0x200, the image's version string starts."""
MAX_VERSION = 256
SETUP_MAX = 256 * 512
"""The boot sector and the setup sectors (``setup_sects`` is one byte) fit in this."""


def kernel_version(data: bytes) -> str | None:
    """The version string a bzImage carries in its setup sectors (``UTS_RELEASE
    (user@host) UTS_VERSION``, what ``file`` prints), or None if it has none."""
    if len(data) < KERNEL_VERSION_OFFSET + 2 or data[HEADER_MAGIC_OFFSET:][:4] != HEADER_MAGIC:
        return None
    pointer = _u16(data, KERNEL_VERSION_OFFSET)
    if pointer == 0:
        return None
    start = pointer + 0x200
    raw = data[start:start + MAX_VERSION].split(b"\0", 1)[0]
    return raw.decode(errors="replace") or None


def read_kernel_version(path: Path) -> str | None:
    """:func:`kernel_version` of the bzImage at ``path`` (None if it cannot be read)."""
    try:
        with path.open("rb") as fh:
            return kernel_version(fh.read(SETUP_MAX))
    except OSError:
        return None


def load_bzimage(path: Path | str) -> BzImage:
    """Read and parse a bzImage file, with a clear error if it is missing or unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KtstrError(
            f"kernel image {path} does not exist; build one with `ktstr kernel build` "
            "or pass the path of an existing bzImage"
        ) from None
    except IsADirectoryError:
        raise KtstrError(
            f"kernel image {path} is a directory; pass its arch/x86/boot/bzImage"
        ) from None
    except OSError as exc:
        raise KtstrError(f"kernel image {path} cannot be read: {exc.strerror}") from None
    return parse_bzimage(data, name=str(path))
