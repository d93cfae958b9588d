"""Resumable, checksummed downloads of kernel tarballs.

The file grows as `<dest>.part`; an interrupted download resumes with an HTTP
Range request. Only a file whose sha256 matches is renamed to `dest`, so the
cache never holds a tarball that was not verified.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ktstr.errors import KtstrError

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, *, timeout: float = 60.0,
             progress: bool | None = None) -> Path:
    """Download `url` to `dest` unless it is already there; verify `sha256`."""
    import requests  # host-only dependency, imported on demand
    from tqdm import tqdm

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as err:
        raise KtstrError(f"cannot download {url}: {err}; check the network or the URL") from None
    with resp:
        if resp.status_code == 416 and have:
            pass  # the partial file is already complete: verify it below
        elif resp.status_code == 206 and have:
            _append(resp, part, have, "ab", progress, tqdm)
        elif resp.status_code == 200:
            _append(resp, part, 0, "wb", progress, tqdm)  # server ignored Range: start over
        else:
            raise KtstrError(f"cannot download {url}: HTTP {resp.status_code}")
    got = sha256_file(part)
    if got != sha256:
        part.unlink()
        raise KtstrError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; "
            "the partial file was deleted, fix the catalog sha256 or retry"
        )
    with part.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return dest


def _append(resp: object, part: Path, start: int, mode: str, progress: bool | None,
            tqdm: type) -> None:
    length = resp.headers.get("Content-Length")  # type: ignore[attr-defined]
    total = start + int(length) if length else None
    show = sys.stderr.isatty() if progress is None else progress
    with part.open(mode) as fh, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                     desc=part.name.removesuffix(".part"),
                                     disable=not show) as bar:
        for chunk in resp.iter_content(CHUNK):  # type: ignore[attr-defined]
            fh.write(chunk)
            bar.update(len(chunk))
