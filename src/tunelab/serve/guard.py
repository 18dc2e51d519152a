"""What `tunelab serve` and `tunelab ui` check before they answer, as Jupyter does for a local web tool.

- **Host** (`HostCheck`): a page on another domain can point that domain at 127.0.0.1 (DNS rebinding) and then read
  the server as if it were its own; the `Host` header still carries the foreign name. Both servers answer only
  loopback names and addresses, the address they were bound to, and the names given with `--allow-host`. An IP
  address cannot be rebound, so under a wildcard bind (0.0.0.0, ::) every address literal is admitted too.
- **Origin** (`cross_site`, the UI): a state-changing request is refused when the browser says it came from
  another site — `Sec-Fetch-Site` where sent, else `Origin`, else `Referer` against the Host — the order of Go's
  `http.CrossOriginProtection`. A request with none of them is no browser's cross-site request; the UI's
  per-process form token (in ui/app.py) still applies to it.
- **Size** (`BodyLimit`, the server): a body over the limit is refused with 413 before it is read.
- **Keys** (`keys_match`): compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def keys_match(given: str | None, expected: str) -> bool:
    """`given == expected`, in time that does not depend on where they differ."""
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def split_host(value: str) -> str:
    """The name or address of a Host header (or an origin's netloc), without its port or IPv6 brackets, lower-case:
    "[::1]:8000" → "::1", "Example.org:80" → "example.org"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


class HostPolicy:
    """Which Host names a server answers: loopback always, `bind` (the --host it listens on), and `allowed`
    (--allow-host: exact names, `*.domain` for its subdomains, or `*` for any — behind a proxy that checks)."""

    def __init__(self, bind: str = "127.0.0.1", allowed: Iterable[str] = ()):
        self.bind = split_host(bind)
        self.allowed = [a.strip().lower().rstrip(".") for a in allowed if a.strip()]

    def admits(self, host_header: str) -> bool:
        if "*" in self.allowed:
            return True
        host = split_host(host_header)
        if not host:
            return False
        if is_loopback(host) or host == self.bind:
            return True
        if self.bind in WILDCARD_BINDS and _is_address(host):
            return True
        return any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in self.allowed)

    def refusal(self, host_header: str) -> str:
        names = ["localhost", "loopback addresses"]
        if self.bind and not is_loopback(self.bind):
            names.append("every address of this machine" if self.bind in WILDCARD_BINDS else self.bind)
        names += self.allowed
        name = split_host(host_header) or "NAME"
        return (f"Host {host_header!r} is not a name this server answers to (it answers {', '.join(names)}): a page "
                f"on another domain pointed at this machine sends such a header; if {name} is really yours, start "
                f"the server with --allow-host {name}")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: a request whose Host `policy` does not admit gets `refuse(message)` (a Starlette response,
    status 400) and never reaches the app."""

    def __init__(self, app, policy: HostPolicy, refuse: Callable[[str], object]):
        self.app, self.policy, self.refuse = app, policy, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            if not self.policy.admits(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await self.refuse(self.policy.refusal(host))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def cross_site(method: str, headers) -> str | None:
    """Why a request with these headers came from another site's page (a sentence), or None when it did not.
    `headers`: a case-insensitive mapping (Starlette's Headers)."""
    if method.upper() in SAFE_METHODS:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None:
        if site.lower() in ("same-origin", "none"):  # "none": the user typed it, or a bookmark
            return None
        origin = headers.get("origin") if headers.get("origin") not in (None, "null") else "another page"
        return f"the browser says this request came from {origin} (Sec-Fetch-Site: {site}), not from these pages"
    for name in ("origin", "referer"):
        value = headers.get(name)
        if value is None:
            continue
        if value == "null" or _authority(_netloc(value)) != _authority(headers.get("host", "")):
            return f"it came from {value} ({name.capitalize()} header), not from these pages"
        return None
    return None


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:  # e.g. an unclosed IPv6 bracket: matches no Host
        return "\0"


def _authority(netloc: str) -> str:
    """host[:port] as compared between an Origin and the Host header: lower-case, default ports dropped."""
    netloc = netloc.strip().lower().rsplit("@", 1)[-1]
    for default in (":80", ":443"):
        netloc = netloc.removesuffix(default)
    return netloc


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read — at once when its
    Content-Length says so, else as soon as that many bytes have arrived."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.limit:,} bytes"

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": {"message": self._message(), "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
