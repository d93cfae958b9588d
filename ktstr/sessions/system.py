"""Host packages the sessions need: check them, and install the missing ones as root."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from ktstr import tools
from ktstr.errors import KtstrError
from ktstr.tools import missing_packages, required_packages

if TYPE_CHECKING:
    import nox

def ensure_packages() -> None:
    """Install missing Debian packages (as root), or say exactly what to install."""
    missing = missing_packages(required_packages())
    if not missing:
        return
    if os.geteuid() != 0 or not tools.which("apt-get"):
        names = " ".join(missing)
        raise KtstrError(f"missing host packages; install them with: apt-get install {names}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def check_tools() -> None:
    """After the packages: every program ktstr runs is found, or KtstrError with the doctor's
    lines (a package can be installed while its program is not on PATH)."""
    from ktstr import doctor

    missing = doctor.problems(doctor.check_tools())
    if missing:
        lines = "\n".join(f.line() for f in missing)
        raise KtstrError(f"this host lacks programs ktstr runs (`ktstr doctor` checks all):\n"
                         f"{lines}")


def prepare_host(session: nox.Session) -> None:
    """What every building or booting session does first: packages, then the tool check."""
    try:
        ensure_packages()
        check_tools()
    except KtstrError as err:
        session.error(str(err))


if __name__ == "__main__":
    ensure_packages()
