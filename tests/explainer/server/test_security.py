"""The attack suite of issue 11, run as an attacker would: foreign Host names, cross-site forms and
fetches, missing and wrong tokens, login guessing, explanation floods, huge-pixel uploads, large
JSON bodies, a 50 MP photo through every image route, and a public bind without a token. TestClient
for most; a real uvicorn on 127.0.0.1 for what only a socket shows."""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner

from explainer.errors import ConfigError
from explainer.server import create_app
from explainer.server.limits import BodyBudgetMiddleware
from explainer.server.security import (
    COOKIE,
    CSP,
    RateLimiter,
    auth_decision,
    cross_site,
    host_name,
    is_loopback,
    safe_next,
)
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder, imageio
from retrieval.ingest import ingest
from tests.helpers import ROOT
from tests.server_kit import build_collection, free_port, server_settings

TOKEN = "s3cret-token-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    """A small collection plus one 8200x6150 photo (50 MP: over the upload limit, under ingest's)."""
    root = tmp_path_factory.mktemp("security")
    data = build_collection(root, tiny_clip_dir, n=8)
    big = root / "big"
    big.mkdir()
    Image.new("RGB", (8200, 6150), (90, 120, 200)).save(big / "camera50mp.jpg", quality=60)
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(data) as collection:
        ingest(big, collection, encoder, IngestConfig(batch_size=2, progress=False))
    encoder.close()
    return data


def _big_id(data_dir: Path) -> int:
    with Collection(data_dir) as col:
        recs = [r for r in col.catalog.iter_images("indexed") if r.path.endswith("camera50mp.jpg")]
    assert recs, "the 50 MP photo was not indexed"
    return recs[0].id


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(data_dir, tmp_path_factory.mktemp("sec-state"), explain_burst=1000)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(size: tuple[int, int], colour: str = "white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# -- Host allow-list (DNS rebinding) --------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/api/health", "/static/app.js", "/docs", "/openapi.json", "/login"])
def test_foreign_host_is_refused_on_every_route(client: TestClient, path: str) -> None:
    resp = client.get(path, headers={"Host": "evil.example"})
    assert resp.status_code == 400
    assert resp.headers["x-content-type-options"] == "nosniff"


def test_foreign_host_cannot_search(client: TestClient) -> None:
    resp = client.post("/api/search", json={"text": "a red square"}, headers={"Host": "evil.example:8000"})
    assert resp.status_code == 400


def test_loopback_and_configured_hosts_are_answered(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, allowed_hosts=["photos.lan"])
    with TestClient(create_app(settings), base_url="http://photos.lan:8000") as c:
        assert c.get("/api/health").status_code == 200
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert c.get("/api/health", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/health", headers={"Host": "photos.lan.evil.example"}).status_code == 400


def test_host_name_parsing() -> None:
    assert host_name("[::1]:8000") == "::1"
    assert host_name("Example.ORG:80") == "example.org"
    assert host_name("localhost") == "localhost"
    assert is_loopback("127.0.0.5") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("evil.example")


# -- cross-site requests (CSRF) ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Referer": "http://evil.example/attack.html"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_site_api_calls_are_403(client: TestClient, headers: dict[str, str]) -> None:
    resp = client.post("/api/search", json={"text": "a red square", "top_k": 3}, headers=headers)
    assert resp.status_code == 403
    assert resp.json()["error"]["message"] == "cross-site requests are refused"
    resp = client.post("/api/explain", json={"text": "a red square", "ids": [1]}, headers=headers)
    assert resp.status_code == 403


def test_a_cross_site_form_cannot_search_or_sign_in(client: TestClient) -> None:
    """What another site's auto-submitting <form> sends: a urlencoded or multipart POST with its Origin."""
    evil = {"Origin": "https://evil.example"}
    assert (
        client.post("/", data={"q": "a red square"}, headers=evil, follow_redirects=False).status_code == 403
    )
    files = {"image": ("x.png", _png((32, 32), "red"), "image/png")}
    assert client.post("/api/search", files=files, headers=evil).status_code == 403
    assert client.post("/login", data={"token": "x"}, headers=evil).status_code == 403


def test_same_site_and_non_browser_calls_pass(client: TestClient) -> None:
    body = {"text": "a red square", "top_k": 3}
    assert client.post("/api/search", json=body, headers={"Origin": "http://testserver"}).status_code == 200
    assert (
        client.post("/api/search", json=body, headers={"Referer": "http://testserver/?q=x"}).status_code
        == 200
    )
    assert client.post("/api/search", json=body, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/api/search", json=body).status_code == 200  # curl, scripts: no Origin at all


def test_cross_site_decision_ignores_safe_reads() -> None:
    from starlette.datastructures import Headers

    evil = Headers({"host": "127.0.0.1:8000", "origin": "http://evil.example"})
    assert not cross_site("GET", "/api/images/1/thumb", evil)
    assert cross_site("POST", "/api/search", evil)
    assert cross_site("DELETE", "/anything", evil)


# -- security headers ---------------------------------------------------------------------------------
def test_security_headers_on_every_kind_of_response(client: TestClient, data_dir: Path) -> None:
    big = _big_id(data_dir)
    responses = [
        client.get("/"),
        client.get("/?q=a+red+square"),
        client.get("/static/app.js"),
        client.get("/api/health"),
        client.get(f"/api/images/{big}/thumb"),
        client.get("/api/images/999999"),
        client.get("/no/such/page"),
        client.post("/api/search", content=b"{", headers={"Content-Type": "application/json"}),
        client.post("/api/search", json={"text": "x"}, headers={"Origin": "http://evil.example"}),
        client.get("/openapi.json"),
        client.get("/login"),
    ]
    for resp in responses:
        h = resp.headers
        where = f"{resp.request.method} {resp.request.url.path} ({resp.status_code})"
        assert h["content-security-policy"] == CSP, where
        assert h["x-content-type-options"] == "nosniff", where
        assert h["referrer-policy"] == "same-origin", where
        assert h["x-frame-options"] == "DENY", where
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP


def test_pages_carry_no_inline_script_or_style(client: TestClient, data_dir: Path) -> None:
    import re

    for path in ("/", "/?q=a+red+square", f"/images/{_big_id(data_dir)}?q=blue", "/login"):
        html = client.get(path).text
        inline = re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", html)
        assert not inline, f"{path} has an inline script: {inline}"
        assert " style=" not in html and "<style" not in html, path
        assert re.search(r"\son[a-z]+=", html) is None, f"{path} has an inline event handler"


def test_docs_are_served_from_local_assets(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        assert "cdn" not in html.lower() and "https://" not in html
        assert "<script>" not in html  # every script has a src
    html = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in html and "/static/docs-init.js" in html
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 200
    assert client.get("/static/docs-init.js").status_code == 200


# -- token authentication -------------------------------------------------------------------------------
@pytest.fixture()
def locked(data_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = server_settings(
        data_dir, tmp_path, api_token=TOKEN, token_on_loopback=True, auth_failures_per_minute=5
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_api_needs_the_bearer_token(locked: TestClient) -> None:
    body = {"text": "a red square", "top_k": 2}
    resp = locked.post("/api/search", json=body)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert locked.post("/api/search", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        locked.post("/api/search", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    )
    ok = locked.post("/api/search", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["results"]
    assert locked.get("/api/health").status_code == 200  # the probe stays open
    assert locked.get("/static/app.css").status_code == 200  # so does the login page's style


def test_page_login_sets_a_strict_httponly_cookie(locked: TestClient) -> None:
    resp = locked.get("/?q=red", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/login?next=%2F%3Fq%3Dred"
    form = locked.get("/login?next=/?q=red")
    assert form.status_code == 200 and 'name="token"' in form.text
    bad = locked.post("/login", data={"token": "nope", "next": "/?q=red"}, follow_redirects=False)
    assert bad.status_code == 401 and COOKIE not in bad.cookies
    good = locked.post("/login", data={"token": TOKEN, "next": "/?q=red"}, follow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/?q=red"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() not in cookie
    assert locked.get("/?q=red", follow_redirects=False).status_code == 200  # the cookie now signs in
    assert locked.post("/api/search", json={"text": "red"}).status_code == 200
    locked.cookies.clear()
    locked.cookies.set(COOKIE, "forged")
    assert locked.get("/", follow_redirects=False).status_code == 303


def test_login_does_not_redirect_off_site() -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)", ""):
        assert safe_next(target) == "/", target
    assert safe_next("/images/3?q=a") == "/images/3?q=a"


def test_failed_attempts_are_rate_limited(locked: TestClient) -> None:
    for _ in range(5):
        assert locked.post("/login", data={"token": "guess"}, follow_redirects=False).status_code == 401
    assert locked.post("/login", data={"token": "guess"}, follow_redirects=False).status_code == 429
    api = locked.post("/api/search", json={"text": "x"}, headers={"Authorization": "Bearer guess"})
    assert api.status_code == 429 and int(api.headers["retry-after"]) >= 1
    # failures are throttled, not the right token (tests/explainer/server/test_security_limits.py tries
    # that case in full)
    resp = locked.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert resp.status_code == 303


def test_login_body_is_bounded(locked: TestClient) -> None:
    resp = locked.post(
        "/login",
        content=b"token=" + b"a" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 413


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(per_minute=60, burst=2)
    assert limiter.allow("a", now=0.0) and limiter.allow("a", now=0.0)
    assert not limiter.allow("a", now=0.0) and limiter.allow("b", now=0.0)
    assert limiter.allow("a", now=1.01)  # one per second comes back
    small = RateLimiter(per_minute=1, burst=1, max_clients=3)
    for i in range(10):
        small.allow(str(i), now=0.0)
    assert len(small._buckets) <= 3  # memory stays bounded whatever the number of clients


def test_explanations_are_rate_limited_per_client(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, explain_burst=3, explain_requests_per_minute=1)
    with TestClient(create_app(settings)) as c:
        codes = [
            c.post("/api/explain", json={"text": "a red square", "ids": [1]}).status_code for _ in range(5)
        ]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]


# -- the token decision for a bind address ---------------------------------------------------------------
def test_public_bind_needs_a_token(tmp_path: Path) -> None:
    base = server_settings(tmp_path / "data", tmp_path)
    assert auth_decision(base, "127.0.0.1").token is None
    assert auth_decision(base, "localhost").token is None
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        with pytest.raises(ConfigError, match="needs a token"):
            auth_decision(base, host)
    with_token = base.model_copy(update={"api_token": SecretStr(TOKEN)})
    assert auth_decision(with_token, "0.0.0.0").token == TOKEN
    with pytest.raises(ConfigError, match="too short"):
        auth_decision(base.model_copy(update={"api_token": SecretStr("short")}), "0.0.0.0")
    with pytest.raises(ConfigError):
        auth_decision(base.model_copy(update={"token_on_loopback": True}), "127.0.0.1")


def test_generated_token_is_kept_private_and_reused(tmp_path: Path) -> None:
    settings = server_settings(tmp_path / "data", tmp_path, generate_token=True)
    first = auth_decision(settings, "0.0.0.0")
    assert first.generated and first.token and len(first.token) >= 32 and first.token_file is not None
    assert stat.S_IMODE(first.token_file.stat().st_mode) == 0o600
    again = auth_decision(server_settings(tmp_path / "data", tmp_path), "0.0.0.0")
    assert again.token == first.token and not again.generated  # printed once, then only read
    first.token_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        auth_decision(settings, "0.0.0.0")


def test_serve_refuses_a_public_bind_without_a_token_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from explainer.cli.app import app
    from explainer.settings import get_settings

    for name in ("CLEARSIGHT_API_TOKEN", "CLEARSIGHT_GENERATE_TOKEN", "CLEARSIGHT_TOKEN_ON_LOOPBACK"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("uvicorn was started")

    monkeypatch.setattr(uvicorn, "run", never)
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "8123"]
    )
    get_settings.cache_clear()
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a token" in lines[0] and "CLEARSIGHT_API_TOKEN" in lines[0]
    assert time.monotonic() - started < 10


# -- bounded memory ---------------------------------------------------------------------------------------
def test_concurrent_pixel_bomb_uploads_stay_within_the_decode_budget(data_dir: Path, tmp_path: Path) -> None:
    """Small PNGs with 36 MP each: decodes wait for each other instead of adding up."""
    png = _png((6000, 6000))
    assert len(png) < 200_000
    settings = server_settings(data_dir, tmp_path, decode_budget_mb=200)
    with TestClient(create_app(settings)) as c:
        budget = imageio.decode_budget()
        codes: list[int] = []

        def upload() -> None:
            files = {"image": ("x.png", png, "image/png")}
            codes.append(c.post("/api/search", files=files, data={"top_k": "2"}).status_code)

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    assert codes == [200] * 4
    assert 0 < budget.peak <= 200 * 1024 * 1024


def test_large_bodies_wait_their_turn() -> None:
    in_flight, peak = [0], [0]

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    mw = BodyBudgetMiddleware(app, budget=3_000_000, limit=2_000_000)

    async def one(size: int) -> None:
        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", str(size).encode())]}

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            return None

        await mw(scope, receive, send)

    async def main() -> None:
        await asyncio.gather(*(one(1_000_000) for _ in range(16)))
        assert peak[0] == 3  # 3 MB of budget, 1 MB bodies
        peak[0] = 0
        await asyncio.gather(*(one(1000) for _ in range(16)))
        assert peak[0] == 16  # small bodies never wait

    asyncio.run(main())


# -- the 50 MP photo through every image route ------------------------------------------------------------
def test_a_50_megapixel_photo_works_everywhere(client: TestClient, data_dir: Path) -> None:
    big = _big_id(data_dir)
    thumb = client.get(f"/api/images/{big}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 1024
    assert client.get(f"/api/images/{big}/thumb").status_code == 200  # from the cache
    assert client.get(f"/api/images/{big}").status_code == 200
    assert client.get(f"/api/images/{big}/evidence.png?q=blue").status_code == 200
    assert client.get(f"/images/{big}?q=blue").status_code == 200
    like = client.post("/api/search", json={"like_id": big, "top_k": 3})
    assert like.status_code == 200, like.text
    assert big not in [h["id"] for h in like.json()["results"]]  # more like it: never itself
    assert client.get(f"/?like={big}").status_code == 200


def test_error_messages_never_show_python_object_names(client: TestClient) -> None:
    files = {"image": ("x.png", b"definitely not an image", "image/png")}
    resp = client.post("/api/search", files=files)
    assert resp.status_code == 422
    message = resp.json()["error"]["message"]
    assert "BytesIO" not in message and " at 0x" not in message, message


# -- a real uvicorn on 127.0.0.1 ---------------------------------------------------------------------------
def test_real_server_refuses_rebinding_and_cross_site_posts(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    settings = server_settings(data_dir, tmp_path, port=port, allowed_hosts=[])
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started

        def ask(
            method: str, path: str, headers: dict[str, str], body: bytes | None = None
        ) -> http.client.HTTPResponse:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp

        assert ask("GET", "/api/health", {"Host": "evil.example"}).status == 400
        assert ask("GET", "/api/health", {"Host": f"127.0.0.1:{port}"}).status == 200
        json_headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
        body = b'{"text": "a red square", "top_k": 2}'
        cross = ask("POST", "/api/search", {**json_headers, "Origin": "http://evil.example"}, body)
        assert cross.status == 403
        same = ask("POST", "/api/search", {**json_headers, "Origin": f"http://127.0.0.1:{port}"}, body)
        assert same.status == 200
        assert same.getheader("content-security-policy") == CSP
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -n needs root (or user namespaces)")
def test_public_bind_refused_in_a_network_namespace(tmp_path: Path) -> None:
    """The real command, in a namespace with only `lo`: a public bind without a token exits non-zero."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARSIGHT_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = ["unshare", "-n", "timeout", "60", sys.executable, "-m", "explainer.cli", "serve"]
    r = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "8123"],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    if r.returncode != 0 and "unshare" in r.stderr and "Operation not permitted" in r.stderr:
        pytest.skip("network namespaces are not permitted here")
    assert r.returncode not in (0, 124), r.stderr
    assert "needs a token" in r.stderr
