"""Fetch a query image from an http(s) URL with size, time and pixel limits, refusing internal addresses.

A URL typed into a search box must not turn the search engine into a proxy for the machine's own
network. Every hop (the first request and each redirect) resolves the host name once, refuses the
lot if any address is private, loopback, link-local, multicast, reserved or unspecified, and then
connects to the address it checked (so a second DNS answer cannot swap in another one). Bodies are
read in chunks up to `max_bytes`, the whole fetch has one deadline, and the bytes are decoded with
the same pixel limit as any image.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from retrieval import imageio
from retrieval.errors import BadQuery, ConfigError

#: What a URL query may download by default.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 3
#: Longest URL accepted (browsers and servers commonly stop near 2 KiB too).
MAX_URL_CHARS = 2048
_CHUNK = 64 * 1024


class FetchRefused(BadQuery):
    """The URL may not be fetched (scheme, address, size, time or content)."""


@dataclass(frozen=True)
class FetchConfig:
    """Limits of one URL fetch. `allow_private` lets tests fetch from 127.0.0.1; never on in a server."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    allow_private: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_bytes <= 512 * 1024 * 1024:
            raise ConfigError(f"max_bytes must be in 1..536870912, got {self.max_bytes}")
        if not 0 < self.timeout_s <= 300:
            raise ConfigError(f"timeout_s must be in (0, 300], got {self.timeout_s}")
        if not 0 <= self.max_redirects <= 10:
            raise ConfigError(f"max_redirects must be in 0..10, got {self.max_redirects}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels must be at least 1")


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # after redirects
    content_type: str


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _blocked(ip.ipv4_mapped)
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def resolve_allowed(host: str, port: int, allow_private: bool) -> str:
    """One address of `host` to connect to; refused if any of its addresses is internal."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchRefused(f"cannot resolve {host!r}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise FetchRefused(f"{host!r} has no address")
    if not allow_private:
        for a in addresses:
            if _blocked(ipaddress.ip_address(a.split("%")[0])):
                raise FetchRefused(
                    f"{host!r} resolves to {a}, a private, loopback or link-local address: "
                    "internal addresses are never fetched"
                )
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an already checked address, with the certificate checked against the host name."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def fetch_bytes(url: str, config: FetchConfig | None = None) -> Fetched:
    """GET `url` within the limits of `config`, following redirects, each re-checked."""
    config = config or FetchConfig()
    deadline = time.monotonic() + config.timeout_s
    if len(url) > MAX_URL_CHARS:
        raise FetchRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    for _ in range(config.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise FetchRefused(f"only http and https URLs can be fetched, got {url[:80]!r}")
        if parts.username or parts.password:
            raise FetchRefused("URLs with a user name or password are not fetched")
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError as exc:
            raise FetchRefused(f"bad port in {url[:80]!r}") from exc
        address = resolve_allowed(parts.hostname, port, config.allow_private)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused(f"fetching the image took longer than {config.timeout_s:g} s")
        conn_type = _PinnedHTTPS if https else _PinnedHTTP
        conn = conn_type(address, parts.hostname, port, remaining)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"User-Agent": "clearsight", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchRefused(f"{url[:80]} redirected without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchRefused(f"{url[:80]} answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > config.max_bytes:
                raise FetchRefused(f"the image is {int(length)} bytes, over the limit of {config.max_bytes}")
            data = _read_limited(resp, config.max_bytes, deadline, config.timeout_s)
            return Fetched(data, url, resp.getheader("Content-Type") or "")
        except TimeoutError as exc:
            raise FetchRefused(f"fetching the image took longer than {config.timeout_s:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise FetchRefused(f"cannot fetch {url[:80]}: {exc}") from exc
        finally:
            conn.close()
    raise FetchRefused(f"more than {config.max_redirects} redirects")


def _read_limited(resp: http.client.HTTPResponse, limit: int, deadline: float, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise FetchRefused(f"fetching the image took longer than {timeout_s:g} s")
        chunk = resp.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise FetchRefused(f"the image is over the limit of {limit} bytes")
        chunks.append(chunk)


def fetch_image(url: str, config: FetchConfig | None = None) -> tuple[imageio.Decoded, str]:
    """The decoded image at `url` and its content hash (for caches)."""
    config = config or FetchConfig()
    got = fetch_bytes(url, config)
    try:
        decoded = imageio.decode(got.data, max_pixels=config.max_pixels)
    except BadQuery as exc:
        raise FetchRefused(f"{got.url[:80]} is not a usable image: {exc}") from exc
    return decoded, imageio.content_hash(got.data)
