"""The kernel catalog (`kernels/versions.toml`): which ids exist and where their source is."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.paths import kernels_dir

SOURCE_KINDS = ("debian", "url", "path")


def catalog_path() -> Path:
    return kernels_dir() / "versions.toml"


def fragments_dir() -> Path:
    return kernels_dir()


@dataclass(frozen=True)
class CatalogKernel:
    id: str
    kind: str  # one of SOURCE_KINDS
    description: str = ""
    apt_package: str | None = None
    tarball: Path | None = None  # "debian"
    url: str | None = None  # "url"
    sha256: str | None = None  # "url"
    path: Path | None = None  # "path"
    fragments: tuple[str, ...] = ()  # extra fragments (in kernels/) for this kernel only


@dataclass(frozen=True)
class Catalog:
    default: str
    kernels: dict[str, CatalogKernel]

    def get(self, kernel_id: str) -> CatalogKernel:
        try:
            return self.kernels[kernel_id]
        except KeyError:
            known = ", ".join(sorted(self.kernels))
            raise KtstrError(
                f"unknown kernel id {kernel_id!r}: the catalog has {known}; "
                "or build a local tree with --source PATH"
            ) from None


def parse_catalog(text: str, origin: str = "versions.toml") -> Catalog:
    """Parse and validate catalog TOML text (pure, so tests can feed their own)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise KtstrError(f"{origin}: invalid TOML: {err}") from None
    raw = data.get("kernels")
    if not isinstance(raw, dict) or not raw:
        raise KtstrError(f"{origin}: no [kernels.\"ID\"] tables")
    kernels: dict[str, CatalogKernel] = {}
    for kid, table in raw.items():
        kernels[kid] = _parse_entry(kid, table, origin)
    default = data.get("default", next(iter(kernels)))
    if default not in kernels:
        raise KtstrError(f"{origin}: default {default!r} is not a catalog id")
    return Catalog(default=default, kernels=kernels)


def _parse_entry(kid: str, table: object, origin: str) -> CatalogKernel:
    where = f"{origin}: kernel {kid!r}"
    if not isinstance(table, dict):
        raise KtstrError(f"{where}: must be a table")
    kind = table.get("source")
    if kind not in SOURCE_KINDS:
        raise KtstrError(f"{where}: source must be one of {', '.join(SOURCE_KINDS)}")

    def need(field: str) -> str:
        value = table.get(field)
        if not isinstance(value, str) or not value:
            raise KtstrError(f"{where}: source = {kind!r} needs {field} = \"...\"")
        return value

    desc = str(table.get("description", ""))
    frags = table.get("fragments", [])
    if not isinstance(frags, list) or not all(isinstance(f, str) for f in frags):
        raise KtstrError(f"{where}: fragments must be a list of file names in kernels/")
    extra = tuple(frags)
    if kind == "debian":
        return CatalogKernel(kid, kind, desc, apt_package=need("apt_package"),
                             tarball=Path(need("tarball")), fragments=extra)
    if kind == "url":
        digest = need("sha256").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KtstrError(f"{where}: sha256 must be 64 hex digits")
        return CatalogKernel(kid, kind, desc, url=need("url"), sha256=digest, fragments=extra)
    return CatalogKernel(kid, kind, desc, path=Path(need("path")).expanduser(),
                         fragments=extra)


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or catalog_path()
    try:
        text = path.read_text()
    except OSError as err:
        raise KtstrError(f"cannot read the kernel catalog {path}: {err.strerror}") from None
    return parse_catalog(text, str(path))


DEFAULT_KERNEL = "6.12"
