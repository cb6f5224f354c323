"""Overload protection and deadlines for the generation routes, as one ASGI middleware.

A server that queues without bound answers everyone late; one that says "not now" at once
lets clients back off and retry elsewhere. So:

- at most CONDGEN_MAX_INFLIGHT requests are inside the generation routes at a time; the
  next one gets 429 with `Retry-After` at once, before its body is even read;
- every request has a deadline (CONDGEN_DEADLINE_S, from arrival to its last byte). When it
  passes, the handler is cancelled, which releases its engine work (the handlers withdraw
  their jobs in `finally`), and the client gets a 504 JSON error, or, when a
  stream had already started, one in-band SSE error event before the stream ends;
- the queues behind them are bounded too: the image batcher refuses work beyond
  CONDGEN_MAX_QUEUE queued images (`service.batching.Overloaded`), the text engine beyond
  CONDGEN_TEXT_MAX_WAITING queued requests; both answer 429 with `Retry-After`.

Health, metrics and the model list are never limited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tgi
from service.batching import Overloaded
from service.encode import SSE_DONE, sse_event
from service.env import env_float, env_int
from service.schemas import ApiError

logger = logging.getLogger("condgen.service")

# The routes that cost compute; everything else passes untouched.
GENERATION_PATHS = frozenset({"/complete", "/generate", "/v1/completions", "/v1/chat/completions",
                              "/v1/images/generations",
                              "/sdapi/v1/txt2img", "/generate_stream", "/",
                              # no model work, but a 100,000-character text's tokens are 15 MB of JSON
                              "/tokenize", "/detokenize"})


@dataclass(frozen=True)
class Limits:
    max_inflight: int = 64  # requests inside the generation routes at once
    deadline_s: float = 120.0  # arrival -> last byte, per request
    retry_after_s: int = 1  # what a 429 tells the client to wait

    @classmethod
    def from_env(cls) -> "Limits":
        d = cls()
        return cls(max_inflight=env_int("CONDGEN_MAX_INFLIGHT", d.max_inflight, 1),
                   deadline_s=env_float("CONDGEN_DEADLINE_S", d.deadline_s, 0),
                   retry_after_s=env_int("CONDGEN_RETRY_AFTER", d.retry_after_s, 1))


def is_tgi_request(scope: Scope) -> bool:
    """A text-generation-inference request: on one of its routes, or marked by the handler on
    seeing TGI's body (`request.state.tgi`, which lives in the scope this middleware passed on)."""
    return scope.get("path") in tgi.ROUTES or bool(scope.get("state", {}).get("tgi"))


# A client's own X-Request-ID: printable ASCII, at most 200 characters (Heroku's rule). It goes
# into the answer's header and the log, so anything else (a 100 MB header came back whole in a
# 401; a tab or a Latin-1 byte reached the log) is replaced by an id made up here.
CLIENT_REQUEST_ID = re.compile(rb"[\x20-\x7e]{1,200}")


def request_id(scope: Scope) -> str:
    """The request's id: the client's X-Request-ID, or one made up, kept in the request's state,
    so that its answer's header, its log lines and an error in its stream all name the same one."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        asked = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        state["request_id"] = asked.decode() if CLIENT_REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex
    return state["request_id"]


def error_body(err: ApiError, tgi_shape: bool = False, rid: str | None = None) -> tuple[int, dict[str, Any]]:
    """(status, body) in the service's error shape (with the request id `rid` of a 500), or in TGI's."""
    return tgi.error(err) if tgi_shape else (err.status, err.body(rid))


async def send_error(send: Send, scope: Scope, err: ApiError,
                     extra_headers: Sequence[tuple[bytes, bytes]] = (), tgi_shape: bool = False) -> None:
    """A complete JSON error response in the service's error shape (or TGI's), with an
    X-Request-ID as the routes' answers carry (the client's own, when it sent one)."""
    status, content = error_body(err, tgi_shape)
    body = json.dumps(content, separators=(",", ":")).encode()  # compact, as the routes' JSON
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    headers += extra_headers
    if not any(k.lower() == b"x-request-id" for k, _ in headers):
        headers.append((b"x-request-id", request_id(scope).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def count_error(path: str, status: int) -> None:
    try:
        from service.metrics import get_metrics

        get_metrics().request_errors.labels(endpoint=path, status=str(status)).inc()
    except Exception:  # metrics must never turn a clean refusal into a crash
        logger.debug("could not count a %d on %s", status, path, exc_info=True)


class LimitMiddleware:
    """Bounded concurrency and a per-request deadline for GENERATION_PATHS (see the module doc)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        lim = self.limits
        scope.setdefault("state", {})  # one dict for the handler's marks and this middleware
        if self.inflight >= lim.max_inflight:
            count_error(scope["path"], 429)
            await send_error(send, scope, Overloaded(f"{lim.max_inflight} requests in flight", lim.retry_after_s),
                             tgi_shape=is_tgi_request(scope))
            return
        self.inflight += 1
        state: dict[str, Any] = {"started": False, "sse": False, "ended": False, "released": False}

        def release() -> None:
            if not state["released"]:
                state["released"] = True
                self.inflight -= 1

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)
            if state["ended"]:
                # The client has its whole answer and may send its next request at once, while
                # this one still cleans up (a stream's generators close): counted until the
                # handler returned, 8 streaming clients against 8 places saw 429s (9 % of requests).
                release()

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            done, _ = await asyncio.wait({task}, timeout=lim.deadline_s)
            if task in done:
                task.result()  # re-raise what the app raised, as without this middleware
                if state["started"] and not state["ended"]:
                    # A stream whose client left: a 499 like a plain answer's (BentoML counts
                    # a request at its last byte, so it counts none of these).
                    logger.info("request %s to %s: the client left before the stream's end; its generation "
                                "was cancelled", request_id(scope), scope["path"])
                    count_error(scope["path"], 499)
                return
            # Past the deadline: cancelling the handler marks its engine jobs cancelled.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if state["ended"]:  # the client has its whole answer; only the clean-up after it was cut short
                return
            await self._deadline_passed(scope, send, state)
        finally:
            if not task.done():  # this request itself was cancelled (server shutting down)
                task.cancel()
            release()

    async def _deadline_passed(self, scope: Scope, send: Send, state: dict[str, Any]) -> None:
        """Answer a request cancelled at its deadline with a 504, or, once its headers are out,
        end its body (a stream's with the error event, as a stream error ends)."""
        deadline_s = self.limits.deadline_s
        logger.warning("request %s to %s passed its %.1fs deadline; cancelled", request_id(scope), scope["path"],
                       deadline_s)
        count_error(scope["path"], 504)
        # The same request would pass it again: the OpenAI client retries a 504 twice unless told not to.
        err = ApiError(504, f"the request did not finish within its {deadline_s:g}s deadline",
                       type="server_error", code="deadline_exceeded", headers={"x-should-retry": "false"})
        if not state["started"]:
            await send_error(send, scope, err, tgi_shape=is_tgi_request(scope))
            return
        # Headers are gone: report in-band as a stream error does (with [DONE] after it in the
        # OpenAI layout, TGI's has none), then end the body.
        tail, tgi_shape = b"", is_tgi_request(scope)
        if state["sse"]:
            tail = sse_event(error_body(err, tgi_shape)[1]) + (b"" if tgi_shape else SSE_DONE)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
