"""Build the sched_ext example schedulers from a kernel tree's `tools/sched_ext`.

They are BPF programs compiled against the kernel's own BTF (`VMLINUX_BTF`),
so each kernel entry gets its own binaries. clang >= 16 is needed for the
BPF features they use.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ktstr import tools
from ktstr.errors import KtstrError
from ktstr.kernel.build import jobs, run_logged

EXAMPLES = ("scx_simple", "scx_qmap", "scx_central", "scx_flatcg")
MIN_CLANG = 16
CANDIDATES = ("clang-22", "clang-19", "clang-16", "clang")


@dataclass(frozen=True)
class Clang:
    name: str  # as found on PATH
    major: int

    @property
    def llvm(self) -> str:
        """The tools Makefile's LLVM= value: `-19` picks clang-19, llvm-strip-19, ..."""
        return self.name[len("clang"):] if self.name != "clang" else "1"


def clang_major(name: str) -> int | None:
    try:
        out = subprocess.run([name, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else None


def find_clang(candidates: tuple[str, ...] = CANDIDATES) -> Clang:
    seen = []
    for name in candidates:
        if shutil.which(name) is None:
            continue
        major = clang_major(name)
        seen.append(f"{name} ({major})")
        if major is not None and major >= MIN_CLANG:
            return Clang(name, major)
    found = f"; found {', '.join(seen)}" if seen else ""
    raise KtstrError(
        f"building sched_ext schedulers needs clang >= {MIN_CLANG} on PATH{found}: "
        f"{tools.install_hint('clang-19')}"
    )


def build_schedulers(src: Path, vmlinux: Path, workdir: Path, log: Path,
                     names: tuple[str, ...] = EXAMPLES) -> dict[str, Path]:
    """Compile `names` out of tree into `workdir`; return name -> binary."""
    tools = src / "tools" / "sched_ext"
    if not (tools / "Makefile").is_file():
        raise KtstrError(f"{src} has no tools/sched_ext: this kernel predates sched_ext")
    clang = find_clang()
    workdir.mkdir(parents=True, exist_ok=True)
    run_logged(
        ["make", "-C", str(tools), f"-j{jobs()}", f"CC={clang.name}", f"LLVM={clang.llvm}",
         f"CLANG={clang.name}", f"O={workdir}", f"VMLINUX_BTF={vmlinux}", *names],
        log, what="building sched_ext schedulers", progress=None,
    )
    binaries = {name: workdir / "build" / "bin" / name for name in names}
    missing = [name for name, path in binaries.items() if not path.is_file()]
    if missing:
        raise KtstrError(f"sched_ext build finished without {', '.join(missing)}; see {log}")
    return binaries
