"""initramfs: cpio newc encoding, compression, ELF closure, the packed Python runtime, cache."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktstr import elf, initramfs
from ktstr.errors import KtstrError
from ktstr.initramfs import (
    TRAILER,
    Archive,
    BaseSpec,
    CpioEntry,
    add_host_path,
    build_base,
    build_suffix,
    compress,
    decode_newc,
    encode_newc,
    pyc_bytes,
    write_archive,
)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")


def sample_archive() -> Archive:
    a = Archive()
    a.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    a.add_file("etc/odd-size", b"abc", 0o600)
    a.add_file("empty", b"")
    a.add_symlink("init", "bin/tool")
    a.add_chardev("dev/console", 5, 1)
    a.add_dir("proc")
    return a


def test_encode_decode_roundtrip() -> None:
    a = sample_archive()
    blob = a.encode()
    assert len(blob) % 4 == 0
    assert blob.startswith(b"070701")
    assert TRAILER.encode() in blob[-128:]
    back = decode_newc(blob)
    assert [e.name for e in back] == [e.name for e in a.entries]
    by_name = {e.name: e for e in back}
    assert by_name["bin/tool"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by_name["bin/tool"].mode) == 0o755
    assert stat.S_ISLNK(by_name["init"].mode) and by_name["init"].data == b"bin/tool"
    dev = by_name["dev/console"]
    assert stat.S_ISCHR(dev.mode) and (dev.rdev_major, dev.rdev_minor) == (5, 1)
    assert stat.S_ISDIR(by_name["bin"].mode)  # parent created on demand


def test_header_fields_are_padded_and_hex() -> None:
    blob = encode_newc([CpioEntry.file("abcde", b"12345")])
    # header 110 + name 6 (with NUL) = 116, already aligned; data 5 -> padded to 8.
    assert blob[110:116] == b"abcde\0"
    assert blob[116:121] == b"12345"
    assert blob[121:124] == b"\0\0\0"
    assert int(blob[6 + 8 * 6:6 + 8 * 7], 16) == 5  # filesize
    assert int(blob[6 + 8 * 11:6 + 8 * 12], 16) == 6  # namesize includes the NUL


@needs_cpio
def test_cpio_tool_lists_and_extracts(tmp_path: Path) -> None:
    blob = sample_archive().encode()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=blob, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == [e.name for e in sample_archive().entries]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=blob,
                   cwd=out, check=True, capture_output=True)
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(out / "bin/tool", os.X_OK)
    assert os.readlink(out / "init") == "bin/tool"
    assert (out / "empty").stat().st_size == 0


def test_archive_rules() -> None:
    a = Archive()
    a.add_file("x", b"1")
    a.add_file("x", b"2")  # last one wins
    assert a.get("x").data == b"2"  # type: ignore[union-attr]
    with pytest.raises(KtstrError, match="not a directory"):
        a.add_file("x/y", b"")
    for bad in ("", "/", "../etc/passwd", "a/../../b"):
        with pytest.raises(KtstrError):
            CpioEntry.file(bad, b"")
    assert CpioEntry.file("/abs//path/./f", b"").name == "abs/path/f"


def test_concatenated_inodes_do_not_collide() -> None:
    suffix = build_suffix({"ktstr/request.json": b"{}"})
    first = int(suffix[6:14], 16)
    assert first >= 1 << 24
    assert decode_newc(suffix)[-1].data == b"{}"


@pytest.mark.parametrize(
    ("kind", "magic"),
    [("gzip", b"\x1f\x8b"), ("lz4", b"\x02\x21\x4c\x18"), ("zstd", b"\x28\xb5\x2f\xfd")],
)
def test_compression_formats(kind: str, magic: bytes, tmp_path: Path) -> None:
    if kind != "gzip" and shutil.which(kind) is None:
        pytest.skip(f"{kind} not installed")
    raw = sample_archive().encode()
    blob = compress(raw, kind)
    assert blob.startswith(magic)  # lz4: the legacy frame the kernel wants
    tool = {"gzip": None, "lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dc"]}[kind]
    if tool is None:
        assert gzip.decompress(blob) == raw
    else:
        assert subprocess.run(tool, input=blob, capture_output=True, check=True).stdout == raw
    path = write_archive(tmp_path / f"a.{kind}", sample_archive(), kind)
    assert path.read_bytes() == blob


def test_unknown_compression() -> None:
    with pytest.raises(KtstrError, match="compression"):
        compress(b"", "brotli")


# --- ELF ------------------------------------------------------------------------------------


def _ldd(path: str) -> set[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > 2 and parts[2].startswith("/"):
            libs.add(os.path.realpath(parts[2]))
        elif parts and parts[0].startswith("/"):
            libs.add(os.path.realpath(parts[0]))
    return libs


@pytest.mark.parametrize("binary", ["/bin/ls", sys.executable])
def test_closure_matches_ldd(binary: str) -> None:
    if not shutil.which("ldd"):
        pytest.skip("ldd not installed")
    closure = elf.library_closure([binary])
    assert closure.missing == {}
    assert {os.path.realpath(f) for f in closure.files} == _ldd(binary)


def test_parse_elf_fields() -> None:
    info = elf.read_elf(os.path.realpath(sys.executable))
    assert info.interp and info.interp.startswith("/")
    assert "libc.so.6" in info.needed


def test_rpath_origin_resolution(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    libdir = tmp_path / "sub" / "lib"
    libdir.mkdir(parents=True)
    (tmp_path / "f.c").write_text("int f(void) { return 42; }\n")
    (tmp_path / "m.c").write_text("int f(void); int main(void) { return f() - 42; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(libdir / "libktf.so"),
                    str(tmp_path / "f.c")], check=True)
    exe = tmp_path / "sub" / "prog"
    subprocess.run([cc, "-o", str(exe), str(tmp_path / "m.c"), f"-L{libdir}", "-lktf",
                    "-Wl,-rpath,$ORIGIN/lib"], check=True)
    assert subprocess.run([str(exe)]).returncode == 0
    info = elf.read_elf(exe)
    assert info.runpath == ("$ORIGIN/lib",) or info.rpath == ("$ORIGIN/lib",)
    closure = elf.library_closure([exe])
    assert str(libdir / "libktf.so") in closure.files
    assert closure.missing == {}


def test_hostile_elf_inputs() -> None:
    with pytest.raises(elf.ElfError):
        elf.parse_elf(b"not an elf at all" * 10)
    good = Path(os.path.realpath(sys.executable)).read_bytes()
    with pytest.raises(elf.ElfError):
        elf.parse_elf(good[:200])  # program headers cut off
    with pytest.raises(elf.ElfError):
        elf.parse_elf(good[:4] + b"\x01" + good[5:])  # 32-bit class


def test_missing_library_is_reported(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "f.c").write_text("int f(void) { return 1; }\n")
    (tmp_path / "m.c").write_text("int f(void); int main(void) { return f(); }\n")
    lib = tmp_path / "libgone.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "f.c")], check=True)
    exe = tmp_path / "prog"
    subprocess.run([cc, "-o", str(exe), str(tmp_path / "m.c"), f"-L{tmp_path}", "-lgone"],
                   check=True)
    lib.unlink()
    assert elf.library_closure([exe]).missing == {"libgone.so": str(exe)}


def test_ld_so_cache_agrees_with_ldconfig() -> None:
    if not Path(elf.LD_SO_CACHE).exists() or not shutil.which("ldconfig"):
        pytest.skip("no ld.so.cache")
    cache = elf.ld_so_cache()
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    checked = 0
    for line in out.splitlines()[1:]:
        if "x86-64" not in line or "=>" not in line:
            continue
        name = line.split()[0]
        path = line.split("=>")[1].strip()
        if cache.get(name) == path:
            checked += 1
    assert checked > 10


# --- packing host paths and the Python runtime ----------------------------------------------


def test_add_host_path_mirrors_symlinked_dirs(tmp_path: Path) -> None:
    real = tmp_path / "usr" / "lib"
    real.mkdir(parents=True)
    (real / "libx.so").write_bytes(b"payload")
    (tmp_path / "lib").symlink_to("usr/lib")
    a = Archive()
    packed = add_host_path(a, str(tmp_path / "lib" / "libx.so"))
    assert packed == str(real / "libx.so")
    link = a.get(str(tmp_path / "lib"))
    assert link is not None and stat.S_ISLNK(link.mode) and link.data == b"usr/lib"
    assert a.get(str(real / "libx.so")).data == b"payload"  # type: ignore[union-attr]


def test_pyc_for_new_source_is_unchecked_hash(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("X = 1\n")
    pyc = pyc_bytes(str(src))
    assert pyc is not None
    import importlib.util

    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 1  # hash-based, unchecked


SCENARIO = '''
import json
import statistics


def scenario(ctx):
    return {"mean": statistics.mean([1, 2, 3])}
'''


@pytest.fixture
def base_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    test_file = tmp_path / "tests" / "scn_unit.py"
    test_file.parent.mkdir()
    test_file.write_text(SCENARIO)
    return test_file


def test_base_archive_contents_and_cache(base_env: Path) -> None:
    spec = BaseSpec(test_files=(base_env,), busybox=None)
    first = build_base(spec)
    assert not first.cached
    names = {e.name for e in decode_newc(first.path.read_bytes())}
    python = os.path.realpath(sys.executable)
    assert python.lstrip("/") in names
    assert "init" in names and "dev/console" in names
    assert any(n.endswith("ktstr/guest/init.py") for n in names)
    assert str(base_env).lstrip("/") in names
    assert any(n.endswith("/statistics.py") for n in names)  # found from the test module
    assert any("lib-dynload/_ctypes" in n for n in names)
    assert any("libffi" in n for n in names)  # _ctypes' library closure
    assert not any("/tkinter/" in n for n in names)
    init = next(e for e in decode_newc(first.path.read_bytes()) if e.name == "init")
    assert init.data.startswith(f"#!{python} -SIBu\n".encode())

    t0 = time.monotonic()
    again = build_base(spec)
    elapsed = time.monotonic() - t0
    assert again.cached and again.path == first.path
    assert elapsed < 0.1, f"cached base lookup took {elapsed * 1000:.0f} ms"

    base_env.write_text(SCENARIO + "\nY = 2\n")
    os.utime(base_env, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not build_base(spec).cached


def test_guest_runtime_packs_the_wire_contract() -> None:
    """The guest init imports the host-guest contract; the packer must find all of it."""
    search = initramfs.search_path(BaseSpec())
    modules = initramfs.find_modules([], search, (initramfs.GUEST_MODULE,))
    wire = {m for m in modules if m.startswith("ktstr.wire")}
    assert {"ktstr.wire", "ktstr.wire.frame", "ktstr.wire.request", "ktstr.wire.ports"} <= wire
    assert not any(m.startswith("ktstr.vmm") for m in modules)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("cpio"), reason="needs root, cpio")
def test_packed_runtime_imports_in_a_chroot(base_env: Path, tmp_path: Path) -> None:
    """The archive alone is enough to import the guest init and the scenario module."""
    base = build_base(BaseSpec(test_files=(base_env,), busybox=None))
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                   input=base.path.read_bytes(), cwd=root, check=True, capture_output=True)
    code = (f"import sys; sys.path[:0] = {list(base.sys_path)!r}; import ktstr.guest.init; "
            "import importlib.util as u; "
            f"s = u.spec_from_file_location('scn_unit', {str(base_env)!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.scenario(None)['mean'])")

    def enter_root() -> None:
        os.chroot(root)
        os.chdir("/")

    proc = subprocess.run([base.python, "-SIB", "-c", code], capture_output=True, text=True,
                          env={}, preexec_fn=enter_root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


def test_busybox_archive_has_init_console_and_a_binary_with_its_libraries() -> None:
    busybox = initramfs.default_busybox()
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    archive = initramfs.busybox_archive(busybox, "#!/bin/busybox sh\n", ["/usr/bin/env"])
    names = {e.name for e in archive.entries}
    assert {"bin/busybox", "init", "dev/console", "proc", "tmp"} <= names
    assert "usr/bin/env" in names or any(n.endswith("bin/env") for n in names)
    assert any("libc.so" in n for n in names)


def test_busybox_archive_names_the_package_when_busybox_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="busybox-static"):
        initramfs.busybox_archive(tmp_path / "nope", "")


def test_template_build_init_formats_the_disk_after_the_shared_preamble(tmp_path: Path) -> None:
    """The mkfs guest's archive comes from the one busybox writer, with its mkfs packed."""
    from ktstr.disks import template
    from ktstr.disks.config import Filesystem

    busybox = initramfs.default_busybox()
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    mkfs = Path("/usr/bin/env")  # any dynamic host binary stands in for mkfs here
    path = template.build_initramfs(tmp_path / "t.cpio", Filesystem.EXT4, mkfs, busybox)
    entries = {e.name: e for e in decode_newc(path.read_bytes())}
    init = entries["init"].data.decode()
    assert init.startswith(initramfs.BUSYBOX_INIT_PREAMBLE)
    assert f"{mkfs} -F -q /dev/vda" in init
    assert "usr/bin/env" in entries and any("libc.so" in n for n in entries)


def test_busybox_archive_packs_a_dynamic_busybox_with_its_libraries() -> None:
    """A non-static busybox works too: its own shared libraries are packed."""
    env = "/usr/bin/env"  # dynamic; stands in for a busybox built against glibc
    archive = initramfs.busybox_archive(Path(env), "#!/bin/busybox sh\n")
    names = {e.name for e in archive.entries}
    assert "bin/busybox" in names and any("libc.so" in n for n in names)
