"""Query modality detection and the URL fetcher, against a local http.server on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from retrieval.errors import BadQuery
from retrieval.fetch import FetchConfig, FetchRefused, fetch_bytes, resolve_allowed
from retrieval.modality import MAX_QUERY_CHARS, detect_query


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    big = _png((64, 64)) + b"\0" * 5000
    _Handler.routes = {
        "/red.png": (200, {"Content-Type": "image/png"}, _png()),
        "/hop": (302, {"Location": "/red.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.png": (200, {"Content-Type": "image/png"}, big),
        "/text": (200, {"Content-Type": "text/plain"}, b"hello"),
        "/huge-pixels.png": (200, {"Content-Type": "image/png"}, _png((400, 400))),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
    }
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield base
    srv.shutdown()
    srv.server_close()


LOCAL = FetchConfig(allow_private=True, timeout_s=5)


def test_text_path_and_url_detection(server: str, tmp_path: Path) -> None:
    assert detect_query("a red circle").kind == "text"
    img = tmp_path / "q.png"
    img.write_bytes(_png())
    d = detect_query(str(img))
    assert d.kind == "image" and d.image is not None and d.image.size == (32, 24) and d.source == str(img)
    assert detect_query(str(img), force_text=True).kind == "text"
    assert detect_query(str(img), allow_paths=False).kind == "text"  # a server never reads local paths
    u = detect_query(server + "/red.png", fetch=LOCAL)
    assert u.kind == "image" and u.image is not None and u.image_key
    assert detect_query(str(tmp_path / "missing.png")).kind == "text"


def test_bad_inputs_refused(server: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(BadQuery, match="not a readable image"):
        detect_query(str(notes))
    with pytest.raises(BadQuery, match="empty"):
        detect_query("   ")
    with pytest.raises(BadQuery, match="longer than"):
        detect_query("x" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(BadQuery, match="not fetched here"):
        detect_query(server + "/red.png", allow_urls=False)
    assert detect_query("a\x00b").kind == "text"


def test_loopback_refused_unless_allowed(server: str) -> None:
    with pytest.raises(FetchRefused, match="loopback"):
        fetch_bytes(server + "/red.png")  # the default refuses internal addresses
    with pytest.raises(FetchRefused, match="private, loopback or link-local"):
        resolve_allowed("169.254.169.254", 80, allow_private=False)
    with pytest.raises(FetchRefused):
        resolve_allowed("10.0.0.1", 80, allow_private=False)
    with pytest.raises(FetchRefused):
        resolve_allowed("::1", 80, allow_private=False)


def test_redirects_rechecked_and_limited(server: str) -> None:
    assert fetch_bytes(server + "/hop", LOCAL).url.endswith("/red.png")
    with pytest.raises(FetchRefused, match="redirects"):
        fetch_bytes(server + "/loop", LOCAL)


def test_redirect_to_internal_refused_after_allowed_hop(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs on every hop: the first host passes, the redirect's host is refused."""
    import retrieval.fetch as f

    real = f.resolve_allowed

    def first_allowed(host: str, port: int, allow_private: bool) -> str:
        return real(host, port, allow_private or host == "127.0.0.1")

    monkeypatch.setattr(f, "resolve_allowed", first_allowed)
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254"):
        fetch_bytes(server + "/to-metadata", FetchConfig(timeout_s=5))


def test_size_pixels_scheme_and_status(server: str) -> None:
    with pytest.raises(FetchRefused, match="over the limit"):
        fetch_bytes(server + "/big.png", FetchConfig(allow_private=True, max_bytes=1000))
    with pytest.raises(BadQuery, match="not a usable image"):
        detect_query(server + "/text", fetch=LOCAL)
    with pytest.raises(BadQuery, match="not a usable image"):
        detect_query(server + "/huge-pixels.png", fetch=FetchConfig(allow_private=True, max_pixels=10_000))
    with pytest.raises(FetchRefused, match="HTTP 404"):
        fetch_bytes(server + "/nothing", LOCAL)
    with pytest.raises(FetchRefused, match="only http"):
        fetch_bytes("ftp://127.0.0.1/x.png", LOCAL)
    with pytest.raises(FetchRefused, match="user name"):
        fetch_bytes("http://user:pw@127.0.0.1/x.png", LOCAL)
    with pytest.raises(FetchRefused, match="longer than"):
        fetch_bytes("http://example.com/" + "a" * 3000, LOCAL)
