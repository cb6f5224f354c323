"""Access control: an optional API key, CORS origins, and strict model tags.

- CONDGEN_API_KEY: when set, every request needs `Authorization: Bearer <key>` (what the
  OpenAI client sends) or `x-api-key: <key>`; without it the answer is 401 in the usual
  JSON error shape. Health (/livez, /readyz, /healthz, /health) and /metrics stay open, so that
  orchestrators and Prometheus need no secret, and so do CORS pre-flight requests (browsers
  send those without credentials), which the CORS middleware outside this one answers, and the
  API's description (GET /docs, /openapi.json and the page's assets), whose Authorize button
  then sends the key. The key is taken without surrounding whitespace, as a presented key is
  (a secret file's trailing newline locked every client out).
- CONDGEN_CORS_ORIGINS: comma-separated origins allowed to call the API from a browser
  ("*" for any); unset means no CORS headers at all (same-origin only).
- GPT_MODEL / GAN_MODEL / AR_IMAGE_MODEL: checked against BentoML's tag alphabet before the
  store sees them.
- Starlette's own answers to an unknown path (404) or method (405) are plain text; they are
  rewritten into the one JSON error shape, which the clients of this API parse.
- BentoML's access log writes request paths as they come: control characters in them are
  escaped (`escape_access_log`), so that a request cannot forge log lines.

`install(Service, routes, limits)` wires it all (and /openapi.json, and the limits of
`service.limits`) into the BentoML service, outermost first: JSON errors, CORS, API key, limits.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tgi
from service.env import ConfigError
from service.limits import LimitMiddleware, Limits, count_error, send_error
from service.schemas import ApiError

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/metrics"})
# The API's description, read by a browser, which cannot send the key on a page load: its
# Authorize button then sends it with the requests it makes.
DOCS_PATHS = frozenset({"/", "/docs", "/openapi.json"})
# BentoML's tag: a lowercase name, then an optional version.
TAG_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?(:[A-Za-z0-9._-]{1,64})?$")


def model_tag(env_var: str, default: str) -> str | None:
    """The store tag an environment variable names (unset: `default`; empty: None, that model is
    not served), refused at start-up when malformed."""
    tag = os.environ.get(env_var, default)
    if not tag:
        return None
    if not TAG_PATTERN.fullmatch(tag) or ".." in tag:
        raise ConfigError(f"{env_var}={tag!r} is not a model tag (expected name or name:version, "
                          f"letters, digits, '.', '_', '-'; e.g. {default!r}; empty: not served)")
    return tag


def browser_origin(text: str) -> str | None:
    """The Origin header a browser sends for this origin, None when it is none: http(s)://host
    [:port], nothing after it, no user, no wildcard. The server compares the header with the
    allowed origins as strings, and a browser writes the host in lower case (an international
    name in punycode) and leaves a scheme's default port out."""
    try:
        url = urlsplit(text)
        port = url.port  # ValueError past 65535
        host = (url.hostname or "").encode("idna").decode()
    except (ValueError, UnicodeError):
        return None
    if url.scheme not in ("http", "https") or not host or port == 0 or re.search(r"[\s*@%]|:$", url.netloc):
        return None
    shown_port = "" if port in (None, {"http": 80, "https": 443}[url.scheme]) else f":{port}"
    return f"{url.scheme}://{f'[{host}]' if ':' in host else host}{shown_port}"


def cors_origins() -> list[str]:
    """The allowed origins; one that no browser could send (a typo, a path after the host)
    would never match, and is refused at start-up instead."""
    raw = os.environ.get("CONDGEN_CORS_ORIGINS", "")
    origins = [o.strip().rstrip("/") for o in raw.split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and browser_origin(origin) != origin:
            sent = browser_origin(origin)
            raise ConfigError(f"CONDGEN_CORS_ORIGINS: {origin!r} is not an origin as browsers send it "
                              + (f"(they send {sent!r})" if sent else "(scheme://host[:port], e.g. "
                                 "https://app.example.com, or *)"))
    return origins


def api_key() -> str | None:
    """CONDGEN_API_KEY without surrounding whitespace; None when unset or empty. Whitespace
    alone is refused at start-up: no client could ever present it."""
    raw = os.environ.get("CONDGEN_API_KEY", "")
    if raw and not raw.strip():
        raise ConfigError("CONDGEN_API_KEY is only whitespace: set a key, or unset it to serve without one")
    return raw.strip() or None


def _open(scope: Scope) -> bool:
    """A request that needs no key: health, metrics, and GETs of the API's description."""
    path = scope.get("path", "")
    return path in OPEN_PATHS or (scope.get("method") == "GET"
                                  and (path in DOCS_PATHS or path.startswith("/static_content/")))


def _presented_key(scope: Scope) -> bytes | None:
    """The key as sent, in bytes: a non-ASCII key arrives as its UTF-8 bytes, which decoding
    the header as Latin-1 and encoding it again as UTF-8 turned into other bytes (always 401)."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.strip() if key is not None else None


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The metrics label of a request: its route's path ("/v1/models/{model}"), or "unmatched".
    A label taken from the raw path would add a series for every path a client makes up."""
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:
            return route.path
    return "unmatched"


def _digest(key: bytes) -> bytes:
    """A key's SHA-256: compared instead of the keys, whose lengths compare_digest's time shows."""
    return hashlib.sha256(key).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str, routes: Sequence[BaseRoute]) -> None:
        """routes: the API's routes, which label the 401s in the error counter."""
        self.app = app
        self.key_digest = _digest(key.strip().encode())  # stripped, as presented keys are
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _open(scope):
            given = _presented_key(scope)
            # Constant-time comparison of digests: the answer's timing says nothing about the
            # key, nor its length (compare_digest's time depends on the lengths it is given).
            if given is None or not hmac.compare_digest(_digest(given), self.key_digest):
                why = "missing" if given is None else "invalid"
                count_error(route_label(self.routes, scope), 401)
                await send_error(send, scope, ApiError(
                    401, f"API key {why}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
                return
        await self.app(scope, receive, send)


class JSONRoutingErrors:
    """Starlette's plain-text 404 / 405 and refused CORS pre-flight (400), answered in the JSON
    error shape instead (TGI's on its routes), with the headers the answer had."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json(message: Message) -> None:
            nonlocal replaced
            if replaced:  # the plain-text body of an answer already sent as JSON
                return
            if message["type"] == "http.response.start" and (err := _as_json(scope, message)) is not None:
                replaced = True
                # The headers the answer had stay (CORS's, Starlette's Allow): without CORS's, a
                # browser sees an opaque failure instead of the message.
                kept = [(k, v) for k, v in message.get("headers") or []
                        if k.lower() not in (b"content-type", b"content-length")]
                await send_error(send, scope, err, kept, tgi_shape=scope["path"] in tgi.ROUTES)
                return
            await send(message)

        await self.app(scope, receive, send_json)


# What an OpenAI client tries first. Without CONDGEN_CHAT_TEMPLATE the route does not exist: the
# text model is a plain language model with no chat template of its own (vLLM needs
# --chat-template for such a model, and refuses chat without one).
CHAT_HINT = ("; the text model has no chat template: set CONDGEN_CHAT_TEMPLATE to a Jinja2 chat template to enable "
             "this route, or send the conversation as a prompt to /v1/completions")


# AUTOMATIC1111's and OpenAI's other image routes: these models take no input image.
IMG2IMG_HINT = "; the image models here draw from a prompt only (no input image): use /sdapi/v1/txt2img"
EDITS_HINT = "; the image models here draw from a prompt only (no input image): use /v1/images/generations"
# AUTOMATIC1111's interrupt and skip stop the one job of a one-user UI; here a server's clients
# share the engine, and a client stops its own request by closing its connection.
INTERRUPT_HINT = ("; a request is cancelled when its client closes the connection (its queued or running images "
                  "are dropped); there is no server-wide interrupt, which would stop other clients' images")
ROUTE_HINTS = {"/v1/chat/completions": CHAT_HINT, "/sdapi/v1/img2img": IMG2IMG_HINT,
               "/v1/images/edits": EDITS_HINT, "/v1/images/variations": EDITS_HINT,
               "/sdapi/v1/interrupt": INTERRUPT_HINT, "/sdapi/v1/skip": INTERRUPT_HINT}


def _as_json(scope: Scope, start: Message) -> ApiError | None:
    """The JSON error for a plain-text answer that Starlette made itself, else None."""
    headers = dict(start.get("headers") or [])
    if not headers.get(b"content-type", b"").startswith(b"text/plain"):
        return None
    method, path, status = scope["method"], scope["path"], start["status"]
    if status == 405:  # Starlette's Allow header is kept
        return ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
    if status == 404:
        hint = ROUTE_HINTS.get(path.rstrip("/"), "")
        return ApiError(404, f"no route {method} {path}{hint}", code="not_found")
    if status == 400 and method == "OPTIONS":  # CORSMiddleware refusing a pre-flight
        origin = dict(scope["headers"]).get(b"origin", b"").decode("latin-1")
        return ApiError(400, f"CORS pre-flight refused: origin {origin!r} is not in CONDGEN_CORS_ORIGINS, or the "
                             "method asked for is not GET or POST", code="cors_not_allowed")
    return None


def cors_options(origins: list[str]) -> dict:
    """CORSMiddleware's settings. Any request header is allowed: the official OpenAI SDKs send
    their own (`x-stainless-os`, `x-stainless-retry-count`, ...) with every request, and a
    pre-flight naming one header off a fixed list fails in the browser; the origin is what
    CORS guards, and the API key is checked on the request itself."""
    return dict(allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                expose_headers=["x-request-id", "x-seed", "x-model", "retry-after"], max_age=600)


# Control characters (C0, DEL, C1: `%c2%9b` is a terminal's one-byte CSI) and the Unicode line
# separators, the way `repr` shows them (`\n`, `\x1b`, `\u2028`), and the backslash itself, so
# that a path holding the text `\n` does not read as an escaped newline.
_CONTROL_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029)}
_CONTROL_ESCAPES[ord("\\")] = "\\\\"


class EscapeControlCharacters(logging.Filter):
    """Escapes control characters in a log record's string arguments: BentoML's access log
    writes a request's percent-decoded path as it is, so `/x%0a<a made-up line>` forged a second
    line, and `%1b[…` reached the terminal of whoever read the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a.translate(_CONTROL_ESCAPES) if isinstance(a, str) else a for a in record.args)
        return True


def escape_access_log() -> None:
    """Install EscapeControlCharacters on BentoML's access log (once)."""
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, EscapeControlCharacters) for f in access.filters):
        access.addFilter(EscapeControlCharacters())


def install(service: object, routes: object, limits: Limits) -> None:
    """Add /openapi.json and its docs page to the mounted routes, and the middlewares to the
    BentoML service."""
    from service.openapi import docs_endpoint, openapi_endpoint

    routes.add_route("/openapi.json", openapi_endpoint, methods=["GET"])  # type: ignore[attr-defined]
    for path in ("/", "/docs"):  # "/" here comes before BentoML's own index page
        routes.add_route(path, docs_endpoint, methods=["GET"])  # type: ignore[attr-defined]
    service.add_asgi_middleware(JSONRoutingErrors)  # type: ignore[attr-defined]
    if origins := cors_origins():
        service.add_asgi_middleware(CORSMiddleware, **cors_options(origins))  # type: ignore[attr-defined]
    if key := api_key():
        service.add_asgi_middleware(APIKeyMiddleware, key=key, routes=routes.routes)  # type: ignore[attr-defined]
    service.add_asgi_middleware(LimitMiddleware, limits=limits)  # type: ignore[attr-defined]
    escape_access_log()
