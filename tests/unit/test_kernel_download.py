"""Downloads against a local HTTP server on 127.0.0.1 (kernel.org is not reachable here)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.kernel.catalog import parse_catalog
from ktstr.kernel.download import download
from ktstr.kernel.source import resolve_source

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)


class Server:
    def __init__(self, files: dict[str, bytes], honour_range: bool = True) -> None:
        self.files = files
        self.honour_range = honour_range
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(dict(self.headers))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and server.honour_range:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server({"/linux.tar.xz": PAYLOAD})
    yield srv
    srv.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "linux.tar.xz"
    assert download(f"{server.url}/linux.tar.xz", dest, sha(PAYLOAD)) == dest
    assert dest.read_bytes() == PAYLOAD
    assert "Range" not in server.requests[0]
    assert not dest.with_name("linux.tar.xz.part").exists()
    download(f"{server.url}/linux.tar.xz", dest, sha(PAYLOAD))  # cached: no request
    assert len(server.requests) == 1


def test_resume_after_partial_file(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "linux.tar.xz"
    half = len(PAYLOAD) // 2
    dest.with_name("linux.tar.xz.part").write_bytes(PAYLOAD[:half])
    download(f"{server.url}/linux.tar.xz", dest, sha(PAYLOAD))
    assert server.requests[0]["Range"] == f"bytes={half}-"
    assert dest.read_bytes() == PAYLOAD


def test_complete_partial_file_is_verified_not_refetched(server: Server,
                                                         tmp_path: Path) -> None:
    dest = tmp_path / "linux.tar.xz"
    dest.with_name("linux.tar.xz.part").write_bytes(PAYLOAD)
    download(f"{server.url}/linux.tar.xz", dest, sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_server_without_range_restarts(tmp_path: Path) -> None:
    srv = Server({"/k.tar": PAYLOAD}, honour_range=False)
    try:
        dest = tmp_path / "k.tar"
        dest.with_name("k.tar.part").write_bytes(b"garbage that must not be kept")
        download(f"{srv.url}/k.tar", dest, sha(PAYLOAD))
        assert dest.read_bytes() == PAYLOAD
    finally:
        srv.close()


def test_checksum_mismatch_is_rejected_and_not_cached(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "linux.tar.xz"
    with pytest.raises(KtstrError, match="checksum mismatch"):
        download(f"{server.url}/linux.tar.xz", dest, "0" * 64)
    assert not dest.exists()
    assert not dest.with_name("linux.tar.xz.part").exists()


def test_http_error_is_reported(server: Server, tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="HTTP 404"):
        download(f"{server.url}/missing.tar.xz", tmp_path / "x", "0" * 64)


def test_unreachable_server_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="cannot download"):
        download("http://127.0.0.1:9/none.tar", tmp_path / "x", "0" * 64, timeout=5)


def test_url_catalog_entry_downloads_and_unpacks(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("linux-9.9/Kconfig", b"config A\n\tbool \"a\"\n"),
                           ("linux-9.9/Makefile", b"all:\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    blob = buf.getvalue()
    srv = Server({"/linux-9.9.tar.gz": blob})
    try:
        catalog = parse_catalog(
            f'default = "9.9"\n[kernels."9.9"]\nsource = "url"\n'
            f'url = "{srv.url}/linux-9.9.tar.gz"\nsha256 = "{sha(blob)}"\n'
        )
        root = tmp_path / "cache"
        source = resolve_source(catalog.get("9.9"), None, root)
        assert source.digest == sha(blob)
        assert not source.tarball or not source.tarball.exists()  # nothing fetched yet
        tree = source.materialize(root)
        assert (tree / "Kconfig").read_bytes().startswith(b"config A")
        assert tree.parent == root / "sources" / sha(blob)[:16]
        assert source.materialize(root) == tree and len(srv.requests) == 1
    finally:
        srv.close()
