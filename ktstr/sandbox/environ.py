"""The command's environment inside the sandbox: the host's, minus what cannot work there.

The sandbox has no display, no session bus, no agent sockets and a fresh /tmp,
so variables pointing at those would only mislead programs inside. The result
is written as a POSIX shell file that the guest init sources (values quoted, so
any byte except NUL survives).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

# Host-session state with no meaning inside the VM.
DROP_NAMES = frozenset({
    "DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR", "GPG_AGENT_INFO", "TMUX", "TMUX_PANE", "STY", "WINDOWID",
    "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET", "MANAGERPID", "SYSTEMD_EXEC_PID",
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "OLDPWD", "SHLVL", "_",
    "KTSTR_IN_SANDBOX", "KTSTR_DISK_CACHE_DIR", "KTSTR_LOCK_DIR",
})
DROP_PREFIXES = ("SSH_", "XDG_SESSION_", "XDG_SEAT", "XDG_VTNR", "BASH_FUNC_")
SANDBOX_LOCK_DIR = "/run/ktstr-locks"
"""Host CPU reservations of the processes inside one sandbox (``ktstr.reserve``): the guest's
tmpfs, since the 9p cache share grants every lock."""
# Temporary-directory variables survive only when they point into a writable share.
TMP_NAMES = ("TMPDIR", "TMP", "TEMP")

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _under(path: str, roots: Iterable[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots)


def guest_environment(host_env: Mapping[str, str], *, cwd: str,
                      writable: Iterable[str] = (),
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Filter `host_env` for the sandbox and add the sandbox's own variables.

    `writable` are the guest paths shared read-write from the host; a TMPDIR
    elsewhere would name a directory the guest's fresh /tmp does not have.
    """
    roots = list(writable)
    env: dict[str, str] = {}
    for name, value in host_env.items():
        if not _SHELL_NAME.match(name) or name in DROP_NAMES:
            continue
        if name.startswith(DROP_PREFIXES):
            continue
        if name in TMP_NAMES and not _under(value, roots):
            continue
        env[name] = value
    env["PWD"] = cwd
    env["KTSTR_IN_SANDBOX"] = "1"
    env["KTSTR_LOCK_DIR"] = SANDBOX_LOCK_DIR
    env.update(extra or {})
    return env


def render_env_script(env: Mapping[str, str]) -> str:
    """`export NAME='value'` lines; names that are not shell identifiers are refused."""
    lines = []
    for name in sorted(env):
        if not _SHELL_NAME.match(name):
            raise ValueError(f"not a shell variable name: {name!r}")
        value = env[name]
        if "\0" in value:
            raise ValueError(f"variable {name} contains a NUL byte")
        lines.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(lines)
