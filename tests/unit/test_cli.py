"""The command line: every command registers, and running one loads only its module."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr.cli import COMMANDS, build_parser, main


def test_help_lists_every_command() -> None:
    help_text = build_parser().format_help()
    for command in COMMANDS:
        assert command in help_text


def test_running_a_command_imports_only_its_module() -> None:
    code = (
        "import sys; from ktstr.cli import build_parser; build_parser(['list']); "
        "print(sorted(m for m in sys.modules if m.endswith('.cli') or m == 'ktstr.shell'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ktstr.cli', 'ktstr.scenario.cli']"


def test_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ktstr: error:") and "\n" not in err


# --------------------------------------------------------------------------- closed pipes


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
                KTSTR_CACHE_DIR=str(tmp_path / "cache"),
                KTSTR_RESULTS_DIR=str(tmp_path / "results"))


def _read_one_line_and_close(argv: list[str], env: dict[str, str]) -> tuple[bytes, int, str]:
    """`ktstr ARGV | head -1` with a real pipe: read one line, close the read end.

    The pipe holds one page, so the writer is still writing (or flushing at exit)
    when the reader goes away: the write fails with EPIPE every time.
    """
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "ktstr", *argv], stdout=write_end,
                            stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    line = b""
    while not line.endswith(b"\n") and (byte := os.read(read_end, 1)):
        line += byte
    os.close(read_end)
    _, err = proc.communicate(timeout=60)
    return line, proc.returncode, err.decode()


def _full_output(argv: list[str], env: dict[str, str]) -> bytes:
    return subprocess.run([sys.executable, "-m", "ktstr", *argv], env=env, check=True,
                          capture_output=True).stdout


def _fill_kernel_cache(root: Path, tmp_path: Path, count: int) -> None:
    from ktstr.kernel import cache

    build = tmp_path / "build"
    build.mkdir()
    files = {}
    for name in cache.ARTIFACTS:
        files[name] = build / name.strip(".")
        files[name].write_bytes(name.encode())
    meta = {"id": "6.12", "flavour": "test", "version": "6.12.0", "built_at": 0.0}
    first = cache.install_entry(root, "k-0", files, meta)
    for i in range(1, count):  # copies with their own key: listing reads metadata only
        copy = first.path.with_name(f"k-{i}")
        shutil.copytree(first.path, copy)
        data = json.loads((copy / "metadata.json").read_text())
        (copy / "metadata.json").write_text(json.dumps(dict(data, key=copy.name, built_at=i)))


def _fill_results(root: Path, count: int) -> None:
    from ktstr.results import write_sidecar

    for i in range(count):
        write_sidecar({"test": f"t::{i}", "verdict": "pass"}, run=f"run-{i:04}", root=root)


@pytest.mark.parametrize(
    "argv", [["list", "--json"], ["kernel", "list"], ["kernel", "list", "--json"],
             ["stats", "list"]],
    ids=["list", "kernel-list", "kernel-list-json", "stats-list"],
)
def test_closed_pipe_ends_quietly(tmp_path: Path, argv: list[str]) -> None:
    env = _env(tmp_path)
    _fill_kernel_cache(tmp_path / "cache", tmp_path, 60)
    _fill_results(tmp_path / "results", 120)
    assert len(_full_output(argv, env)) > 4096  # more than the pipe holds
    line, code, err = _read_one_line_and_close(argv, env)
    assert line.endswith(b"\n")
    assert err == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert code == 141  # like a tool killed by SIGPIPE


# --------------------------------------------------------------------------- bad host input


@pytest.fixture
def bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "plain").write_text("not a directory")
    (tmp_path / "junk.tar").write_bytes(b"not a tarball")
    (tmp_path / "empty").mkdir()
    (tmp_path / "cache" / "sources").mkdir(parents=True)
    (tmp_path / "cache" / "sources" / "digests.json").write_text("[]")  # valid JSON, not a memo
    results = tmp_path / "results"
    for run, content in (("badjson", "{"), ("wrongtype", '{"test": "t", "scheduler": "x"}'),
                         ("good", '{"test": "t", "verdict": "pass"}')):
        (results / run).mkdir(parents=True)
        (results / run / "a.json").write_text(content)
    sigterm = signal.getsignal(signal.SIGTERM)  # `kernel build` installs its own handler
    yield tmp_path
    signal.signal(signal.SIGTERM, sigterm)


BAD_INPUTS = [
    ["kernel", "build", "--source", "{w}/missing"],
    ["kernel", "build", "--source", "{w}/plain"],
    ["kernel", "build", "--source", "{w}/empty"],
    ["kernel", "build", "--source", "{w}/junk.tar"],
    ["kernel", "build", "9.99"],
    ["kernel", "build", "6.12", "--source", "{w}/empty"],
    ["kernel", "schedulers", "9.99"],
    ["kernel", "clean", "--keep", "-1"],
    ["stats", "--root", "{w}/results", "show", "{w}/missing"],
    ["stats", "--root", "{w}/results", "show", "{w}/plain"],
    ["stats", "--root", "{w}/plain", "list"],
    ["stats", "--root", "{w}/results", "show", "badjson"],
    ["stats", "--root", "{w}/results", "show", "wrongtype"],
    ["stats", "--root", "{w}/results", "compare", "good", "wrongtype"],
    ["stats", "--root", "{w}/results", "report", "wrongtype"],
    ["stats", "--root", "{w}/results", "compare", "good", "good", "--threshold", "nan"],
    ["stats", "--root", "{w}/results", "report", "good", "-o", "{w}/missing/r.html"],
]


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=[" ".join(a) for a in BAD_INPUTS])
def test_bad_host_input_is_one_line_and_exit_2(bad_inputs: Path, argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(w=bad_inputs) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("ktstr: error:")]
    assert len(errors) == 1, lines
    # Before it only progress notes; after it only the words of a tool it ran (tar).
    assert all(line.startswith("ktstr: ") for line in lines[:errors[0]]), lines
    assert not any("Traceback" in line for line in lines), lines
