"""Which host variables reach the sandbox, and how they are written for its shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.sandbox.environ import guest_environment, render_env_script


def test_session_variables_are_dropped() -> None:
    host = {"DISPLAY": ":0", "SSH_AUTH_SOCK": "/run/a", "XDG_RUNTIME_DIR": "/run/user/0",
            "DBUS_SESSION_BUS_ADDRESS": "unix:x", "SHLVL": "2", "_": "/usr/bin/env",
            "BASH_FUNC_f%%": "() { :; }", "PATH": "/usr/bin", "HOME": "/root", "FOO": "bar"}
    env = guest_environment(host, cwd="/work/co")
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root" and env["FOO"] == "bar"
    for gone in ("DISPLAY", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
                 "SHLVL", "_", "BASH_FUNC_f%%"):
        assert gone not in env


def test_sandbox_variables_are_set() -> None:
    env = guest_environment({"PWD": "/elsewhere", "KTSTR_IN_SANDBOX": "0"}, cwd="/work/co",
                            extra={"KTSTR_DISK_CACHE_DIR": "/run/ktstr/disk-cache"})
    assert env["PWD"] == "/work/co"
    assert env["KTSTR_IN_SANDBOX"] == "1"
    assert env["KTSTR_DISK_CACHE_DIR"] == "/run/ktstr/disk-cache"


def test_tmpdir_survives_only_inside_a_writable_share() -> None:
    host = {"TMPDIR": "/work/co/tmp", "TMP": "/tmp/host-only", "TEMP": "/work/cox"}
    env = guest_environment(host, cwd="/work/co", writable=["/work/co"])
    assert env["TMPDIR"] == "/work/co/tmp"
    assert "TMP" not in env
    assert "TEMP" not in env  # /work/cox is not under /work/co


def test_render_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        render_env_script({"A-B": "x"})


def _sourced(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(env))
    out = subprocess.run(["env", "-i", "/bin/sh", "-c", '. "$1" && env -0', "sh", str(script)],
                         capture_output=True, check=True).stdout
    pairs = (item.split(b"=", 1) for item in out.split(b"\0") if item)
    return {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in pairs}


def test_rendered_script_round_trips_awkward_values(tmp_path: Path) -> None:
    env = {"A": "it's", "B": 'say "hi" $HOME `id` \\n', "C": "line1\nline2", "D": "",
           "E": "ünïcödé", "F": "*"}
    got = _sourced(env, tmp_path)
    for name, value in env.items():
        assert got[name] == value


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,6}", fullmatch=True),
                       st.text(st.characters(blacklist_categories=("Cs",),
                                             blacklist_characters="\0"), max_size=20),
                       max_size=5))
def test_rendered_script_round_trips(tmp_path_factory: pytest.TempPathFactory,
                                     env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_")}
    got = _sourced(env, tmp_path_factory.mktemp("env"))
    for name, value in env.items():
        assert got[name] == value
