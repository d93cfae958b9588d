"""The kernel catalog and source resolution."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.kernel.catalog import DEFAULT_KERNEL, fragments_dir, load_catalog, parse_catalog
from ktstr.kernel.kconfig import load_fragment
from ktstr.kernel.source import resolve_source, tarball_digest


def test_project_catalog() -> None:
    catalog = load_catalog()
    assert catalog.default == DEFAULT_KERNEL == "6.12"
    assert {"6.12", "6.1"} <= set(catalog.kernels)
    for kid in ("6.12", "6.1"):
        entry = catalog.get(kid)
        assert entry.kind == "debian" and entry.apt_package == f"linux-source-{kid}"
        for name in entry.fragments:  # version-specific fragments exist and parse
            assert load_fragment(fragments_dir() / name).options
    assert catalog.get("6.1").fragments == ("6.1.kconfig",)


def test_unknown_id_lists_known_ones() -> None:
    with pytest.raises(KtstrError, match=r"unknown kernel id '7\.0'.*6\.1, 6\.12"):
        load_catalog().get("7.0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[kernels."x"]\nsource = "ftp"\n', "source must be one of"),
        ('[kernels."x"]\nsource = "url"\nurl = "http://h/x.tar"\nsha256 = "12"\n',
         "64 hex digits"),
        ('[kernels."x"]\nsource = "debian"\ntarball = "/x"\n', "needs apt_package"),
        ('default = "y"\n[kernels."x"]\nsource = "path"\npath = "/x"\n', "default 'y'"),
        ("nope = [", "invalid TOML"),
        ('[kernels."x"]\nsource = "path"\npath = "/x"\nfragments = "a.kconfig"\n',
         "fragments must be a list"),
    ],
)
def test_bad_catalogs(text: str, message: str) -> None:
    with pytest.raises(KtstrError, match=message):
        parse_catalog(text)


def test_missing_debian_tarball_names_the_apt_package(tmp_path: Path) -> None:
    catalog = parse_catalog(
        f'[kernels."6.12"]\nsource = "debian"\napt_package = "linux-source-6.12"\n'
        f'tarball = "{tmp_path}/linux-source-6.12.tar.xz"\n'
    )
    with pytest.raises(KtstrError, match=r"apt-get install linux-source-6\.12"):
        resolve_source(catalog.get("6.12"), None, tmp_path)


def test_tarball_digest_is_remembered_by_stat(tmp_path: Path) -> None:
    tarball = tmp_path / "linux.tar"
    tarball.write_bytes(b"one")
    first = tarball_digest(tarball, tmp_path / "cache")
    assert tarball_digest(tarball, tmp_path / "cache") == first
    tarball.write_bytes(b"two")
    os.utime(tarball, ns=(0, time.time_ns() + 10**9))
    assert tarball_digest(tarball, tmp_path / "cache") != first


def test_git_tree_digest_follows_commits_and_edits(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Kconfig").write_text("config A\n\tbool \"a\"\n")
    (tree / "Makefile").write_text("all:\n")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    first = resolve_source(None, tree, tmp_path / "cache")
    assert first.description.startswith("git ") and first.tree == tree
    (tree / "Makefile").write_text("all:\n\ttrue\n")
    edited = resolve_source(None, tree, tmp_path / "cache")
    assert edited.digest != first.digest
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    assert resolve_source(None, tree, tmp_path / "cache").digest not in (first.digest,
                                                                         edited.digest)


def test_local_path_must_be_a_kernel_tree(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="not a kernel source tree"):
        resolve_source(None, tmp_path, tmp_path / "cache")
    with pytest.raises(KtstrError, match="neither a directory nor a tarball"):
        resolve_source(None, tmp_path / "missing", tmp_path / "cache")


@pytest.mark.parametrize("entry", [None, {"stamp": "stamp"}, {"stamp": "stamp", "sha256": 5},
                                   {"stamp": "stamp", "sha256": "short"}],
                         ids=["list", "no-sha256", "int-sha256", "short-sha256"])
def test_tarball_digest_ignores_a_memo_it_cannot_use(tmp_path: Path, entry: object) -> None:
    import hashlib
    import json

    tarball = tmp_path / "linux.tar"
    tarball.write_bytes(b"one")
    st = tarball.stat()
    memo = tmp_path / "cache" / "sources" / "digests.json"
    memo.parent.mkdir(parents=True)
    if isinstance(entry, dict) and entry["stamp"] == "stamp":
        entry = dict(entry, stamp=[st.st_size, st.st_mtime_ns])
    memo.write_text(json.dumps([1] if entry is None else {str(tarball): entry}))
    assert tarball_digest(tarball, tmp_path / "cache") == hashlib.sha256(b"one").hexdigest()
