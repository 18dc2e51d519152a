"""What the UI checks before a route runs — it starts jobs, reads files and shows the user's data, so, like Jupyter,
it answers only its own pages. The parts `tunelab serve` shares (Host allowlist, cross-site test, key comparison)
live in serve/guard.py; this module puts them in front of the UI, with what only the UI has:

- a per-process **form token**: a random secret every form of the UI sends as a hidden field (scripts may send it
  as an X-CSRF-Token header). A page on another site can neither read it (same-origin policy; the Host check keeps
  a rebound domain from reading the pages) nor guess it, so a request carrying it came from the UI's own pages.
  One random value compared in constant time — the synchronizer-token pattern, no signing scheme of our own;
  asgi-csrf and starlette-csrf protect cookie sessions and skip requests without cookies, which is every request
  to a UI without a key;
- the **key** (when set): from `Authorization: Bearer`, the HttpOnly SameSite=Strict cookie, or `?key=` once, after
  which the page is reloaded without it.
"""
from __future__ import annotations

import html
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup

from ..serve.guard import SAFE_METHODS, HostCheck, HostPolicy, cross_site, keys_match
from .jobs import NotAllowed

KEY_COOKIE = "tunelab_ui_key"
TOKEN_FIELD, TOKEN_HEADER = "csrftoken", "x-csrf-token"


class TooLarge(Exception):
    """A request body over the upload limit, refused before it is read."""


class Door:
    """The UI's checks, for one process: `form_token` is the app's dependency (before every route), `install`
    adds the middlewares, `field` is the hidden input every POST form carries."""

    def __init__(self, api_key: str | None, hosts: HostPolicy | None, max_upload_mb: float):
        self.api_key, self.hosts, self.max_upload_mb = api_key, hosts or HostPolicy(), max_upload_mb
        self.token = secrets.token_urlsafe(32)
        self.field = Markup(f'<input type="hidden" name="{TOKEN_FIELD}" value="{self.token}">')

    async def form_token(self, request: Request) -> None:
        if request.method in SAFE_METHODS:
            return
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > (self.max_upload_mb + 1) * 2 ** 20:
            raise TooLarge
        given = request.headers.get(TOKEN_HEADER)
        if given is None:
            given = (await request.form()).get(TOKEN_FIELD)  # cached: the route reads the same form
        if not keys_match(given if isinstance(given, str) else None, self.token):
            raise NotAllowed("this request did not come from a page of this UI (its form token is missing or out of "
                             "date — the UI may have been restarted): reload the page and try again")

    def install(self, app: FastAPI, page) -> None:
        """The key check, the cross-site check and, outermost, the Host check; `page(request, template, status,
        **context)` draws the refusals."""

        @app.middleware("http")
        async def _key(request: Request, call_next):
            return await self._key(request, call_next)

        @app.middleware("http")
        async def _same_origin(request: Request, call_next):
            why = cross_site(request.method, request.headers)
            if why is not None:
                return page(request, "message.html", 403, title="Refused: a request from another site",
                            message=f"{request.method} {request.url.path} was refused: {why}. This UI starts, "
                                    f"stops and writes only for its own pages.")
            return await call_next(request)

        app.add_middleware(HostCheck, policy=self.hosts, refuse=lambda message: HTMLResponse(
            f"<!doctype html><title>tunelab ui</title><h1>Refused</h1><p>{html.escape(message)}</p>", status_code=400))

        @app.exception_handler(TooLarge)
        async def _too_large(request: Request, exc: TooLarge):
            return page(request, "message.html", 413, title="Upload too large",
                        message=f"files sent to the UI are limited to {self.max_upload_mb:g} MB (--max-upload-mb); "
                                f"give a path instead")

    async def _key(self, request: Request, call_next):
        if self.api_key is None:
            return await call_next(request)
        in_url = request.query_params.get("key")
        bearer = request.headers.get("authorization", "")
        given = in_url or request.cookies.get(KEY_COOKIE) or \
            (bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None)
        if not keys_match(given, self.api_key):
            return HTMLResponse("<!doctype html><title>tunelab ui</title><h1>tunelab ui</h1><p>This UI needs its "
                                "key.</p><form><input name=key type=password placeholder=key> <button>Open</button>"
                                "</form>", status_code=401)
        if not in_url:
            return await call_next(request)
        # a key in a URL is taken once: it moves into a cookie scripts cannot read, and the page is reloaded
        # without it, so it stays out of the address bar, the history and every link the UI draws
        rest = request.url.remove_query_params("key").query
        response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303) \
            if request.method in SAFE_METHODS else await call_next(request)
        response.set_cookie(KEY_COOKIE, self.api_key, httponly=True, samesite="strict", path="/")
        return response
