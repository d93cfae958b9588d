"""ensure_kernel end to end on a miniature kernel tree.

The tree has a real Kconfig and a Makefile that answers the same targets as
Linux (`tinyconfig`, `olddefconfig`, `bzImage`, `kernelrelease`, and
`tools/sched_ext`), producing small artifacts in seconds. Everything else —
make, logs, verification, locks, atomic install, checksums — is the real code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr.cli import main
from ktstr.errors import KtstrError
from ktstr.kernel import (
    cache,
    clean,
    ensure_kernel,
    ensure_schedulers,
    list_entries,
    release,
    resolve_kernel,
)
from ktstr.kernel.locks import release_all

OLDDEF = r"""
import re, sys
from pathlib import Path
path, drop = sys.argv[1], set(sys.argv[2:])
# Like Kconfig: a symbol the tree does not define cannot stay in .config.
defined = set(re.findall(r"^config (\w+)", (Path(__file__).parent / "Kconfig").read_text(), re.M))
values = {}
for line in open(path):
    line = line.strip()
    if line.startswith("CONFIG_") and "=" in line:
        name, value = line.split("=", 1)
        values[name] = value
    elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
        values.pop(line[2:-len(" is not set")], None)
with open(path, "w") as fh:
    for name, value in values.items():
        if name[len("CONFIG_"):] in defined - drop:
            fh.write(f"{name}={value}\n")
"""

BZIMAGE = r"""
import struct, sys
data = bytearray(200_000)
data[0x1F1] = 4  # setup_sects
data[0x201] = 0x6A  # setup header length
data[0x202:0x206] = b"HdrS"
struct.pack_into("<H", data, 0x206, 0x020F)  # boot protocol 2.15
struct.pack_into("<H", data, 0x236, 1)  # XLF_KERNEL_64
open(sys.argv[1], "wb").write(bytes(data))
"""

MAKEFILE = """\
# Miniature kernel build: same targets as Linux, instant artifacts.
O ?= .
HERE := $(dir $(lastword $(MAKEFILE_LIST)))
tinyconfig defconfig:
\t@echo "  GEN     $@"
\t@printf 'CONFIG_64BIT=y\\n' > $(O)/.config
olddefconfig:
\t@python3 $(HERE)olddef.py $(O)/.config $$(cat $(HERE)drop 2>/dev/null)
bzImage:
\t@echo build >> $(HERE)../builds.txt
\t@for i in 1 2 3 4 5; do echo "  CC      file$$i.o"; done
\t@if [ -e $(HERE)fail ]; then for i in $$(seq 1 50); do echo "error line $$i"; done; exit 1; fi
\t@sleep $$(cat $(HERE)sleep 2>/dev/null || echo 0)
\t@mkdir -p $(O)/arch/x86/boot
\t@python3 $(HERE)bzimage.py $(O)/arch/x86/boot/bzImage
\t@head -c 2000000 /dev/urandom > $(O)/vmlinux
\t@echo 'ffffffff81000000 T _stext' > $(O)/System.map
kernelrelease:
\t@echo 6.99.0-mini
"""

SCX_MAKEFILE = """\
# Stands in for tools/sched_ext: records how it was called, makes the binaries.
$(MAKECMDGOALS):
\t@mkdir -p $(O)/build/bin
\t@printf '#!/bin/sh\\necho $@ built against $(VMLINUX_BTF) with $(CC)\\n' > $(O)/build/bin/$@
\t@chmod +x $(O)/build/bin/$@
"""

KCONFIG = """\
config 64BIT
\tbool "64-bit"
config NETDEVICES
\tbool "Network devices"
config TUN
\ttristate "TUN"
\tdepends on NETDEVICES
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test has its own cache (never the user's), and lets go of what it held."""
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    yield
    release_all()


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = tmp_path / "linux"
    (src / "tools" / "sched_ext").mkdir(parents=True)
    (src / "Makefile").write_text(MAKEFILE)
    (src / "Kconfig").write_text(KCONFIG)
    (src / "olddef.py").write_text(OLDDEF)
    (src / "bzimage.py").write_text(BZIMAGE)
    (src / "tools" / "sched_ext" / "Makefile").write_text(SCX_MAKEFILE)
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    return src


def builds(tree: Path) -> int:
    path = tree.parent / "builds.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def entry_dirs(tree: Path) -> list[str]:
    base = tree.parent / "cache" / "kernels"
    return sorted(p.name for p in base.iterdir() if p.name != ".locks") if base.exists() else []


def test_build_then_warm_hit(tree: Path) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    assert entry.id == "local" and entry.flavour == "test" and entry.version == "6.99.0-mini"
    assert entry.bzimage.is_file() and not entry.sched_ext  # SCHED_CLASS_EXT not in Kconfig
    assert entry_dirs(tree) == [entry.key]
    start = time.monotonic()
    again = ensure_kernel(source=tree, schedulers=False)
    assert time.monotonic() - start < 1.0
    assert again == entry and builds(tree) == 1
    meta = cache.read_metadata(entry.path)
    assert "SCHED_CLASS_EXT" in meta.raw["unavailable_options"]  # type: ignore[operator]
    assert meta.features["sched_ext"] is False
    assert resolve_kernel(str(entry.path)).entry == entry
    assert [e.key for e in list_entries()] == [entry.key]


def test_fragment_change_of_source_changes_key(tree: Path) -> None:
    first = ensure_kernel(source=tree, schedulers=False)
    (tree / "Kconfig").write_text(KCONFIG + "config NEW\n\tbool \"new\"\n")
    os.utime(tree / "Kconfig", ns=(0, time.time_ns() + 10**9))
    second = ensure_kernel(source=tree, schedulers=False)
    assert second.key != first.key and builds(tree) == 2
    sandbox = ensure_kernel(source=tree, flavour="sandbox", schedulers=False)
    assert sandbox.key not in (first.key, second.key) and sandbox.flavour == "sandbox"


def test_corrupt_bzimage_is_rebuilt(tree: Path) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    with entry.bzimage.open("r+b") as fh:
        fh.truncate(100)
    rebuilt = ensure_kernel(source=tree, schedulers=False)
    assert builds(tree) == 2
    assert rebuilt.bzimage.stat().st_size == 200_000
    cache.load_entry(rebuilt.path)  # verifies


def test_dropped_option_fails_with_its_dependency(tree: Path) -> None:
    (tree / "drop").write_text("64BIT")
    with pytest.raises(KtstrError, match=r"CONFIG_64BIT=y was dropped"):
        ensure_kernel(source=tree, schedulers=False)
    assert entry_dirs(tree) == []


def test_failed_build_reports_log_tail_and_leaves_no_entry(tree: Path) -> None:
    (tree / "fail").write_text("")
    with pytest.raises(KtstrError) as err:
        ensure_kernel(source=tree, schedulers=False)
    message = str(err.value)
    log = Path(message.split("log: ", 1)[1].split(";", 1)[0])
    assert log.name == "ktstr-build.log"
    tail = log.read_text().splitlines()[-40:]
    assert message.endswith("\n" + "\n".join(tail))
    assert "error line 50" in message and "error line 5\n" not in message
    assert entry_dirs(tree) == []


def test_schedulers_are_built_into_the_entry(tree: Path) -> None:
    (tree / "Kconfig").write_text(KCONFIG + "config SCHED_CLASS_EXT\n\tbool \"scx\"\n")
    entry = ensure_kernel(source=tree)  # sched_ext kernel: schedulers come with it
    assert entry.sched_ext
    assert sorted(entry.schedulers) == ["scx_central", "scx_flatcg", "scx_qmap", "scx_simple"]
    out = subprocess.run([str(entry.schedulers["scx_simple"])], capture_output=True, text=True)
    assert f"against {entry.vmlinux}" in out.stdout and "clang" in out.stdout
    assert ensure_schedulers(entry) == entry.schedulers


def test_schedulers_refused_without_sched_ext(tree: Path) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    with pytest.raises(KtstrError, match="has no sched_ext"):
        ensure_schedulers(entry)


CHILD = """
import sys, time
from pathlib import Path
from ktstr.kernel import ensure_kernel
start = time.monotonic()
entry = ensure_kernel(source=Path(sys.argv[1]), schedulers=False)
print(entry.key, round(time.monotonic() - start, 2), flush=True)
"""


def spawn(tree: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # SIGINT as a terminal delivers it: a shell's background job (CI started with `&`)
    # inherits it ignored, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tree)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_two_processes_build_once(tree: Path) -> None:
    (tree / "sleep").write_text("2")
    first = spawn(tree)
    deadline = time.monotonic() + 30
    while builds(tree) == 0 and time.monotonic() < deadline:  # first holds the lock now
        time.sleep(0.05)
    second = spawn(tree)
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert out1.split()[0] == out2.split()[0]
    assert builds(tree) == 1
    assert err1.count("built local test kernel") + err2.count("built local test kernel") == 1
    assert "waiting for another process building" in err2


def test_interrupted_build_leaves_no_entry(tree: Path) -> None:
    (tree / "sleep").write_text("30")
    child = spawn(tree)
    deadline = time.monotonic() + 30
    while builds(tree) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    try:
        child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the build did not stop within 30 s of SIGINT; its stderr:\n{err}")
    assert child.returncode != 0
    assert entry_dirs(tree) == []
    # make was stopped with ktstr, not left running in the build tree.
    ps = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True)
    leftovers = [pid for pid in ps.stdout.split() if _cwd_under(int(pid), tree.parent)]
    assert leftovers == []
    (tree / "sleep").write_text("0")
    assert ensure_kernel(source=tree, schedulers=False).bzimage.is_file()


def _cwd_under(pid: int, base: Path) -> bool:
    try:
        return str(base) in os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False


def test_resolve_kernel_paths(tree: Path, tmp_path: Path) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    assert resolve_kernel(str(entry.bzimage)).bzimage == entry.bzimage
    build_tree = tmp_path / "cache" / "build" / entry.key
    assert resolve_kernel(str(build_tree)).bzimage == build_tree / "arch/x86/boot/bzImage"
    not_image = tmp_path / "not-a-kernel"
    not_image.write_bytes(b"\0" * 1024)
    with pytest.raises(KtstrError, match="not a bzImage"):
        resolve_kernel(str(not_image))
    with pytest.raises(KtstrError, match="neither a catalog id"):
        resolve_kernel("9.99")


def test_in_tree_build_is_refused(tree: Path) -> None:
    (tree / ".config").write_text("CONFIG_64BIT=y\n")
    with pytest.raises(KtstrError, match="make mrproper"):
        ensure_kernel(source=tree)


def test_unknown_flavour_and_id() -> None:  # the autouse fixture keeps the user's cache out
    with pytest.raises(KtstrError, match="unknown flavour"):
        ensure_kernel("6.12", flavour="fast")
    with pytest.raises(KtstrError, match=r"unknown kernel id '5\.4'"):
        ensure_kernel("5.4")


def test_cli_list_json(tree: Path) -> None:
    import json

    entry = ensure_kernel(source=tree, schedulers=False)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-m", "ktstr", "kernel", "list", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    record = json.loads(line)
    assert record["key"] == entry.key and record["bzimage"] == str(entry.bzimage)
    assert record["sched_ext"] is False and record["schedulers"] == {}
    for field in ("id", "flavour", "version", "path", "vmlinux"):
        assert field in record


def _rewrite_metadata(path: Path, **changes: object) -> None:
    meta_path = path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes",
    [{"artifacts": 5}, {"id": None}, {"schedulers": []}, {"built_at": "yesterday"},
     {"features": {"sched_ext": "yes"}}],
    ids=["artifacts-int", "no-id", "schedulers-list", "built_at-text", "feature-text"],
)
def test_wrong_typed_metadata_is_rebuilt(tree: Path, changes: dict[str, object],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    _rewrite_metadata(entry.path, **changes)
    rebuilt = ensure_kernel(source=tree, schedulers=False)
    assert builds(tree) == 2
    assert cache.load_entry(rebuilt.path) == rebuilt
    assert f"cache entry {entry.key} is corrupt" in capsys.readouterr().err


def test_cli_list_and_clean_survive_a_bad_entry(tree: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    bad = entry.path.with_name("bad-entry")
    shutil.copytree(entry.path, bad)
    _rewrite_metadata(bad, key=bad.name, schedulers=[])
    capsys.readouterr()
    assert main(["kernel", "list"]) == 0
    out = capsys.readouterr().out
    assert str(entry.path) in out
    (line,) = [line for line in out.splitlines() if "bad-entry" in line]
    assert line.startswith("corrupt") and "schedulers must be an object" in line
    assert main(["kernel", "list", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_path = {r["path"]: r["corrupt"] for r in records}
    assert by_path[str(entry.path)] is None
    assert "schedulers must be an object" in by_path[str(bad)]
    assert main(["kernel", "clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed {bad}\n" in out and f"removed {entry.path}\n" in out
    assert not bad.exists() and not entry.path.exists()


def test_cache_dir_that_is_a_file_is_a_user_error(tree: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(not_a_dir))
    with pytest.raises(KtstrError, match="cannot use the kernel cache"):
        ensure_kernel(source=tree, schedulers=False)


def test_schedulers_of_a_corrupted_entry_is_a_user_error(tree: Path) -> None:
    (tree / "Kconfig").write_text(KCONFIG + "config SCHED_CLASS_EXT\n\tbool \"scx\"\n")
    entry = ensure_kernel(source=tree, schedulers=False)
    entry.bzimage.write_bytes(b"truncated")
    with pytest.raises(KtstrError, match="corrupt"):
        ensure_schedulers(entry)


HOLDER = """
import sys
from pathlib import Path
from ktstr.kernel import ensure_kernel
entry = ensure_kernel(source=Path(sys.argv[1]), schedulers=False)
print(entry.key, flush=True)
sys.stdin.readline()  # uses the entry until told to stop
"""


def _ktstr(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "ktstr", *argv], env=env, text=True,
                          capture_output=True, timeout=60)


def test_entry_in_use_elsewhere_is_neither_cleaned_nor_rebuilt(
        tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    release(entry)  # from here on the other process is the only user
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tree)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().split() == [entry.key]
        capsys.readouterr()
        assert entry.path not in clean()
        assert f"skipping {entry.key}: in use by pid {holder.pid}" in capsys.readouterr().err
        assert cache.load_entry(entry.path) == entry
        entry.bzimage.write_bytes(b"corrupted while in use")
        with pytest.raises(KtstrError, match=f"in use by pid {holder.pid}"):
            ensure_kernel(source=tree, schedulers=False)
        assert entry.bzimage.read_bytes() == b"corrupted while in use" and builds(tree) == 1
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()
    rebuilt = ensure_kernel(source=tree, schedulers=False)
    assert builds(tree) == 2 and rebuilt.bzimage.stat().st_size == 200_000
    assert rebuilt.path in clean() and not rebuilt.path.exists()


def test_clean_elsewhere_skips_what_this_process_uses(tree: Path) -> None:
    entry = ensure_kernel(source=tree, schedulers=False)
    done = _ktstr("kernel", "clean")
    assert done.returncode == 0, done.stderr
    assert f"in use by pid {os.getpid()}" in done.stderr and entry.path.is_dir()
    release(entry)
    assert resolve_kernel(str(entry.path)).entry == entry  # a cache entry path holds it too
    done = _ktstr("kernel", "clean")
    assert f"in use by pid {os.getpid()}" in done.stderr and entry.path.is_dir()
    release(entry)
    assert resolve_kernel(str(entry.bzimage)).entry == entry  # so does its bzImage
    done = _ktstr("kernel", "clean")
    assert f"in use by pid {os.getpid()}" in done.stderr and entry.path.is_dir()
    release(entry)
    done = _ktstr("kernel", "clean")
    assert done.returncode == 0 and f"removed {entry.path}" in done.stdout
    assert not entry.path.exists()


def test_an_entry_is_usable_where_no_lock_can_be_had(tree: Path, tmp_path: Path) -> None:
    from ktstr.kernel import locks

    plain = tmp_path / "plain"
    plain.write_text("")
    assert not locks.hold_shared(plain / "k.use")  # cannot be created: nothing held, no error
    entry = ensure_kernel(source=tree, schedulers=False)
    release(entry)
    assert locks.hold_shared(cache.use_lock_path(tmp_path / "cache", entry.key))
