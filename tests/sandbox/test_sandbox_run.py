"""The sandbox for real: boot the emulated KVM host and run commands in it.

Every run goes through the `ktstr sandbox run` command line, with its own
TMPDIR (to prove nothing is left behind) and its own cache root (its own disk
template image); the kernel is resolved once, from the real cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr.paths import repo_root
from ktstr.sandbox.kernel import sandbox_kernel

pytestmark = pytest.mark.sandbox

MEMORY_MB = "2048"


@pytest.fixture(scope="session")
def kernel() -> Path:
    return sandbox_kernel()   # builds it into the cache on a cold machine


@pytest.fixture
def env(tmp_path: Path, kernel: Path) -> Iterator[dict[str, str]]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # ktstr importable from any cwd, installed or not.
    pythonpath = os.pathsep.join(filter(None, [str(repo_root()), os.environ.get("PYTHONPATH")]))
    e = dict(os.environ, KTSTR_SANDBOX_KERNEL=str(kernel), TMPDIR=str(tmp), PYTHONPATH=pythonpath,
             KTSTR_CACHE_DIR=str(tmp_path / "cache"), KTSTR_SANDBOX_MEMORY_MB=MEMORY_MB)
    e.pop("KTSTR_IN_SANDBOX", None)
    yield e
    # Nothing left behind: no temporary file or directory, no QEMU process.
    assert list(tmp.iterdir()) == []
    assert _qemu_mentioning(str(tmp)) == []


def _qemu_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and text.encode() in cmdline:
            found.append(int(pid))
    return found


def ktstr_sandbox(*args: str, env: dict[str, str], cwd: Path | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktstr", "sandbox", "run", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_dev_kvm_exists_inside(env: dict[str, str]) -> None:
    r = ktstr_sandbox("--", "python3", "-c", 'import os; print(os.path.exists("/dev/kvm"))',
                      env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "True\n"
    assert "warning" not in r.stderr


def test_kvm_inside_is_real(env: dict[str, str]) -> None:
    # KVM_GET_API_VERSION and KVM_CREATE_VM reach kvm_amd in the sandbox kernel.
    script = ('import fcntl, os; fd = os.open("/dev/kvm", os.O_RDWR); '
              'print(fcntl.ioctl(fd, 0xAE00), fcntl.ioctl(fd, 0xAE01, 0) > 0, '
              'os.path.exists("/sys/module/kvm_amd"))')
    r = ktstr_sandbox("--", sys.executable, "-c", script, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "12 True True\n"


def test_exit_status_comes_back_unchanged(env: dict[str, str]) -> None:
    r = ktstr_sandbox("--", "sh", "-c", "echo out; echo err >&2; exit 3", env=env)
    assert r.returncode == 3
    assert r.stdout == "out\n"          # kernel messages stay out of the command's output
    assert r.stderr == "err\n"


def test_killed_by_signal_is_128_plus_n(env: dict[str, str]) -> None:
    r = ktstr_sandbox("--", "sh", "-c", "kill -TERM $$", env=env)
    assert r.returncode == 128 + signal.SIGTERM


def test_cwd_environment_and_writable_share(env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    env = dict(env, KTSTR_TEST_VALUE="it's $HOME")
    script = ('import os; print(os.getcwd()); print(os.environ["KTSTR_TEST_VALUE"]); '
              'print(os.environ["KTSTR_IN_SANDBOX"]); print(os.getuid()); '
              'print("DISPLAY" in os.environ); open("made-inside", "w").write("hello")')
    r = ktstr_sandbox("--", "python3", "-c", script, env=dict(env, DISPLAY=":0"), cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(work), "it's $HOME", "1", str(os.getuid()), "False"]
    assert (work / "made-inside").read_text() == "hello"


def test_disk_cache_dir_supports_reflinks(env: dict[str, str]) -> None:
    script = ('cd "$KTSTR_DISK_CACHE_DIR" && head -c 1048576 /dev/urandom > a && '
              'cp --reflink=always a b && cmp a b && echo reflink-ok && rm a b && '
              'stat -f -c %T .')
    r = ktstr_sandbox("--", "sh", "-c", script, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reflink-ok", "btrfs"]
    assert (Path(env["KTSTR_CACHE_DIR"]) / "sandbox" / "disk-cache.img").is_file()


def test_stdout_streams_live(env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktstr", "sandbox", "run", "--", "sh", "-c",
         "echo first; sleep 4; echo second"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "first\n"
        seen_first = time.monotonic()
        assert proc.poll() is None          # the command is still running
        assert proc.stdout.readline() == "second\n"
        assert time.monotonic() - seen_first > 2.0
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_sigint_stops_the_vm(env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktstr", "sandbox", "run", "--", "sh", "-c",
         "echo started; sleep 600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n"
        assert _qemu_mentioning(env["TMPDIR"])        # the VM is running
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "SIGINT" in err


def test_timeout_stops_the_vm(env: dict[str, str]) -> None:
    start = time.monotonic()
    r = ktstr_sandbox("--timeout", "15", "--", "sleep", "600", env=env)
    assert r.returncode == 124
    assert "15 s" in r.stderr
    assert time.monotonic() - start < 60


def test_vm_dying_before_the_command_finishes_is_125_and_retried(
        env: dict[str, str], tmp_path: Path) -> None:
    # The command powers the emulated host off under itself, as a host kernel crash would
    # end it; each attempt leaves a line in the (shared) working directory first.
    work = tmp_path / "attempts"
    work.mkdir()
    # (Only the root filesystem and the working directory are shared here, so the tools
    # come from the root filesystem: sh and busybox-static.)
    die = "echo x >> attempts.txt; sync; exec /bin/busybox poweroff -f"
    r = ktstr_sandbox("--retries", "1", "--", "sh", "-c", die, env=env, cwd=work)
    assert r.returncode == 125, r.stderr
    assert "before the command finished" in r.stderr
    assert "running the command again (1 of 1 retries)" in r.stderr
    assert (work / "attempts.txt").read_text() == "x\nx\n"
