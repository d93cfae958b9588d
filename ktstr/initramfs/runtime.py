"""The guest Python runtime packer: which files a guest needs, mirrored at their host paths.

The runtime (interpreter, libpython, the stdlib modules the guest init and the
test modules import, their extension modules and shared-library closure,
busybox) is packed at the same absolute paths as on the host, so the
interpreter, ``ld.so`` and RUNPATHs work unchanged. :mod:`ktstr.initramfs.cache`
keeps the result as the cached base archive.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import modulefinder
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktstr import elf, reap
from ktstr.errors import KtstrError
from ktstr.initramfs.cpio import Archive, CpioEntry


def add_host_path(archive: Archive, path: str, data: bytes | None = None,
                  mtime: int | None = None, _depth: int = 0) -> str:
    """Pack host ``path`` at the same absolute path in the guest, mirroring symlinks.

    Symlinked components (Debian's ``/lib -> usr/lib``) become the same
    symlinks in the archive, so a loader or interpreter that finds a file by
    some path on the host finds it by that path in the guest. Returns the
    real path packed. ``data`` overrides the file content (e.g. stripped).
    """
    if _depth > 40:
        raise KtstrError(f"initramfs: too many symlinks resolving {path}")
    parts = Path(os.path.abspath(path)).parts[1:]
    cur = "/"
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            existing = archive.get(nxt)
            if existing is None or not stat.S_ISLNK(existing.mode):
                archive.add_symlink(nxt, target)
            resolved = target if os.path.isabs(target) else os.path.join(cur, target)
            rest = os.path.join(os.path.normpath(resolved), *parts[i + 1:])
            return add_host_path(archive, rest, data, mtime, _depth + 1)
        cur = nxt
    st = os.stat(cur)
    if stat.S_ISDIR(st.st_mode):
        archive.add_dir(cur, st.st_mode & 0o7777)
    else:
        content = Path(cur).read_bytes() if data is None else data
        entry = CpioEntry.file(cur, content, st.st_mode & 0o7777)
        if mtime is not None:
            entry = CpioEntry(entry.name, entry.mode, entry.data, mtime=mtime)
        archive.add(entry)
    return cur


# --- the guest Python runtime ------------------------------------------------------------

DEFAULT_COMPRESSION = "none"
GUEST_MODULE = "ktstr.guest.init"
KTSTR_DIR = Path(__file__).resolve().parents[1]
"""The ktstr package directory (this file is ktstr/initramfs/runtime.py)."""
MODULE_EXCLUDES = (
    "tkinter", "_tkinter", "idlelib", "lib2to3", "test", "ensurepip", "turtledemo", "turtle",
    "pydoc_data", "distutils", "venv",
)
"""Never needed in the guest and large (GUI, test suites, installers)."""
SOFT_EXCLUDES = ("pdb", "pydoc", "doctest", "xmlrpc", "http.server", "webbrowser")
"""Debugging and documentation tools that modulefinder reaches only through imports inside
functions (e.g. ``inspect`` -> ``pydoc`` -> ``http.server`` -> ``ssl`` -> libcrypto);
packed only when named in ``BaseSpec.modules``."""
ALWAYS_PACKAGES = ("encodings",)
"""Imported by the interpreter at startup, or dynamically by name (modulefinder misses them)."""
GUEST_DIRS = ("proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt", "ktstr/bin")
GUEST_PATH_DIR = "ktstr/bin"
INTERP_FLAGS = "-SIBu"
"""No site (paths are explicit), isolated (no env vars, no cwd on sys.path), no .pyc
writes, unbuffered output to the console."""


@dataclass(frozen=True)
class BaseSpec:
    """What goes into the cached base archive."""

    test_files: tuple[Path, ...] = ()
    binaries: tuple[Path, ...] = ()
    """Extra executables (scheduler, mkfs.btrfs, ...) packed at their host paths with
    their shared-library closure."""
    modules: tuple[str, ...] = ()
    """Extra module names to pack (imported dynamically by the scenario)."""
    busybox: Path | None = None
    compression: str = DEFAULT_COMPRESSION
    strip: bool = True
    """Strip debug info from the interpreter and shared libraries (not from `binaries`)."""


def search_path(spec: BaseSpec) -> list[str]:
    """Where the guest's modules are looked up: ktstr, the test files' directories, the
    interpreter's stdlib and site-packages. Deliberately not ``sys.path``, which also
    holds the invoking script's directory and whatever pytest inserted, so the same
    request yields the same archive from any caller."""
    paths = sysconfig.get_paths()
    stdlib = paths["stdlib"]
    candidates = [
        str(KTSTR_DIR.parent),
        *(str(Path(t).resolve().parent) for t in spec.test_files),
        stdlib,
        os.path.join(stdlib, "lib-dynload"),
        paths["platstdlib"],
        *site.getsitepackages(),
        paths["purelib"],
        paths["platlib"],
    ]
    return list(dict.fromkeys(os.path.abspath(p) for p in candidates if os.path.isdir(p)))


class _Finder(modulefinder.ModuleFinder):
    """modulefinder limited to the stdlib, ktstr and the test files' own directories.

    Third-party packages (anything under a site-packages directory) are not
    scanned: their static import graph is enormous (pytest reaches numpy,
    IPython, cryptography through optional imports inside functions). They
    are packed from what importing the test modules actually loads (see
    :func:`trace_imports`). Namespace packages (no loader) count as not found
    instead of crashing modulefinder.
    """

    def __init__(self, path: list[str], excludes: list[str], blocked: list[str]) -> None:
        super().__init__(path=path, excludes=excludes)
        self.blocked = [b.rstrip("/") + "/" for b in blocked]

    def find_module(self, name: str, path: Any, parent: Any = None) -> Any:
        try:
            found = super().find_module(name, path, parent)
        except AttributeError as err:
            raise ImportError(f"{name}: {err}") from err
        # ktstr itself is scanned wherever it is installed. Decided by path, not by name:
        # modulefinder looks a package's own __init__ up with no parent, so a name test
        # blocked a site-packages ktstr whole and its lazy imports (gzip) went unpacked.
        pathname = found[1]
        if pathname and not Path(pathname).resolve().is_relative_to(KTSTR_DIR) and any(
                os.path.abspath(pathname).startswith(b) for b in self.blocked):
            if found[0] is not None:
                found[0].close()
            raise ImportError(f"{name}: third-party, packed from the import trace")
        return found


_TRACE = """
import importlib, importlib.util, json, os, sys
paths, files, names = json.loads(sys.argv[1])
sys.path[:0] = paths
for name in names:
    importlib.import_module(name)
for i, f in enumerate(files):
    sys.path.insert(0, os.path.dirname(f))
    spec = importlib.util.spec_from_file_location("_ktstr_trace_%d" % i, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
out = {}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f and not name.startswith("_ktstr_trace_") and name != "__main__":
        out[name] = f
print(json.dumps(out))
"""


def trace_imports(files: Iterable[Path], path: list[str], names: Iterable[str]
                  ) -> dict[str, str]:
    """module -> file for everything importing ``names`` and then ``files`` loads (host run)."""
    arg = json.dumps([path, [str(f) for f in files], list(names)])
    proc = subprocess.run([sys.executable, "-c", _TRACE, arg], capture_output=True, text=True,
                          check=False, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise KtstrError("initramfs: importing the test modules on the host failed; fix "
                         f"them first:\n{proc.stderr[-3000:]}")
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def find_modules(scripts: Iterable[Path], path: list[str], extra: Iterable[str] = ()
                 ) -> dict[str, str]:
    """module name -> host file for what the guest will import.

    Static (modulefinder, imports inside functions included) over the stdlib,
    ktstr and the test files' directories; plus whatever actually importing
    ``extra`` and the test modules loads (third-party packages).
    """
    scripts = list(scripts)
    extra = tuple(extra)
    soft = [m for m in SOFT_EXCLUDES if m not in extra]
    blocked = [p for p in path if os.path.basename(p) in ("site-packages", "dist-packages")]
    finder = _Finder(path, [*MODULE_EXCLUDES, *soft], blocked)
    for script in scripts:
        finder.run_script(str(script))
    for name in (*extra, *ALWAYS_PACKAGES, sysconfig_data_module()):
        # Third-party names fail here; the trace below finds them.
        with contextlib.suppress(ImportError):
            finder.import_hook(name)
    out: dict[str, str] = {}
    for name, mod in finder.modules.items():
        file = getattr(mod, "__file__", None)
        if file and name != "__main__":
            out[name] = file
    for name, file in trace_imports(scripts, path, extra).items():
        if name.split(".")[0] not in MODULE_EXCLUDES:
            out.setdefault(name, file)
    for pkg in ALWAYS_PACKAGES:
        pkg_dir = Path(out[pkg]).parent
        for f in pkg_dir.glob("*.py"):
            out.setdefault(f"{pkg}.{f.stem}", str(f))
    return out


def sysconfig_data_module() -> str:
    return sysconfig._get_sysconfigdata_name()  # type: ignore[attr-defined]


def pyc_bytes(source_path: str) -> bytes | None:
    """The .pyc to ship with a source file.

    The host's own cached .pyc is reused when it matches the source's size
    and mtime (we pack the source with the same mtime, so it stays valid);
    otherwise an unchecked hash-based .pyc is compiled, which the guest
    never revalidates.
    """
    st = os.stat(source_path)
    try:
        cached = Path(importlib.util.cache_from_source(source_path)).read_bytes()
        if (cached[:4] == importlib.util.MAGIC_NUMBER
                and int.from_bytes(cached[4:8], "little") == 0
                and int.from_bytes(cached[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(cached[12:16], "little") == st.st_size & 0xFFFFFFFF):
            return cached
    except (OSError, ValueError):
        pass
    source = Path(source_path).read_bytes()
    try:
        code = compile(source, source_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    from importlib import _bootstrap_external

    return bytes(_bootstrap_external._code_to_hash_pyc(  # type: ignore[attr-defined]
        code, importlib.util.source_hash(source), checked=False))


def _stripped(path: str) -> bytes | None:
    tool = shutil.which("objcopy")
    if tool is None:
        return None
    with reap.temporary_directory("strip") as tmp:
        out = os.path.join(tmp, "stripped")
        proc = subprocess.run([tool, "--strip-debug", path, out], capture_output=True,
                              check=False)
        if proc.returncode != 0:
            return None
        return Path(out).read_bytes()


def pack_runtime(spec: BaseSpec, python: str) -> tuple[Archive, set[str], list[str]]:
    """Build the base archive in memory: (archive, host files packed, guest sys.path)."""
    archive = Archive()
    for d in GUEST_DIRS:
        archive.add_dir(d)
    archive.add_chardev("dev/console", 5, 1, 0o600)
    archive.add_chardev("dev/null", 1, 3, 0o666)
    deps: set[str] = set()

    search = search_path(spec)
    modules = find_modules(spec.test_files, search, (GUEST_MODULE, *spec.modules))

    elf_files: list[str] = []
    used_dirs: dict[str, None] = {}
    for name, host_file in sorted(modules.items()):
        host_file = os.path.abspath(host_file)
        root = _module_root(host_file, name)
        if root is not None:
            used_dirs[root] = None
        if host_file.endswith(".py"):
            mtime = int(os.stat(host_file).st_mtime)
            real = add_host_path(archive, host_file, mtime=mtime)
            deps.add(host_file)
            pyc = pyc_bytes(real)
            if pyc is not None:
                add_host_path(archive, os.path.dirname(real))
                archive.add_file(importlib.util.cache_from_source(real), pyc, 0o644)
        elif host_file.endswith(".so"):
            elf_files.append(host_file)
    for test in spec.test_files:
        add_host_path(archive, str(Path(test).resolve()),
                      mtime=int(os.stat(test).st_mtime))
        deps.add(str(Path(test).resolve()))

    # The interpreter finds its prefix from the landmark lib/pythonX.Y/os.py and its
    # exec prefix from lib-dynload; both must exist even if no extension is packed.
    stdlib = sysconfig.get_paths()["stdlib"]
    add_host_path(archive, os.path.join(stdlib, "lib-dynload"))

    binaries = [python, *elf_files]
    user_bins = [os.path.abspath(b) for b in spec.binaries]
    if spec.busybox:
        user_bins.append(os.path.abspath(spec.busybox))
    closure = elf.library_closure([*binaries, *user_bins])
    if closure.missing:
        missing = ", ".join(f"{lib} (needed by {by})" for lib, by in closure.missing.items())
        raise KtstrError(f"initramfs: shared libraries not found: {missing}; install them")
    for f in [*binaries, *closure.files]:
        data = _stripped(f) if spec.strip and elf.is_elf(f) else None
        add_host_path(archive, f, data=data)
        deps.add(f)
    for f in user_bins:
        add_host_path(archive, f)
        deps.add(f)

    if spec.busybox:
        _add_busybox(archive, os.path.abspath(spec.busybox))

    # Search order first; then roots only the import trace knew (.pth-added paths).
    guest_path = [p for p in search if p in used_dirs]
    guest_path += [p for p in used_dirs if p not in guest_path]
    init = (f"#!{python} {INTERP_FLAGS}\n"
            "import sys\n"
            f"sys.path[:0] = {guest_path!r}\n"
            "try:\n"
            "    from ktstr.guest.init import main\n"
            "except BaseException:\n"
            "    import ctypes, os, traceback\n"
            "    traceback.print_exc()\n"
            "    os.sync()\n"
            "    ctypes.CDLL(None).reboot(0x4321FEDC)\n"
            "main()\n")
    archive.add_file("init", init.encode(), 0o755)
    return archive, deps, guest_path


def _module_root(host_file: str, module: str) -> str | None:
    """The sys.path entry ``module`` lives under (``a.b`` in ``R/a/b.py`` -> ``R``).

    None for aliases whose file does not sit at their name's place
    (``os.path`` is posixpath.py, ``_frozen_importlib`` is importlib/_bootstrap.py).
    """
    parts = module.split(".")
    base = os.path.basename(host_file)
    if base.startswith("__init__."):
        parts.append("__init__")
    here = os.path.dirname(host_file)
    if base.split(".")[0] != parts[-1]:
        return None
    for part in reversed(parts[:-1]):
        if os.path.basename(here) != part:
            return None
        here = os.path.dirname(here)
    return here


def _add_busybox(archive: Archive, busybox: str) -> None:
    proc = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=False)
    for applet in proc.stdout.split():
        if "/" not in applet:
            archive.add_symlink(f"{GUEST_PATH_DIR}/{applet}", busybox)
    sh = os.path.join(os.path.realpath("/bin"), "sh")
    if sh.lstrip("/") not in archive:
        archive.add_symlink(sh, busybox)
