"""The `selftests` nox session: the kernel's own sched_ext selftests in a VM.

It builds (or reuses) the kernel and, on the host, the selftests runner
(``ktstr selftests --list`` builds it when the kernel entry has none, and
checks any ``-t`` names), then runs ``ktstr selftests`` natively or inside
one sandbox VM where this machine's KVM cannot boot a kernel, the way the VM
test sessions do (:mod:`ktstr.sessions.vm`).

Imported by ``noxfile.py`` in nox's own Python: standard library and
stdlib-only ktstr modules only, at import time.
"""

from __future__ import annotations

import argparse

import nox

from ktstr.sessions import vm


def kernel_of(posargs: list[str], default: str) -> str:
    """The ``--kernel`` given in posargs, else ``default``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kernel", default=default)
    known, _rest = parser.parse_known_args(posargs)
    return str(known.kernel)


def command(posargs: list[str], kernel: str) -> list[str]:
    """``ktstr selftests`` for ``kernel`` with posargs; the session picks native or sandbox,
    so the command itself never re-dispatches (the last ``--sandbox`` wins)."""
    return ["python", "-m", "ktstr", "selftests", "--kernel", kernel, *posargs,
            "--sandbox", "never"]


def selftests(session: nox.Session) -> None:
    """posargs go to `ktstr selftests` (e.g. `-- -t minimal --topology 1n2l2c1t`)."""
    vm.install(session)
    default, _ids = vm.catalog()
    posargs = list(session.posargs)
    kernel = kernel_of(posargs, default)
    vm.prepare(session, kernel)
    argv = command(posargs, kernel)
    # On the host: builds the runner if needed and checks the -t names before any VM.
    session.run(*argv, "--list")
    native = vm.kvm_usable(session)
    if not native:
        # Built here, with its progress shown, rather than inside the sandbox start-up.
        session.run("python", "-m", "ktstr", "kernel", "build", default, "--flavour", "sandbox")
    session.run(*(argv if native else vm.sandboxed(argv)),
                env={"KTSTR_RUN_ID": vm.run_id(kernel, "selftests")})
