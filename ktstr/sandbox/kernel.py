"""Which kernel the sandbox boots.

Order: `$KTSTR_SANDBOX_KERNEL` (a bzImage path; always wins, for kernels built
elsewhere), then the kernel cache (`ktstr.kernel.ensure_kernel(SANDBOX_KERNEL_ID,
flavour="sandbox")`, which builds on a miss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ktstr import kernel
from ktstr.errors import KtstrError

ENV_VAR = "KTSTR_SANDBOX_KERNEL"
SANDBOX_KERNEL_ID = "6.12"


@dataclass(frozen=True)
class KernelChoice:
    path: Path | None      # None: not available without building
    source: str            # one line: where it comes from


def _from_env() -> KernelChoice | None:
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise KtstrError(f"{ENV_VAR}={value} is not a file; point it at a sandbox-flavour "
                         f"bzImage or unset it")
    return KernelChoice(path, f"{path} (from ${ENV_VAR})")


def _cached() -> KernelChoice | None:
    """A sandbox kernel already in the cache, found without building anything."""
    for entry in kernel.list_entries():  # newest first
        if entry.id == SANDBOX_KERNEL_ID and entry.flavour == "sandbox" \
                and Path(entry.bzimage).is_file():
            return KernelChoice(Path(entry.bzimage), f"{entry.bzimage} (cache)")
    return None


def _ensure() -> Path:
    entry = kernel.ensure_kernel(SANDBOX_KERNEL_ID, flavour="sandbox", schedulers=False)
    return Path(entry.bzimage)


def describe_kernel() -> KernelChoice:
    """Where the kernel would come from, without building it (for `sandbox status`)."""
    found = _from_env() or _cached()
    if found:
        return found
    return KernelChoice(None, f"not cached; the first run builds {SANDBOX_KERNEL_ID} "
                              f"(sandbox flavour, ~6 min)")


def sandbox_kernel() -> Path:
    """The bzImage to boot, building it into the cache if it is not there (or is corrupt)."""
    env = _from_env()
    if env and env.path:
        return env.path
    return _ensure()


def kernel_hz(bzimage: Path) -> int | None:
    """CONFIG_HZ of `bzimage`, from the .config beside it (cache entry or build tree)."""
    candidates = [bzimage.parent / ".config"]
    if len(bzimage.parents) > 3:
        candidates.append(bzimage.parents[3] / ".config")   # <O>/arch/x86/boot/bzImage
    for config in candidates:
        try:
            text = config.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("CONFIG_HZ="):
                value = line.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None
