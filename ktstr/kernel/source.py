"""Where a kernel's source comes from, its digest, and its unpacked tree.

The digest is part of the cache key, so it must be cheap on a warm cache hit:
a tarball's sha256 is computed once and remembered by (path, size, mtime) —
not the inode, which a shared filesystem (the sandbox's 9p) renumbers; a git
checkout is HEAD plus its uncommitted diff; a plain tree is a stamp of its
source files' sizes and mtimes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ktstr import reap
from ktstr.errors import KtstrError
from ktstr.kernel.catalog import CatalogKernel
from ktstr.kernel.download import download, sha256_file
from ktstr.kernel.locks import file_lock

TARBALL_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar.zst")
# Files whose content defines a plain tree; build products are left out.
_TREE_SUFFIXES = (".c", ".h", ".S", ".rs", ".lds", ".dts", ".dtsi", ".sh", ".py", ".pl")
_TREE_NAMES = ("Makefile", "Kbuild", "Kconfig")


@dataclass(frozen=True)
class Source:
    description: str
    digest: str
    tarball: Path | None = None  # an archive to unpack (once per digest)
    tree: Path | None = None  # an existing tree, built out of tree
    url: str | None = None  # where to fetch `tarball` from if it is missing

    def materialize(self, root: Path) -> Path:
        """The source tree to build from (downloading/unpacking on first use)."""
        if self.tree is not None:
            return self.tree
        if self.tarball is None:
            raise KtstrError(f"kernel source {self.description}: neither a tree nor a tarball")
        if self.url is not None:
            download(self.url, self.tarball, self.digest)
        return extract(self.tarball, self.digest, root / "sources")


def resolve_source(kernel: CatalogKernel | None, source: Path | None, root: Path) -> Source:
    if source is not None:
        return _local(source, root)
    if kernel is None:
        raise KtstrError("no kernel to build: give a catalog id or --source PATH")
    if kernel.kind == "debian" and kernel.tarball is not None:
        if not kernel.tarball.is_file():
            raise KtstrError(
                f"kernel {kernel.id} needs {kernel.tarball}, which is missing: "
                f"apt-get install {kernel.apt_package}"
            )
        return Source(f"debian {kernel.apt_package} ({kernel.tarball})",
                      tarball_digest(kernel.tarball, root), tarball=kernel.tarball)
    if kernel.kind == "url" and kernel.url is not None and kernel.sha256 is not None:
        name = kernel.url.rstrip("/").rsplit("/", 1)[-1] or "linux.tar"
        dest = root / "downloads" / f"{kernel.sha256[:16]}-{name}"
        return Source(f"url {kernel.url}", kernel.sha256, tarball=dest, url=kernel.url)
    if kernel.kind == "path" and kernel.path is not None:
        return _local(kernel.path, root)
    raise KtstrError(f"catalog kernel {kernel.id}: source = {kernel.kind!r} without its fields")


def _local(path: Path, root: Path) -> Source:
    path = path.expanduser().resolve()
    if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
        return Source(f"tarball {path}", tarball_digest(path, root), tarball=path)
    if not path.is_dir():
        raise KtstrError(f"kernel source {path} is neither a directory nor a tarball")
    if not (path / "Kconfig").is_file() or not (path / "Makefile").is_file():
        raise KtstrError(f"{path} is not a kernel source tree (no top-level Kconfig/Makefile)")
    if (path / ".config").exists() or (path / "include" / "config").exists():
        raise KtstrError(
            f"{path} has an in-tree build (.config); ktstr builds out of tree: "
            "run `make mrproper` there or pass a clean tree"
        )
    if (path / ".git").exists():
        return Source(f"git {path}", _git_digest(path), tree=path)
    return Source(f"tree {path}", _tree_digest(path), tree=path)


def tarball_digest(path: Path, root: Path) -> str:
    """sha256 of a tarball, remembered by its stat so a warm lookup costs nothing."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = root / "sources" / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError, RecursionError):
        memo = {}
    if not isinstance(memo, dict):  # valid JSON but not ours: start over
        memo = {}
    known = memo.get(str(path))
    if isinstance(known, dict) and known.get("stamp") == stamp \
            and isinstance(known.get("sha256"), str) and len(known["sha256"]) == 64:
        return str(known["sha256"])
    digest = sha256_file(path)
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_path)
    return digest


def _git_digest(path: Path) -> str:
    def git(*args: str) -> bytes:
        try:
            return subprocess.run(["git", "-C", str(path), *args], check=True,
                                  capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise KtstrError(f"cannot read git state of {path}: {err}") from None

    digest = hashlib.sha256(git("rev-parse", "HEAD"))
    digest.update(git("diff", "HEAD", "--binary"))
    return digest.hexdigest()


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "generated")
        for name in sorted(filenames):
            if name.endswith(_TREE_SUFFIXES) or name.startswith(_TREE_NAMES):
                st = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), path)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def extract(tarball: Path, digest: str, sources: Path) -> Path:
    """Unpack once per digest; the rename makes a half-unpacked tree invisible.

    The unpack dir is named after this process: one left by a killed run is
    removed when the next one creates its own (`reap`).
    """
    final = sources / digest[:16]
    if not final.is_dir():
        sources.mkdir(parents=True, exist_ok=True)
        with file_lock(sources / ".locks" / f"{digest[:16]}.lock"):
            if not final.is_dir():
                tmp = reap.mkdtemp("unpack", sources, hidden=True)
                try:
                    proc = subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise KtstrError(f"cannot unpack {tarball}: {proc.stderr.strip()[-300:]}")
                    os.replace(tmp, final)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(tmp)
    return _tree_in(final, tarball)


def _tree_in(unpacked: Path, tarball: Path) -> Path:
    if (unpacked / "Kconfig").is_file():
        return unpacked
    subdirs = [p for p in unpacked.iterdir() if p.is_dir()]
    for sub in subdirs:
        if (sub / "Kconfig").is_file():
            return sub
    raise KtstrError(f"{tarball} does not contain a kernel source tree")
