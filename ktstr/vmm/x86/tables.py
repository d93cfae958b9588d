"""What the firmware table encoders share (ACPI in ``acpi.py``, the MP table in ``mptable.py``)."""

from __future__ import annotations


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256.

    ACPI tables, the RSDP and both MP structures use this one rule.
    """
    return (-sum(data)) & 0xFF
