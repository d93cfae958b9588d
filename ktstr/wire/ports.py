"""The I/O ports the guest init writes to and the VMM listens on (both sides use these).

:mod:`ktstr.vmm.layout` re-exports them with the rest of the port map.
"""

from __future__ import annotations

BOOT_PORT = 0x3F0
BOOT_MAGIC = 123
"""The guest init writes BOOT_MAGIC (one byte) to BOOT_PORT when it starts (boot time)."""

EXIT_PORT = 0x501
"""The guest writes its exit status (one byte, or a 4-byte little-endian int) here."""
