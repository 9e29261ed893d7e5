"""Issue 23 part 3, the server: each test tries the bad case found by trying it as an attacker would.

Lockout that locked out the right token, a session cookie that was a fixed HMAC of the token, a page
route that bypassed the search limit, health details without the token, query images fetchable by
content hash, replies in the wrong shape and errors carrying server paths.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from explainer.server.security import COOKIE, Sessions
from retrieval import Collection, imageio
from tests.server_kit import build_collection, server_settings

TOKEN = "the-right-token-for-these-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("trust"), tiny_clip_dir, n=8)


@pytest.fixture()
def locked(data_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = server_settings(
        data_dir, tmp_path, api_token=TOKEN, token_on_loopback=True, auth_failures_per_minute=10
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _png(colour: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# -- lockout: failures are throttled, the right token never ---------------------------------------------
def test_wrong_logins_do_not_lock_out_the_right_token(locked: TestClient) -> None:
    codes = [locked.post("/login", data={"token": f"guess-{i}"}).status_code for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]  # failures are throttled
    wrong = locked.post("/api/search", json={"text": "red"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 429 and int(wrong.headers["retry-after"]) >= 1
    api = locked.post("/api/search", json={"text": "red", "top_k": 2}, headers=BEARER)
    assert api.status_code == 200, api.text  # the same client (one proxy for everyone) still gets in
    good = locked.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert good.status_code == 303 and COOKIE in good.headers["set-cookie"]


def test_wrong_bearer_tokens_count_but_missing_ones_and_old_cookies_do_not(locked: TestClient) -> None:
    for _ in range(20):  # a browser with no token, or a cookie from before a restart: not a guess
        assert locked.post("/api/search", json={"text": "red"}).status_code == 401
    locked.cookies.set(COOKIE, "an-old-session-id")
    for _ in range(20):
        assert locked.get("/", follow_redirects=False).status_code == 303
    locked.cookies.clear()
    assert locked.post("/login", data={"token": "guess"}).status_code == 401  # the budget is untouched


# -- sessions ------------------------------------------------------------------------------------------
def _login(client: TestClient) -> str:
    resp = client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert resp.status_code == 303
    return resp.headers["set-cookie"]


def test_each_login_gets_a_random_expiring_session(locked: TestClient) -> None:
    first, second = _login(locked), _login(locked)
    value = first.split(";")[0].split("=", 1)[1]
    assert value != second.split(";")[0].split("=", 1)[1]  # a fixed HMAC gave the same every time
    assert "max-age=43200" in first.lower()  # 12 hours by default
    assert "httponly" in first.lower() and "samesite=strict" in first.lower()
    assert "secure" not in first.lower()  # plain http on loopback
    locked.cookies.set(COOKIE, value)
    assert locked.get("/?q=red", follow_redirects=False).status_code == 200


def test_changing_the_token_ends_every_session(locked: TestClient) -> None:
    _login(locked)
    assert locked.get("/", follow_redirects=False).status_code == 200
    locked.app.state.security.token = "a-new-token-after-a-leak-0123456789"  # type: ignore[attr-defined]
    assert locked.get("/", follow_redirects=False).status_code == 303  # back to the sign-in form


def test_sessions_expire_and_stay_bounded() -> None:
    sessions = Sessions(max_age_s=60.0, max_sessions=3)
    sid = sessions.create(TOKEN, now=1000.0)
    assert sessions.valid(sid, TOKEN, now=1059.0)
    assert not sessions.valid(sid, TOKEN, now=1061.0)  # expired
    assert not sessions.valid(sessions.create(TOKEN, now=0.0), "another-token-0123456789", now=1.0)
    for i in range(10):
        sessions.create(TOKEN, now=float(i))
    assert len(sessions._by_id) <= 3
    assert not sessions.valid("x" * 10_000, TOKEN)


def test_cookie_is_secure_over_https_and_when_told(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, api_token=TOKEN, token_on_loopback=True)
    with TestClient(create_app(settings), base_url="https://testserver") as c:
        assert "secure" in _login(c).lower()
    forced = server_settings(data_dir, tmp_path, api_token=TOKEN, token_on_loopback=True, secure_cookie=True)
    with TestClient(create_app(forced)) as c:  # plain http to the app: a TLS proxy in front
        assert "secure" in _login(c).lower()


# -- one limit and one memory bound for every route that searches ---------------------------------------
def test_the_page_route_shares_the_search_limit(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, explain_burst=4, explain_requests_per_minute=1)
    with TestClient(create_app(settings)) as c:
        assert c.get("/").status_code == 200  # the bare form costs nothing
        pages = [c.get(f"/?q=burst+{i}&k=6").status_code for i in range(3)]
        assert pages == [200, 200, 200]
        assert c.post("/api/search", json={"text": "red", "top_k": 2}).status_code == 200
        page = c.get("/?q=burst+9&k=6")
        assert page.status_code == 429 and int(page.headers["retry-after"]) >= 1
        assert "text/html" in page.headers["content-type"]
        assert c.post("/api/search", json={"text": "red"}).status_code == 429
        compat = c.post("/search", json={"query": "red", "top_k": 2})
        assert compat.status_code == 429 and compat.json() == {"detail": "too many searches; slow down"}
        assert c.get("/images/1?q=red").status_code == 429
        assert c.get("/api/images/1/evidence.png?q=red").status_code == 429
        assert c.get("/").status_code == 200 and c.get("/api/images/1/thumb").status_code == 200


def test_concurrent_searches_share_one_work_budget(data_dir: Path, tmp_path: Path) -> None:
    """50 parallel `GET /?q=...&k=96` took the server to ~960 MB: now they wait their turn."""
    settings = server_settings(data_dir, tmp_path, explain_burst=1000, search_budget_hits=12)
    with TestClient(create_app(settings)) as c:
        budget = c.app.state.clearsight.budget  # type: ignore[attr-defined]
        codes: list[int] = []

        def load(i: int) -> None:
            if i % 3 == 0:
                codes.append(c.post("/api/search", json={"text": f"red {i}", "top_k": 8}).status_code)
            else:
                codes.append(c.get(f"/?q=query+{i}&k=8").status_code)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    assert codes == [200] * 9
    assert 0 < budget.peak <= 12 and budget.used == 0


# -- health: liveness without the token ------------------------------------------------------------------
def test_health_says_only_liveness_without_the_token(locked: TestClient) -> None:
    bare = locked.get("/api/health")
    assert bare.status_code == 200 and bare.json() == {"status": "ok"}
    full = locked.get("/api/health", headers=BEARER).json()
    assert full["status"] == "ok" and full["index"]["images"] == 8 and full["index"]["model"]
    _login(locked)
    assert "index" in locked.get("/api/health").json()  # a signed-in page too


def test_health_keeps_details_on_a_token_free_loopback_server(data_dir: Path, tmp_path: Path) -> None:
    with TestClient(create_app(server_settings(data_dir, tmp_path))) as c:
        body = c.get("/api/health").json()
    assert body["status"] == "ok" and body["index"]["version"] and body["stale_images"] == 0


# -- uploaded query images -------------------------------------------------------------------------------
def test_query_images_are_held_under_an_unguessable_key(data_dir: Path, tmp_path: Path) -> None:
    png = _png("navy")
    with TestClient(create_app(server_settings(data_dir, tmp_path))) as c:
        resp = c.post("/api/search", files={"image": ("q.png", png, "image/png")}, data={"top_k": "2"})
        assert resp.status_code == 200
        key = resp.json()["query"]["image_key"]
        assert key != imageio.content_hash(png)
        assert c.get(f"/api/query-images/{imageio.content_hash(png)}").status_code == 404
        assert c.get(f"/api/query-images/{key}").status_code == 200  # the page that made it can show it
        assert c.post("/api/search", json={"image_key": key, "top_k": 2}).status_code == 200
        again = c.post("/api/search", json={"image_base64": base64.b64encode(png).decode(), "top_k": 2})
        assert again.json()["query"]["image_key"] == key  # the same upload, the same handle


def test_query_images_are_dropped_when_no_page_needs_them(data_dir: Path, tmp_path: Path) -> None:
    from explainer.server.queries import QueryImages

    held = QueryImages(capacity=4, ttl_s=60.0)
    _, key = held.add(_png("olive"), 10_000_000, now=0.0)
    assert held.get(key, now=59.0) is not None  # in use: its time starts again
    assert held.get(key, now=118.0) is not None
    assert held.get(key, now=179.0) is None  # unused for a minute: gone
    for i in range(6):
        held.add(_png("olive", (8 + i, 8)), 10_000_000, now=200.0)
    assert len(held) <= 4


# -- replies in the right shape, without server paths -----------------------------------------------------
def test_compat_route_refusals_are_json_detail(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, max_upload_bytes=64 * 1024)
    with TestClient(create_app(settings)) as c:
        cross = c.post("/search", json={"query": "red"}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and cross.json() == {"detail": "cross-site requests are refused"}
        wrong = c.get("/search")
        assert wrong.status_code == 405 and set(wrong.json()) == {"detail"}
        big = c.post(
            "/search",
            content=b'{"query": "' + b"a" * 200_000 + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413 and "JSON" in big.json()["detail"]
        assert c.post("/search", json={"query": " "}).json() == {"detail": "Query cannot be empty"}


def test_a_huge_json_body_is_told_the_json_limit(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, max_upload_bytes=64 * 1024)
    with TestClient(create_app(settings)) as c:
        resp = c.post(
            "/api/search", content=b"{" + b" " * 300_000 + b"}", headers={"Content-Type": "application/json"}
        )
        message = resp.json()["error"]["message"]
        assert resp.status_code == 413 and "JSON body" in message and "MiB" in message, message
        files = {"image": ("x.png", b"\x89PNG" + b"\0" * 300_000, "image/png")}
        upload = c.post("/api/search", files=files)
        assert upload.status_code == 413 and "images are limited" in upload.json()["error"]["message"]


def test_an_empty_uploaded_file_is_called_empty(data_dir: Path, tmp_path: Path) -> None:
    with TestClient(create_app(server_settings(data_dir, tmp_path))) as c:
        resp = c.post("/api/search", files={"image": ("empty.png", b"", "image/png")})
        assert resp.status_code == 422 and "empty" in resp.json()["error"]["message"]
        page = c.post("/", files={"image": ("empty.png", b"", "image/png")}, follow_redirects=False)
        assert page.status_code == 422 and "empty" in page.text
        assert c.post("/", data={"text": "red"}, follow_redirects=False).status_code == 303  # no file at all


def test_public_messages_lose_paths(data_dir: Path, tmp_path: Path) -> None:
    """The boundary's last line: whatever a library message says, no absolute path leaves."""
    with TestClient(create_app(server_settings(data_dir, tmp_path))) as c:
        state = c.app.state.clearsight  # type: ignore[attr-defined]
        with Collection(data_dir) as col:
            root = col.catalog.roots()[0]
        said = state.public(
            f"unreadable: [Errno 2] No such file or directory: '{root}/a b.jpg'; see {root}/x.jpg"
        )
        assert root not in said and "Errno" not in said and "/a b.jpg" not in said, said
        assert "No such file or directory" in said
        assert state.public(f"cannot open {data_dir}/index") == "cannot open the data directory/index"


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_errors_never_carry_server_paths(data_dir: Path, tmp_path: Path, host: str) -> None:
    """`{"like_id": 12}` for a deleted file answered `[Errno 2] No such file ...: '/tmp/.../pic.jpg'`.

    A loopback server's detail page names the file's path on purpose (to copy it: its every client is
    this computer's user); its errors still never do."""
    with Collection(data_dir) as col:
        rec = col.catalog.iter_images("indexed")[-1]
    gone = Path(rec.path)
    kept = gone.read_bytes()
    gone.unlink()
    try:
        token = "server-paths-token-0123456789"
        settings = server_settings(data_dir, tmp_path, host=host, api_token=token)
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as c:
            answers = [
                c.post("/api/search", json={"like_id": rec.id, "top_k": 2}),
                c.get(f"/?like={rec.id}"),
                c.get(f"/api/images/{rec.id}"),
                c.get(f"/api/images/{rec.id}/thumb"),
            ]
            pages = [c.get(f"/images/{rec.id}"), c.get(f"/images/{rec.id}?q=red")]  # the catalog's card
    finally:
        gone.write_bytes(kept)
    for resp in answers:
        assert resp.status_code == 404, (resp.request.url, resp.status_code, resp.text[:300])
    for resp in answers + (pages if host == "0.0.0.0" else []):
        for leak in (str(gone.parent), str(data_dir), "Errno"):
            assert leak not in resp.text, (resp.request.url, leak)
    for resp in pages:  # on loopback the detail page may name the file, never the data dir or an errno
        for leak in (str(data_dir), "Errno"):
            assert leak not in resp.text, (resp.request.url, leak)
