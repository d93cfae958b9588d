"""Property: whatever a still-valid-JSON metadata.json holds, readers never raise.

A valid entry's metadata.json is mutated (random JSON values put at random
keys, or keys removed, at any depth); every reader then returns either an
entry whose fields have their declared types or a CorruptEntry with a reason.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktstr.kernel import cache
from ktstr.kernel.cache import CorruptEntry, KernelEntry

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=3),
    max_leaves=8,
)


@pytest.fixture
def entry(tmp_path: Path) -> tuple[KernelEntry, str]:
    """An installed entry with a scheduler, and its metadata.json as installed."""
    build = tmp_path / "build"
    build.mkdir()
    files = {}
    for name, size in (("bzImage", 4000), ("vmlinux", 3 << 20), (".config", 200),
                       ("System.map", 300)):
        files[name] = build / name.strip(".")
        files[name].write_bytes(os.urandom(size))
    meta = {"id": "6.12", "flavour": "test", "version": "6.12.0", "built_at": 1.5,
            "features": {"sched_ext": True, "btf": False}, "source_tree": str(build),
            "phases": {"make": 1.0}}
    installed = cache.install_entry(tmp_path / "root", "6.12-test-k", files, meta)
    scheduler = build / "scx_simple"
    scheduler.write_bytes(b"\x7fELF")
    installed = cache.install_schedulers(installed, {"scx_simple": scheduler})
    return installed, (installed.path / "metadata.json").read_text()


def _paths(doc: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path in the document, at any depth."""
    found: list[tuple[str, ...]] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.append((*prefix, key))
            found.extend(_paths(value, (*prefix, key)))
    return found


def _mutate(doc: dict[str, Any], path: tuple[str, ...], value: object, delete: bool) -> object:
    if not path:
        return value
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return doc


def _check_typed(got: KernelEntry) -> None:
    for text in (got.id, got.flavour, got.key, got.version):
        assert isinstance(text, str) and text
    assert all(isinstance(k, str) and type(v) is bool for k, v in got.features.items())
    for name, binary in got.schedulers.items():
        assert isinstance(name, str) and isinstance(binary, Path)
        assert binary.resolve().is_relative_to(got.path.resolve())


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_metadata_is_an_entry_or_corrupt(entry: tuple[KernelEntry, str],
                                                 data: st.DataObject) -> None:
    installed, text = entry
    meta_path = installed.path / "metadata.json"
    doc: object = json.loads(text)  # each example starts from the installed document
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [(), *_paths(doc)]
        path = data.draw(st.sampled_from(paths), label="at")
        if isinstance(doc, dict) and data.draw(st.booleans(), label="new key below"):
            parent = path if isinstance(_lookup(doc, path), dict) else path[:-1]
            path = (*parent, data.draw(st.text(max_size=8), label="key"))
        value = data.draw(JSON, label="value")
        delete = bool(path) and data.draw(st.booleans(), label="delete")
        doc = _mutate(doc, path, value, delete) if isinstance(doc, dict) else value
    meta_path.write_text(json.dumps(doc))
    for verify in (True, False):
        try:
            got = cache.load_entry(installed.path, verify=verify)
        except CorruptEntry as err:
            assert str(err)
        else:
            _check_typed(got)
    good, bad = cache.scan_entries(installed.path.parent.parent)
    assert len(good) + len(bad) == 1
    if bad:
        assert bad[0].reason and bad[0].path == installed.path
    else:
        _check_typed(good[0])
        assert math.isfinite(cache.read_metadata(installed.path).built_at)


def _lookup(doc: object, path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc
