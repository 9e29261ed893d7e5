"""Defences for a server other machines and other sites can reach: who may call, from where, how often.

One ASGI middleware applies, in order: the Host allow-list (400: DNS rebinding points a foreign
name at this server), the cross-site check on state-changing and cost-incurring requests (403:
another site's page auto-submitting a form), the token (401, or the login form for the page), and
per-client rate limits (429): on wrong tokens (never on the right one) and on every route that
searches, page and API alike. Every response, refusals included, leaves with the security headers.
`auth_decision` says whether a bind address needs a token and finds it; `clearsight serve` refuses
to start when one is needed and none is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request, cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from explainer.errors import ConfigError
from explainer.settings import Settings

#: Renders a refusal: JSON under /api, HTML elsewhere (the app passes its error renderer).
Renderer = Callable[[Request, int, str], Awaitable[Response]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_FILE = "api-token"
COOKIE = "clearsight_session"
LOGIN_PATH = "/login"
#: Reachable without a token: the login form, the page's own assets and the health probe.
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
PUBLIC_PATHS = frozenset({LOGIN_PATH, "/api/health", "/favicon.ico"})
#: Requests that spend money or CPU on someone's behalf: rate-limited per client, one bucket for all.
COSTLY = frozenset({("POST", "/api/explain"), ("POST", "/api/search"), ("POST", "/search"), ("POST", "/")})
#: GET routes that search when their query string names a query (the page, the detail view).
SEARCHING_GETS = ("/", "/images/")
#: GET routes that always encode a query and compute evidence.
COSTLY_GET_SUFFIX = "/evidence.png"
#: GET routes that trigger explanation or captioning, and so are refused cross-site (none today).
COSTLY_GETS: frozenset[str] = frozenset()
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: Swagger UI and ReDoc set inline styles and ReDoc runs a blob: worker; their scripts are still ours only.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; worker-src 'self' blob:; font-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/redoc"})
HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),  # same-origin Referers still reach the cross-site check
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=()"),
)


# -- the token decision ---------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AuthDecision:
    """The token a server bound at `host` enforces (None: token-free), and whether it was just made."""

    token: str | None
    generated: bool = False
    token_file: Path | None = None


def auth_decision(settings: Settings, host: str | None = None) -> AuthDecision:
    """Decide whether serving on `host` needs a token, and find (or make) it; ConfigError when none.

    Loopback binds are token-free unless `token_on_loopback`; anything else needs a token from
    CLEARSIGHT_API_TOKEN, from the data dir's `api-token` file, or generated there now when
    `generate_token` is set (the caller prints a generated token once).
    """
    host = host or settings.host
    required = settings.token_on_loopback or not is_loopback(host)
    configured = settings.api_token.get_secret_value() if settings.api_token else None
    if configured is not None and len(configured) < 16:
        raise ConfigError("CLEARSIGHT_API_TOKEN is too short: use at least 16 characters")
    if not required:
        return AuthDecision(configured)
    if configured:
        return AuthDecision(configured)
    path = Path(settings.data_dir).expanduser() / TOKEN_FILE
    stored = _read_token_file(path)
    if stored:
        return AuthDecision(stored, token_file=path)
    if settings.generate_token:
        return AuthDecision(_write_token_file(path), generated=True, token_file=path)
    raise ConfigError(
        f"serving on {host} (reachable from other machines) needs a token: set CLEARSIGHT_API_TOKEN, "
        "or pass --generate-token, or serve on 127.0.0.1"
    )


def _read_token_file(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is readable by other users: chmod 600 it, or delete it to make a new one")
    token = path.read_text(encoding="utf-8").strip()
    return token or None


def _write_token_file(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


# -- hosts and origins ------------------------------------------------------------------------------
def allowed_hosts(settings: Settings, bind_host: str | None = None) -> frozenset[str]:
    """Host header names this server answers to: loopback, the bound address, and the configured ones."""
    bind = (bind_host or settings.host).strip().strip("[]").lower()
    names = set(LOOPBACK_NAMES) | {h.strip().lower() for h in settings.allowed_hosts if h.strip()}
    if bind and bind not in ("0.0.0.0", "::"):
        names.add(bind)
    elif bind:  # a wildcard bind: the machine's own names
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower())
    return frozenset(names)


def host_name(value: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `Example.org:80` -> `example.org`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _same_site(origin: str, host_header: str) -> bool:
    """An Origin or Referer URL names this very server (scheme http/https, same host and port)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()


def cross_site(method: str, path: str, headers: Headers) -> bool:
    """True for a browser request that another site made (Origin, Referer or Sec-Fetch-Site say so)."""
    if method in SAFE_METHODS and path not in COSTLY_GETS:
        return False
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None:
        return not _same_site(origin, host)  # includes "null" (sandboxed frames, file: pages)
    referer = headers.get("referer")
    if referer:
        return not _same_site(referer, host)
    return headers.get("sec-fetch-site", "").lower() == "cross-site"


# -- rate limits ------------------------------------------------------------------------------------
@dataclass
class RateLimiter:
    """A token bucket per client: `burst` at once, refilled at `per_minute`; bounded memory."""

    per_minute: float
    burst: float
    max_clients: int = 10_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _level(self, key: str, now: float) -> float:
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.per_minute / 60.0)

    def allow(self, key: str, cost: float = 1.0, now: float | None = None) -> bool:
        """Take `cost` from the client's bucket; False (nothing taken) when it has too little."""
        now = time.monotonic() if now is None else now
        with self._lock:
            level = self._level(key, now)
            if level < cost:
                self._buckets[key] = (level, now)
                return False
            if key not in self._buckets and len(self._buckets) >= self.max_clients:
                self._buckets.pop(next(iter(self._buckets)))
            self._buckets[key] = (level - cost, now)
            return True

    def blocked(self, key: str, now: float | None = None) -> bool:
        """True when the client has nothing left (without taking anything)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._level(key, now) < 1.0

    def retry_after(self) -> int:
        return max(1, int(60.0 / self.per_minute + 0.999))


def costly(method: str, path: str, query_string: bytes) -> bool:
    """True for a request that runs a search (or an explanation): every such route shares one limit.

    The page (`GET /?q=...`) and the detail view search as `POST /api/search` does; were they free,
    the API's limit would be a suggestion.
    """
    if (method, path) in COSTLY:
        return True
    if method not in ("GET", "HEAD"):
        return False
    if path.startswith("/api/images/") and path.endswith(COSTLY_GET_SUFFIX):
        return True
    if path == "/" or (path.startswith("/images/") and path.count("/") == 2):
        params = parse_qs(query_string.decode("latin-1"))
        return any(params.get(name, [""])[0].strip() for name in ("q", "qimg", "like"))
    return False


# -- sessions ---------------------------------------------------------------------------------------
def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _token_digest(token: str) -> bytes:
    return hmac.new(token.encode(), b"clearsight-session-v2", hashlib.sha256).digest()


#: A session id as set by `Sessions.create` (token_urlsafe(32)); anything else is not looked up.
_SESSION_ID_MAX = 64


@dataclass
class Sessions:
    """Signed-in browsers: a random id per login, with an expiry, bound to the token it was made under.

    The id carries nothing (it is not derived from the token), so a leaked cookie ends with its
    expiry, and changing the token ends every session at once. Held in memory: a restart signs
    everyone out. Bounded: past `max_sessions` the oldest goes.
    """

    max_age_s: float
    max_sessions: int = 10_000
    _by_id: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, token: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        sid = secrets.token_urlsafe(32)
        with self._lock:
            for old in [k for k, (exp, _) in self._by_id.items() if exp <= now]:
                del self._by_id[old]
            while len(self._by_id) >= self.max_sessions:
                self._by_id.pop(next(iter(self._by_id)))
            self._by_id[sid] = (now + self.max_age_s, _token_digest(token))
        return sid

    def valid(self, sid: str, token: str, now: float | None = None) -> bool:
        """True for a live session made under `token` (the current one)."""
        if not sid or len(sid) > _SESSION_ID_MAX:
            return False
        now = time.time() if now is None else now
        with self._lock:
            found = self._by_id.get(sid)
            if found is None:
                return False
            expires, digest = found
            if expires <= now:
                del self._by_id[sid]
                return False
        return hmac.compare_digest(digest, _token_digest(token))


@dataclass
class SecurityConfig:
    token: str | None
    hosts: frozenset[str]
    auth_limit: RateLimiter
    explain_limit: RateLimiter
    sessions: Sessions
    secure_cookie: bool | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, token: str | None, bind_host: str | None = None
    ) -> SecurityConfig:
        return cls(
            token=token,
            hosts=allowed_hosts(settings, bind_host),
            auth_limit=RateLimiter(settings.auth_failures_per_minute, settings.auth_failures_per_minute),
            explain_limit=RateLimiter(settings.explain_requests_per_minute, settings.explain_burst),
            sessions=Sessions(max_age_s=settings.session_hours * 3600.0),
            secure_cookie=settings.secure_cookie,
        )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class SecurityMiddleware:
    """Host, cross-site, token and rate checks, and security headers on every response."""

    def __init__(self, app: ASGIApp, config: SecurityConfig, render: Renderer) -> None:
        self.app = app
        self.config = config
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CSP if path in DOCS_PATHS else CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["content-security-policy"] = csp
                for name, value in HEADERS:
                    headers[name] = value
            await send(message)

        refusal = await self._check(scope)
        if refusal is not None:
            await refusal(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)

    async def _check(self, scope: Scope) -> Response | None:
        request = Request(scope)
        headers = request.headers
        method, path = request.method, scope["path"]
        cfg = self.config
        if host_name(headers.get("host", "")) not in cfg.hosts and "*" not in cfg.hosts:
            return await self.render(request, 400, "this server does not answer to that Host name")
        if cross_site(method, path, headers):
            return await self.render(request, 403, "cross-site requests are refused")
        client = _client(scope)
        outcome = True if cfg.token is None else self._authenticated(headers, cfg)
        scope.setdefault("state", {})["authenticated"] = outcome is True
        if cfg.token is not None and not self._public(path) and outcome is not True:
            # Only failures are throttled: a valid token or session always passes, so a client
            # (or everyone behind one proxy) guessing wrong never locks out those who know it.
            if outcome is False and not cfg.auth_limit.allow(client):
                return await self._too_many(request, cfg.auth_limit, "too many failed sign-in attempts; wait")
            return await self._unauthenticated(request)
        if costly(method, path, scope.get("query_string", b"")) and not cfg.explain_limit.allow(client):
            return await self._too_many(request, cfg.explain_limit, "too many searches; slow down")
        return None

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    @staticmethod
    def _authenticated(headers: Headers, cfg: SecurityConfig) -> bool | None:
        """True: a valid token or session; False: a wrong token; None: none given, or a session that
        ended (expired, or made under an old token), which is not a guess and is not counted as one."""
        assert cfg.token is not None
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, given = auth.partition(" ")
            return scheme.lower() == "bearer" and token_matches(given.strip(), cfg.token)
        cookie = cookie_parser(headers.get("cookie", ""))
        if COOKIE in cookie and cfg.sessions.valid(cookie[COOKIE], cfg.token):
            return True
        return None

    async def _unauthenticated(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and not path.startswith("/api") and not path.startswith("/openapi"):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", status_code=303)
        response = await self.render(request, 401, "a token is required: send Authorization: Bearer <token>")
        response.headers["www-authenticate"] = "Bearer"
        return response

    async def _too_many(self, request: Request, limiter: RateLimiter, message: str) -> Response:
        response = await self.render(request, 429, message)
        response.headers["retry-after"] = str(limiter.retry_after())
        return response


# -- the login form ---------------------------------------------------------------------------------
def safe_next(value: str | None) -> str:
    """Only paths on this server: an open redirect would turn the login form into a phishing aid."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def login_page(next_path: str, failed: bool = False) -> HTMLResponse:
    from html import escape

    note = '<p class="error" role="alert">That token is not right.</p>' if failed else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in · Clearsight</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/app.css"></head>
<body><main class="login"><h1>Clearsight</h1>
<p>This server is shared on a network. Enter its access token (printed when it started, or in
<code>CLEARSIGHT_API_TOKEN</code>).</p>{note}
<form method="post" action="{LOGIN_PATH}">
<input type="hidden" name="next" value="{escape(safe_next(next_path))}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button></form></main></body></html>"""
    return HTMLResponse(body, status_code=401 if failed else 200)


async def login_form(request: Request) -> Response:
    return login_page(request.query_params.get("next", "/"))


#: The login form's body is tiny: anything larger is refused before parsing.
LOGIN_MAX_BYTES = 4096


async def login_submit(request: Request) -> Response:
    """Check the posted token; a good one starts a session (HttpOnly, SameSite=Strict, Max-Age cookie).

    A right token is never refused, however many wrong ones the client (or its proxy) sent before.
    """
    config: SecurityConfig = request.app.state.security
    client = _client(request.scope)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > LOGIN_MAX_BYTES:
            return HTMLResponse("<!doctype html><p>The form is too large.</p>", status_code=413)
    form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items() if v}
    next_path = safe_next(form.get("next"))
    if config.token is None:
        return RedirectResponse(next_path, status_code=303)
    if not token_matches(form.get("token", ""), config.token):
        if not config.auth_limit.allow(client):
            refused = HTMLResponse(
                "<!doctype html><p>Too many failed attempts; wait a minute.</p>", status_code=429
            )
            refused.headers["retry-after"] = str(config.auth_limit.retry_after())
            return refused
        return login_page(next_path, failed=True)
    response = RedirectResponse(next_path, status_code=303)
    max_age = int(config.sessions.max_age_s)
    secure = config.secure_cookie if config.secure_cookie is not None else request.url.scheme == "https"
    response.set_cookie(
        COOKIE,
        config.sessions.create(config.token),
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )
    return response
