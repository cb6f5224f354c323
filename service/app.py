"""The HTTP service: validate -> batch -> call an engine from models/ -> encode.

`bentoml serve service.app:Generation` starts it. BentoML provides the server, /livez,
/readyz, /metrics, the traffic limits (timeout, max concurrency) and the model store;
the routes are a Starlette app mounted into the service, because the API is shaped by
its clients (OpenAI-compatible JSON, Server-Sent Events, raw PNG bytes, one error shape)
rather than by BentoML's IO descriptors. No model math lives here.

Routes (`routes` below): this service's own (/complete, /generate, /models, /tokenize,
/detokenize, /health), OpenAI's (/v1/completions, /v1/chat/completions with
CONDGEN_CHAT_TEMPLATE, /v1/images/generations, /v1/models), text-generation-inference's
(/generate with `inputs`, /generate_stream, POST /, /info) and AUTOMATIC1111's (/sdapi/v1/...).

Models: one text model (GPT_MODEL), the default image model (GAN_MODEL), and optionally the
raster-scan autoregressive image model (AR_IMAGE_MODEL), which image requests pick by `model`.
Any of them may be turned off (an empty variable): the routes of a kind with no model answer 404.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import bentoml
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.ar_image import MAX_GUIDANCE, ARImageEngine, ARImageRequests
from models.continuous import QueueFull
from models.engine import (Choice, Completion, CompletionBuilder, CompletionRequest, StreamEvent, TextRequests,
                           TokenLogprob, resolve_device)
from models.engine_process import EngineFailed, EngineProcess
from models.errors import InvalidParameter
from models.image_engine import ImageEngine, ImageRequest, ImageRequests
from models.tokenizer import Tokenizer
from service import chat, sdapi, tgi
from service.batching import Job, MicroBatcher, Overloaded, fail
from service.config import (ACCESS_LOG, AR_IMAGE_MODEL, BATCH_WAIT_S, BODY_TIMEOUT_S, CHAT_PATH, CHAT_TEMPLATE, DEVICE,
                            GAN_MODEL, GPT_MODEL, IMAGE_MAX_BATCH, IMAGE_MAX_QUEUE, LIMITS, MAX_BODY_BYTES,
                            MAX_CONCURRENCY, MODEL_ENVS, RETRY_AFTER_S, TIMEOUT_S, TRACE_REQUESTS, WORKERS)
from service.encode import SSE_DONE, SSEResponse, b64, openai_finish_reason, sse_event, usage
from service.engines import Engines, ImageBackend, ServedModel
from service.image_worker import WorkerDied
from service.limits import GENERATION_PATHS, count_error, error_body, request_id
from service.metrics import IMAGE, Metrics, get_metrics
from service.schemas import (
    MAX_N,
    MAX_SEED,
    ApiError,
    CompletionBody,
    DetokenizeBody,
    ImageBody,
    OpenAICompletionBody,
    OpenAIImageBody,
    StreamOptions,
    TGIBody,
    TGITokenizeBody,
    TokenizeBody,
    Txt2ImgBody,
    from_validation_error,
    shown_name,
)
from service.security import install as install_security

logger = logging.getLogger("condgen.service")
logger.setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING
B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
MAX_FIELDS = 200  # of a body (AUTOMATIC1111's txt2img has the most, 55)
# JSON may escape lone UTF-16 surrogates ("\ud800"), which are not text; a pair is (decoding
# the body strictly refused any written as bytes)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
LONG_TEXT_CHARS = 10_000  # tokenized off the event loop beyond this (a few ms of ASCII)
JSON_PIECE = 10_000  # items of a long list encoded at once


def _route(fn: Callable[["Generation", Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: find the service, map every failure to one JSON error shape.

    Client mistakes are 4xx with the field named; anything else is a 500 that carries a
    request id, and the traceback is logged under the same id.
    """

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        rid = request_id(request.scope)
        request.state.tgi = request.url.path in tgi.ROUTES  # /generate, /tokenize: once the body says so
        try:
            try:
                svc: Generation = bentoml.get_current_service()
            except bentoml.exceptions.BentoMLException:
                raise unavailable("the service is starting") from None
            response = await fn(svc, request)
        except ApiError as e:
            response = _error_response(request, e)
        except InvalidParameter as e:
            # "prompt: must be ...": the message names the field, as a schema error's does
            response = _error_response(request, ApiError(400, str(e), e.param, code=e.code))
        except ValidationError as e:
            response = _error_response(request, from_validation_error(e))
        except ClientDisconnect:  # gone while its body was read: nobody to answer, nothing broken
            logger.info("request %s to %s: the client left before its body was read", rid, request.url.path)
            response = Response(status_code=499)
        except Exception:
            logger.exception("request %s to %s failed", rid, request.url.path)
            err = ApiError(500, f"internal error (request id {rid}); the server log has the details",
                           type="server_error")
            response = _error_response(request, err, rid)
        endpoint = getattr(request.scope.get("route"), "path", request.url.path)
        # Labelled by route ("/v1/models/{model}"): one series per route. A probe's 503 (/health,
        # as /readyz) is its answer, not an error: counted, it raised the error rate at every start.
        if response.status_code >= 400 and endpoint != "/health":
            get_metrics().request_errors.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        response.headers["X-Request-ID"] = rid
        return response

    return handler


def unavailable(message: str) -> ApiError:
    """A 503 for what passes (models loading, an engine process starting again): with a
    Retry-After, as a 429 has, which the OpenAI client waits before its retry."""
    return ApiError(503, message, type="server_error", code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def _error_response(request: Request, err: ApiError, rid: str | None = None) -> JSONResponse:
    """The error in this service's JSON shape, or in text-generation-inference's for its requests
    (marked `tgi` by their route, or by `_read_json` on seeing TGI's body): its clients raise
    their typed errors from that. `rid`: the request id a 500's body names."""
    status, body = error_body(err, request.state.tgi, rid)
    return JSONResponse(body, status_code=status, headers=err.headers)


async def _parse(request: Request, model: type[B]) -> B:
    return model.model_validate(await _read_json(request))


async def _read_json(request: Request, tgi_when_inputs: bool = False) -> dict[str, Any]:
    """The body as a JSON object; a 4xx naming what is wrong with it otherwise. tgi_when_inputs
    (a route that answers both kinds, /generate and /tokenize): TGI's body, `inputs` and no
    `prompt`, marks the request as TGI's, so that errors from here on, this function's own
    included, come in TGI's shape."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"content-type {ctype!r} is not supported: send JSON with "
                            "'content-type: application/json'", code="unsupported_media_type")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # its bytes would be refused as "not valid JSON", which misleads
        raise ApiError(415, f"content-encoding {encoding!r} is not supported: send the body uncompressed",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = await asyncio.wait_for(_read_body(request), BODY_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g}s",
                       code="request_timeout") from None
    try:
        # decoded strictly (json.loads' own decoding lets surrogates written as bytes through)
        text = body.decode(json.detect_encoding(body))
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from e
    except ValueError:  # an integer past Python's limit of digits for str -> int
        raise ApiError(400, f"the body holds an integer longer than {sys.get_int_max_str_digits()} digits") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    if tgi_when_inputs and "inputs" in data and "prompt" not in data:
        request.state.tgi = True
    if len(data) > MAX_FIELDS:  # (95,000 unknown fields, each refused by name, took 0.2 s of the event loop)
        raise ApiError(400, f"the body has {len(data)} fields; no request here has more than {MAX_FIELDS}")
    # Lone surrogates: only a body with a surrogate escape may hold one. Then one json.dumps of the
    # whole, and one per field only to name it (one per field took 0.3 s for 95,000 fields).
    if SURROGATE_ESCAPE.search(text) and not _is_unicode(data):
        for name, value in data.items():
            if not (_is_unicode(name) and _is_unicode(value)):
                field = name if _is_unicode(name) else None
                raise ApiError(400, f"{field or 'a field name'}: contains a lone surrogate escape (\\ud800-\\udfff), "
                                    "which is not valid Unicode", param=field)
    return data


def _is_unicode(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


async def _read_body(request: Request) -> bytes:
    """The body, read in pieces up to the limit: a chunked body has no length to check up front."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@_route
async def complete(svc: "Generation", request: Request) -> Response:
    return await svc.complete(await _parse(request, CompletionBody), openai=False, request=request)


@_route
async def openai_completions(svc: "Generation", request: Request) -> Response:
    body = await _parse(request, OpenAICompletionBody)
    if (err := body.unsupported()) is not None:
        raise err
    return await svc.complete(body, openai=True, request=request)


@_route
async def chat_completions(svc: "Generation", request: Request) -> Response:
    return await svc.chat(chat.parse(await _read_json(request)), request)


@_route
async def generate(svc: "Generation", request: Request) -> Response:
    """Images; a body with `inputs` is text-generation-inference's text request (its /generate)."""
    data = await _read_json(request, tgi_when_inputs=True)
    if request.state.tgi:
        return await svc.tgi_generate(_tgi_body(data), request, stream=False)
    return await svc.generate(ImageBody.model_validate(data), request)


def _tgi_body(data: dict[str, Any], model: type[B] = TGIBody) -> B:
    try:
        return model.model_validate(data)
    except ValidationError as e:  # "parameters.top_p", not just "parameters"
        raise from_validation_error(e, depth=2) from None


@_route
async def tokenize(svc: "Generation", request: Request) -> Response:
    """vLLM's /tokenize (a prompt's ids, as the model sees them); with TGI's body (`inputs`),
    TGI's (each token with the characters of the input it covers)."""
    data = await _read_json(request, tgi_when_inputs=True)
    engine = svc._text_requests()
    tok = engine.tokenizer
    # Tokenizing and answering run in a thread: for a long text (300,000 tokens, 15 MB of JSON
    # in TGI's form) they took the event loop for most of a second, stalling every other request.
    if request.state.tgi:
        text = _tgi_body(data, TGITokenizeBody).inputs
        _within_prompt_limit(text, engine, "inputs")

        def spans() -> Response:
            ids, offsets = tok.encode_with_offsets(text)
            return _json_response([{"id": t, "text": text[a:b], "start": a, "stop": b}
                                   for t, (a, b) in zip(ids, offsets)])

        return await asyncio.to_thread(spans)
    body = TokenizeBody.model_validate(data)
    svc._check_model(body.model, "text")
    _within_prompt_limit(body.prompt, engine, "prompt")

    def tokens() -> Response:
        ids = tok.encode(body.prompt) or [tok.eot_id]  # as a completion starts from it
        names = {"token_strs": [tok.token_name(t) for t in ids]} if body.return_token_strs else {}
        return _json_response({"count": len(ids), "max_model_len": engine.block_size, "tokens": ids, **names})

    return await asyncio.to_thread(tokens)


def _json_response(content: Any) -> Response:
    """A JSONResponse (of string keys), its long lists encoded in pieces: one json.dumps of
    400,000 tokens holds the GIL, so the event loop too, for 0.3 s; between pieces, it runs."""
    def encoded(value: Any) -> bytes:
        if isinstance(value, list) and len(value) > JSON_PIECE:
            return b"[" + b",".join(encoded(value[i:i + JSON_PIECE])[1:-1]
                                    for i in range(0, len(value), JSON_PIECE)) + b"]"
        if isinstance(value, dict) and any(isinstance(v, list) and len(v) > JSON_PIECE for v in value.values()):
            return b"{" + b",".join(encoded(k) + b":" + encoded(v) for k, v in value.items()) + b"}"
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()  # (Starlette's)

    return Response(encoded(content), media_type="application/json")


@_route
async def detokenize(svc: "Generation", request: Request) -> Response:
    """vLLM's /detokenize: token ids of the text model's tokenizer back to text."""
    body = await _parse(request, DetokenizeBody)
    engine = svc._text_requests()
    svc._check_model(body.model, "text")
    vocab = engine.tokenizer.vocab_size
    if bad := [t for t in body.tokens if t >= vocab]:
        raise ApiError(400, f"tokens: ids must be below the vocabulary's {vocab}, got {shown_name(str(bad[0]))}",
                       "tokens")
    return await asyncio.to_thread(lambda: JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)}))


def _within_prompt_limit(text: str, engine: TextRequests, name: str) -> None:
    """A text longer than any prompt is refused before the tokenizer spends the loop's time on it."""
    if len(text) > engine.max_prompt_chars:
        raise ApiError(400, f"{name}: {len(text)} characters, the limit is {engine.max_prompt_chars}", name,
                       code="prompt_too_long")


@_route
async def tgi_generate_stream(svc: "Generation", request: Request) -> Response:
    return await svc.tgi_generate(_tgi_body(await _read_json(request)), request, stream=True)


@_route
async def tgi_info(svc: "Generation", request: Request) -> Response:
    """GET /info, TGI's description of the served text model and its limits."""
    engine = svc._text_requests()
    on_cuda = resolve_device(DEVICE).type == "cuda"  # as the engine process picks it (bf16 there)
    cfg = svc.engines.text_stream.cfg
    return JSONResponse(tgi.info(svc.text_model.tag, engine.block_size,
                                 "torch.bfloat16" if on_cuda else "torch.float32", "cuda" if on_cuda else "cpu",
                                 # beyond either, a 429: the generation routes' in-flight cap, the engine's places
                                 min(LIMITS.max_inflight, cfg.max_running + cfg.max_waiting),
                                 min(MAX_N, cfg.max_running)))


@_route
async def tgi_compat(svc: "Generation", request: Request) -> Response:
    """POST /, TGI's compat route: `stream` chooses; a plain answer comes as a list of one."""
    body = _tgi_body(await _read_json(request))
    return await svc.tgi_generate(body, request, stream=body.stream, as_list=True)


@_route
async def openai_images(svc: "Generation", request: Request) -> Response:
    return await svc.openai_images(await _parse(request, OpenAIImageBody), request)


@_route
async def txt2img(svc: "Generation", request: Request) -> Response:
    return await svc.txt2img(await _parse(request, Txt2ImgBody), request)


@_route
async def sd_models(svc: "Generation", request: Request) -> Response:
    """AUTOMATIC1111's model list: the image models."""
    svc._check_model(None, "image")  # a text-only server has no A1111 API: 404, not an empty one
    return JSONResponse([sdapi.sd_model(m.tag) for m in svc.served_models if m.kind == "image"])


@_route
async def sd_scripts(svc: "Generation", request: Request) -> Response:
    """AUTOMATIC1111's script list: none here (its clients look for extensions at start)."""
    svc._check_model(None, "image")
    return JSONResponse({"txt2img": [], "img2img": []})


@_route
async def sd_progress(svc: "Generation", request: Request) -> Response:
    """AUTOMATIC1111's progress: how many images this worker has queued or running (what
    `webuiapi.util_wait_for_ready` polls until it is 0)."""
    svc._check_model(None, "image")
    images = sum(b.batcher.outstanding_cost for b in svc.images.values() if b.batcher is not None)
    return JSONResponse(sdapi.progress(images))


@_route
async def sd_options(svc: "Generation", request: Request) -> Response:
    """AUTOMATIC1111's settings, of which the model is the one that exists here: GET says which
    answers by default. A POST may only restate it (as a client does that posts back what GET
    gave it; A1111 answers null): a switch would change every client's model, and each worker
    process would keep its own."""
    default = svc._check_model(None, "image")
    if request.method == "GET":
        return JSONResponse({"sd_model_checkpoint": default.tag})
    for name, value in (await _read_json(request)).items():
        if name != "sd_model_checkpoint":
            name = shown_name(name)
            raise ApiError(400, f"{name}: not a setting of this server (sd_model_checkpoint is its only one)", name)
        if not isinstance(value, str) or not default.answers_to(sdapi.checkpoint_tag(value, [default.tag])):
            shown = repr(shown_name(value)) if isinstance(value, str) else "(not a string)"
            raise ApiError(400, f"sd_model_checkpoint {shown}: the model is not a global setting here (every model "
                                "is served at once): choose it per request with override_settings.sd_model_checkpoint",
                           name)
    return JSONResponse(None)


@_route
async def list_models(svc: "Generation", request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [m.describe() for m in svc.served_models]})


@_route
async def openai_models(svc: "Generation", request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [m.openai() for m in svc.served_models]})


@_route
async def openai_model(svc: "Generation", request: Request) -> Response:
    """GET /v1/models/{model}: one model, by any name it answers to (OpenAI's `models.retrieve`)."""
    requested = request.path_params["model"]
    for served in svc.served_models:
        if served.answers_to(requested):
            return JSONResponse(served.openai())
    raise ApiError(404, f"model {requested[:100]!r} is not served here", "model", code="model_not_found")


@_route
async def health(svc: "Generation", request: Request) -> Response:
    """GET /health, as vLLM and text-generation-inference answer it: 200 once every model is
    loaded and its engine alive, else 503 (the same as /readyz; their users' probes point here)."""
    if not svc.__is_ready__():
        raise ApiError(503, "not ready: models loading, or an engine process is down (in this or another worker "
                            "process)", type="server_error")
    return Response(status_code=200)


routes = Starlette(routes=[
    Route("/health", health, methods=["GET"]),
    Route("/complete", complete, methods=["POST"]),
    Route("/generate", generate, methods=["POST"]),
    Route("/generate_stream", tgi_generate_stream, methods=["POST"]),
    Route("/", tgi_compat, methods=["POST"]),
    Route("/info", tgi_info, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/v1/completions", openai_completions, methods=["POST"]),
    *([Route(CHAT_PATH, chat_completions, methods=["POST"])] if CHAT_TEMPLATE else []),
    Route("/v1/images/generations", openai_images, methods=["POST"]),
    Route("/v1/models", openai_models, methods=["GET"]),
    Route("/v1/models/{model}", openai_model, methods=["GET"]),
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
    Route("/sdapi/v1/options", sd_options, methods=["GET", "POST"]),
    Route("/sdapi/v1/scripts", sd_scripts, methods=["GET"]),
    Route("/sdapi/v1/progress", sd_progress, methods=["GET"]),
])


def image_batcher(run: Callable[[list[Job[ImageRequest]]], Awaitable[None]], metrics: Metrics,
                  engine_class: type, model: str) -> MicroBatcher[ImageRequest]:
    """The micro-batcher in front of one image model's worker process (`model`: its name)."""
    return MicroBatcher(
        IMAGE, run, metrics, IMAGE_MAX_BATCH, BATCH_WAIT_S, max_queue_cost=IMAGE_MAX_QUEUE,
        retry_after_s=RETRY_AFTER_S,
        max_in_flight=2,  # the next batch waits in the image worker's queue
        # One pass per batch (the GAN) is as short as answering its clients: two alternating
        # halves keep the worker busy. An AR model's batch is hundreds of sequential steps;
        # there, every request it holds is what pays.
        split_when_idle=engine_class is ImageEngine, model=model)


def image_parameters(req: ImageRequest, i: int, tag: str) -> dict[str, Any]:
    """What reproduces image i of a request (its PNG's `parameters` chunk): prompt, seed,
    model and every sampler setting it used."""
    extra = {f: getattr(req, f) for f in req.sampler_fields()}
    return {"prompt": req.prompt, "seed": req.seed + i, "model": tag, "truncation": req.truncation, **extra}


@dataclass(kw_only=True)
class ImageJob(Job[ImageRequest]):
    """An image request's work, and what its PNGs say about themselves (`parameters` chunk):
    JSON that /generate takes back, or AUTOMATIC1111's infotext on its route."""
    describe: Callable[[ImageRequest, int, str], dict[str, Any] | str]


@dataclass
class TextRun:
    """A completion request the engine has admitted: what its answer is made from."""
    model: str  # the served model's tag
    seed: int
    choices: int  # generated: prompts × n (× best_of's candidates)
    logprobs: int | None  # alternatives per token, as the engine computes them (None: none)
    prompt_tokens: int
    events: AsyncIterator[StreamEvent]  # every choice's; closing it cancels the generation

    def head(self, completion_id: str, kind: str) -> dict[str, Any]:
        """The fields that open every answer and chunk of it (`kind`: OpenAI's `object`)."""
        return {"id": completion_id, "object": kind, "created": int(time.time()), "model": self.model,
                "seed": self.seed}


class ChunkShape(Protocol):
    """A stream's choices in a route's layout (`Generation._stream` sends them, one per chunk)."""

    def opening(self) -> list[dict[str, Any]]:
        """Choices sent before any token."""

    def choice(self, ev: StreamEvent) -> dict[str, Any] | None:
        """The choice an event makes; None for one that carries nothing to send."""


@dataclass
class CompletionChunks:
    """The choices of a /complete or /v1/completions stream: with echo, each prompt first (in
    the choice's first event when it is scored, else before any token), then the text as it comes."""
    echoed: list[str]  # what echo puts before each choice's text
    echo_first: bool  # echo without logprobs: the prompts open the stream
    logprobs: bool
    openai: bool

    def _choice(self, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": _finish_reason(finish, self.openai)}

    def opening(self) -> list[dict[str, Any]]:
        return [self._choice(j, text, None, None) for j, text in enumerate(self.echoed)] if self.echo_first else []

    def choice(self, ev: StreamEvent) -> dict[str, Any] | None:
        prefix = self.echoed[ev.choice]
        if ev.prompt_logprobs is not None:  # echo with logprobs: the prompt's chunk, scored
            return self._choice(ev.choice, prefix + ev.text, ev.finish_reason,
                                _logprobs_json(ev.logprobs, len(prefix), ev.prompt_logprobs))
        if not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        lp = _logprobs_json(ev.logprobs, len(prefix)) if self.logprobs else None
        return self._choice(ev.choice, ev.text, ev.finish_reason, lp)


def _logprobs_json(items: list[TokenLogprob], prefix: int, prompt: list[TokenLogprob] | None = None
                   ) -> dict[str, Any]:
    """The OpenAI (legacy completions) logprobs layout; offsets count characters of the text,
    after an echoed prompt of `prefix` characters, whose own tokens come first when scored
    (the first with null logprobs, as OpenAI's). Each `top_logprobs` entry holds the token
    itself besides its `logprobs` alternatives (so up to logprobs + 1), as OpenAI and vLLM do."""
    offsets = [lp.offset for lp in prompt or []] + [prefix + lp.offset for lp in items]
    items = (prompt or []) + items
    return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [None if lp.top is None else {**lp.top, lp.token: lp.logprob} for lp in items],
            "text_offset": offsets}


def best_of(candidates: list[Choice], k: int, n: int, keep_logprobs: bool) -> list[Choice]:
    """OpenAI's best_of: of each prompt's k candidates (prompt i's are i*k .. i*k+k-1, each with
    its tokens' logprobs), the n with the highest mean token logprob, best first, numbered as
    n choices per prompt (prompt i's: i*n ..); without `keep_logprobs` (the client did not ask
    for them) their logprobs are dropped."""
    def mean_logprob(c: Choice) -> float:
        return sum(lp.logprob for lp in c.logprobs) / len(c.logprobs) if c.logprobs else 0.0

    chosen = []
    for start in range(0, len(candidates), k):
        ranked = sorted(candidates[start:start + k], key=mean_logprob, reverse=True)  # stable: ties keep order
        chosen += [dataclasses.replace(c, index=len(chosen) + r, logprobs=c.logprobs if keep_logprobs else None)
                   for r, c in enumerate(ranked[:n])]
    return chosen


def _pick_seed(seed: int | None, count: int = MAX_N) -> int:
    # Leave room for seed + i (i < count: the request's choices or images) to stay inside the range.
    return seed if seed is not None else secrets.randbelow(MAX_SEED + 2 - count)


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="generation",
    envs=MODEL_ENVS,
    workers=WORKERS,
    traffic={"timeout": TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY},
    logging={"access": {"enabled": ACCESS_LOG}},
    tracing={} if TRACE_REQUESTS else {"excluded_urls": ".*"},  # ".*": every path
)
class Generation:
    # Declared at class scope so that `bentoml build` packs the models into the Bento.
    gpt = bentoml.models.BentoModel(GPT_MODEL) if GPT_MODEL else None
    gan = bentoml.models.BentoModel(GAN_MODEL) if GAN_MODEL else None
    ar_image = bentoml.models.BentoModel(AR_IMAGE_MODEL) if AR_IMAGE_MODEL else None

    def __init__(self) -> None:
        self.metrics = get_metrics()
        # Resolving the tags here makes a missing model fail the start-up at once, by name.
        self.text_model = ServedModel.from_store("text", self.gpt) if self.gpt is not None else None
        self.images: dict[str, ImageBackend] = {}  # tag -> backend; the first is the default
        for stored, engine_class, checker_class in ((self.gan, ImageEngine, ImageRequests),
                                                    (self.ar_image, ARImageEngine, ARImageRequests)):
            if stored is not None:
                backend = ImageBackend(ServedModel.from_store("image", stored), stored, engine_class, checker_class)
                backend.batcher = image_batcher(functools.partial(self._run_images, backend), self.metrics,
                                                engine_class, backend.served.name)
                self.images[backend.served.tag] = backend
        self.served_models = [m for m in (self.text_model, *(b.served for b in self.images.values())) if m]
        self.metrics.start_series([(m.name, m.kind) for m in self.served_models],
                                  [path for path in GENERATION_PATHS if path != CHAT_PATH or CHAT_TEMPLATE])
        if self.gan is None and self.ar_image is not None:
            logger.info("GAN_MODEL is empty: the image routes serve %s (AR_IMAGE_MODEL= turns it off too)",
                        self.ar_image.tag)
        self.engines = Engines(self.gpt, self.text_model, self.images, self.metrics)
        self.engines.start()

    def __is_ready__(self) -> bool:
        return self.engines.ready()

    def __is_alive__(self) -> bool:
        return self.engines.alive()

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        await self.engines.stop()

    def _text_requests(self) -> TextRequests:
        """The text model's request checker: 404 on a server that serves none, 503 until loaded."""
        self._check_model(None, "text")
        return self._ready_or_503(self.engines.text)

    def _ready_or_503(self, engine: Any) -> Any:
        if engine is None:
            if self.engines.load_error:  # no Retry-After: it stays so until the server is started again
                raise ApiError(503, f"not ready: model loading failed: {self.engines.load_error}", type="server_error",
                               code="model_load_failed")
            raise unavailable("not ready: models are still loading")
        return engine

    def _check_model(self, requested: str | None, kind: str) -> ServedModel:
        """The served model of `kind` that `requested` names (None: the default, listed first)."""
        if not any(served.kind == kind for served in self.served_models):
            why = "GPT_MODEL is empty" if kind == "text" else "GAN_MODEL is empty and no AR_IMAGE_MODEL is served"
            raise ApiError(404, f"this server serves no {kind} model ({why})", "model", code="model_not_found")
        if (kind == "text" and requested in tgi.PLACEHOLDER_MODELS
                and not any(m.answers_to(requested) for m in self.served_models)):
            requested = None  # a TGI client's chat (TGI ignores `model`): the default text model
        for served in self.served_models:
            if served.kind == kind and served.answers_to(requested):
                return served
        for other in self.served_models:
            if other.answers_to(requested):
                raise ApiError(400, f"model {requested!r} is {_a(other.kind)} model; this route needs {_a(kind)} "
                                    "model", "model", code="model_not_supported")
        choices = ", ".join(m.tag for m in self.served_models if m.kind == kind)
        raise ApiError(404, f"model {requested!r} is not served here ({kind} models: {choices})",
                       "model", code="model_not_found")

    # ---- text ---------------------------------------------------------------------------

    def _completion_requests(self, body: CompletionBody, prompts: list[str | list[int]], engine: TextRequests
                             ) -> tuple[list[CompletionRequest], int]:
        """One engine request per prompt, and the seed: choice j (prompt j // n's choice j % n)
        uses seed + j; with best_of (k candidates per prompt), candidate j (prompt j // k's) does.
        The checks that need the whole request (its prompts together) are here; the engine checks
        each prompt."""
        # The limit bounds the time tokenizing takes: one request's prompts count together.
        if (chars := sum(len(p) for p in prompts if isinstance(p, str))) > engine.max_prompt_chars:
            which = "prompt has" if len(prompts) == 1 else f"the {len(prompts)} prompts have"
            raise ApiError(400, f"{which} {chars} characters; the limit is {engine.max_prompt_chars}",
                           "prompt", code="prompt_too_long")
        if body.max_tokens == 0 and not body.echo:  # OpenAI's rule: 0 returns the prompt, scored
            raise ApiError(400, "max_tokens: 0 is only allowed with echo (the prompt back, with logprobs scored)",
                           "max_tokens")
        cfg = self.engines.text_stream.cfg
        if len(prompts) > cfg.max_running + cfg.max_waiting:  # each prompt queues as one request
            raise ApiError(400, f"at most {cfg.max_running + cfg.max_waiting} prompts in one request on this server "
                                f"(CONDGEN_TEXT_MAX_RUNNING + CONDGEN_TEXT_MAX_WAITING), got {len(prompts)}", "prompt")
        n, choices = body.candidates(), len(prompts) * body.candidates()
        what = "candidates (prompts × best_of)" if n > body.n else "choices"
        if n > cfg.max_running:  # the engine decodes a prompt's choices (or candidates) side by side
            name = "best_of" if n > body.n else "n"
            raise ApiError(400, f"{name}: at most {cfg.max_running} on this server (CONDGEN_TEXT_MAX_RUNNING), "
                                f"got {n}", name)
        if body.seed is not None and body.seed + choices - 1 > MAX_SEED:
            raise ApiError(400, f"seed must be at most {MAX_SEED - choices + 1} for {choices} {what} (the j-th "
                                f"uses seed + j, at most {MAX_SEED}), got {body.seed}", "seed")
        seed = _pick_seed(body.seed, choices)
        return [CompletionRequest(
            prompt=p if isinstance(p, str) else "", prompt_ids=None if isinstance(p, str) else p, seed=seed + i * n,
            max_tokens=body.max_tokens,
            sampling=body.sampling_params(),
            stop=list(body.stop), stop_token_ids=list(body.stop_token_ids or []),
            include_stop_str_in_output=body.include_stop_str_in_output, n=n,
            logprobs=0 if body.logprobs is None and n > body.n else body.logprobs,  # best_of ranks by them
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
            echo=False,  # the service prepends the prompt itself, identically for streams
            prompt_logprobs=body.echo and body.logprobs is not None,  # OpenAI's: echo scores the prompt
        ) for i, p in enumerate(prompts)], seed

    async def _start_text(self, body: CompletionBody, request: Request) -> TextRun | None:
        """Check a completion request, queue its prompts and wait until the engine admits them:
        the one path of /complete, /v1/completions and /v1/chat/completions. None when the
        client left while it queued (which takes its requests out of the queue)."""
        engine = self._text_requests()
        served = self._check_model(body.model, "text")
        reqs, seed = self._completion_requests(body, body.prompts(), engine)
        k = body.candidates()  # candidate j: prompt j // k, seed + j
        # Checked once, a request's prompts counted together against the queue; their lengths as
        # the model sees them (an empty prompt is one end-of-text token) are the usage. A long
        # prompt (text, or ids: a chat's) is tokenized and checked in a thread, where the tokenizer
        # lets the event loop run (checking 400,000 ids alone took the loop 50 ms); the queue count read
        # there may be a moment old, and the engine process's own check bounds the queue then.
        def check() -> list[list[int]]:
            return [_checked(self.engines.text_stream, req, ahead=i) for i, req in enumerate(reqs)]

        long = any(len(req.prompt) + len(req.prompt_ids or ()) > LONG_TEXT_CHARS for req in reqs)
        prompt_ids = await asyncio.to_thread(check) if long else check()
        prompt_tokens = sum(map(len, prompt_ids))
        streams = [self.engines.text_stream.generate(req, ids) for req, ids in zip(reqs, prompt_ids)]
        events = streams[0] if len(streams) == 1 else _merged(streams, k)
        arrived = time.perf_counter()
        # The first event comes once the request is admitted: a client that leaves while it
        # queues takes it out of the queue, streaming or not.
        if (first := await _until_disconnected(_first_event(events), request)) is None:
            return None
        return TextRun(served.tag, seed, len(reqs) * k, reqs[0].logprobs, prompt_tokens,
                       self._measured(_chain(first, events), arrived))

    async def complete(self, body: CompletionBody, openai: bool, request: Request) -> Response:
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if (run := await self._start_text(body, request)) is None:
            return _client_left(request, completion_id)
        head = run.head(completion_id, "text_completion")
        # what echo puts before each prompt's choices (token ids are the vocabulary's: checked)
        prompts, k = body.prompts(), body.candidates()
        echo_texts = [(p if isinstance(p, str) else self.engines.text.tokenizer.decode(p)) if body.echo else ""
                      for p in prompts]
        echoed = [echo_texts[j // k] for j in range(run.choices)]  # each candidate's prefix
        if body.stream:  # (never with best_of above n)
            shape = CompletionChunks(echoed, body.echo and body.logprobs is None, body.logprobs is not None, openai)
            return SSEResponse(self._stream(run, head, request, shape,
                                            *_usage_in_stream(getattr(body, "stream_options", None), not openai)))
        if (result := await _until_disconnected(_collect(run), request)) is None:
            return _client_left(request, completion_id)
        if k > body.n:
            result.choices = best_of(result.choices, k, body.n, keep_logprobs=body.logprobs is not None)
            echoed = [echo_texts[j // body.n] for j in range(len(result.choices))]
        answer = [{
            "index": c.index, "text": echoed[c.index] + c.text,
            "finish_reason": _finish_reason(c.finish_reason, openai),
            "logprobs": (_logprobs_json(c.logprobs, len(echoed[c.index]), c.prompt_logprobs)
                         if c.logprobs is not None else None),
        } for c in result.choices]
        return JSONResponse({**head, "choices": answer, "usage": usage(run.prompt_tokens, result.completion_tokens)})

    async def chat(self, body: chat.ChatCompletionBody, request: Request) -> Response:
        """/v1/chat/completions: the messages, written out by the chat template, run as
        /v1/completions runs that prompt (its checks, limits, seeds, metrics); only the answer's
        layout is chat's."""
        engine = self._text_requests()
        self._check_model(body.model, "text")
        text = chat.prompt(CHAT_TEMPLATE, body)
        _within_prompt_limit(text, engine, "messages")
        ids = await _tokenized(engine.tokenizer, text) or [engine.tokenizer.eot_id]  # as a completion's prompt
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        with chat.chat_names(body):
            run = await self._start_text(body.completion(ids, engine.block_size), request)
        if run is None:
            return _client_left(request, completion_id)
        head = run.head(completion_id, "chat.completion")
        if body.stream:
            shape = chat.ChatChunks(run.choices, engine.tokenizer, body.logprobs)
            return SSEResponse(self._stream(run, {**head, "object": "chat.completion.chunk"}, request, shape,
                                            *_usage_in_stream(body.stream_options, False)))
        if (result := await _until_disconnected(_collect(run), request)) is None:
            return _client_left(request, completion_id)
        return JSONResponse(chat.response(head, result, engine.tokenizer))

    async def _measured(self, events: AsyncIterator[StreamEvent], arrived: float) -> AsyncIterator[StreamEvent]:
        """Pass events through, measuring time to first token and inter-token latency."""
        ttft, itl = self.metrics.time_to_first_token, self.metrics.inter_token_latency
        last: dict[int, float] = {}
        try:
            async for ev in events:
                if ev.num_tokens:
                    now = time.perf_counter()
                    prev = last.get(ev.choice)
                    (ttft.observe(now - arrived) if prev is None else itl.observe(now - prev))
                    last[ev.choice] = now
                yield ev
        finally:
            await events.aclose()  # leaving early cancels the request in the engine

    async def _stream(self, run: TextRun, head: dict[str, Any], request: Request, shape: ChunkShape,
                      include_usage: bool, usage_in_every_chunk: bool = False) -> AsyncIterator[bytes]:
        """SSE in the OpenAI layout: `shape`'s opening chunks, then a chunk for each event it
        makes one of (each with the usage so far, with vLLM's continuous_usage_stats), the usage,
        [DONE]. Closing this generator (client gone) cancels the generation."""

        def chunk(choice: dict[str, Any]) -> bytes:
            so_far = {"usage": usage(run.prompt_tokens, tokens)} if usage_in_every_chunk else {}
            return sse_event({**head, "choices": [choice], **so_far})

        tokens = 0
        try:
            for choice in shape.opening():
                yield chunk(choice)
            async for ev in run.events:
                tokens += ev.num_tokens
                if (choice := shape.choice(ev)) is not None:
                    yield chunk(choice)
            if include_usage:
                yield sse_event({**head, "choices": [], "usage": usage(run.prompt_tokens, tokens)})
            yield SSE_DONE
        except Exception as e:  # the headers (a 200) are gone: report in-band, then [DONE], as vLLM does
            yield _in_band_error(e, request, f"stream {head['id']}") + SSE_DONE
        finally:
            await run.events.aclose()

    async def tgi_generate(self, body: TGIBody, request: Request, stream: bool, as_list: bool = False) -> Response:
        """text-generation-inference's /generate, /generate_stream and / (see service/tgi.py)."""
        p = body.parameters
        if (err := p.unsupported()) is not None:
            raise err
        engine = self._text_requests()
        tgi.check_truncate(p, engine.block_size)
        _within_prompt_limit(body.inputs, engine, "inputs")
        ids = await _tokenized(engine.tokenizer, body.inputs)
        if p.truncate is not None:
            ids = ids[-p.truncate:]
        tgi.check_length(ids, p, engine.block_size)
        tgi.check_best_of(p, stream)
        seed = _pick_seed(p.seed, p.best_of or 1)
        req = tgi.completion_request(body.inputs, ids, p, seed, engine.block_size)
        try:
            ids = _checked(self.engines.text_stream, req)
        except InvalidParameter as e:  # named as TGI names the field (lengths: tgi.check_length, above)
            name = tgi.PARAM.get(e.param, e.param)
            raise ApiError(400, f"{name}: {e.message}", name, code=e.code) from None
        # one answer per candidate (best_of; candidate j seeded seed + j); TGI reports no seed for greedy decoding
        answers = [tgi.Generated(engine.tokenizer, p, ids, body.inputs if p.return_full_text else "",
                                 seed + j if tgi.samples(p) else None) for j in range(req.n)]
        answer = answers[0]
        events = self.engines.text_stream.generate(req, ids)
        arrived = time.perf_counter()
        if (first := await _until_disconnected(_first_event(events), request)) is None:
            return _client_left(request, "text-generation-inference")
        events = self._measured(_chain(first, events), arrived)
        if stream:
            return SSEResponse(self._tgi_stream(events, answer, request))

        async def collect() -> list[tgi.Generated]:
            await _consume(events, lambda ev: answers[ev.choice].add(ev))
            return answers

        if await _until_disconnected(collect(), request) is None:  # None: the client left
            return _client_left(request, "text-generation-inference")
        best = max(answers, key=lambda a: a.score)  # the first of equals
        response = best.response([a for a in answers if a is not best])
        return JSONResponse([response] if as_list else response)

    async def _tgi_stream(self, events: AsyncIterator[StreamEvent], answer: tgi.Generated,
                          request: Request) -> AsyncIterator[bytes]:
        """TGI's stream: an event per token as it comes, the last with the whole text and the
        details (a choice's last event releases every entry left, its own token's last); no
        [DONE]. Errors after the 200 are events."""
        index = 0
        try:
            async for ev in events:
                tokens = answer.add(ev)
                for j, (token, top) in enumerate(tokens):
                    index += 1
                    last = ev.finish_reason is not None and j == len(tokens) - 1
                    yield sse_event(answer.stream_event(index, token, top, last=last))
        except Exception as e:  # the headers (a 200) are gone: report in-band, in TGI's shape
            yield _in_band_error(e, request, "a text-generation-inference stream", tgi_shape=True)
        finally:
            await events.aclose()

    # ---- images -------------------------------------------------------------------------

    def _image_backend(self, model: str | None) -> ImageBackend:
        backend = self.images[self._check_model(model, "image").tag]
        self._ready_or_503(backend.requests)
        if backend.failed:
            raise unavailable(f"the image engine of {backend.served.tag} is not available: {backend.worker.down_because}")
        return backend

    async def _images(self, backend: ImageBackend, req: ImageRequest, request: Request,
                      describe: Callable[[ImageRequest, int, str], dict[str, Any] | str] = image_parameters
                      ) -> list[bytes] | None:
        """The request's PNGs; None when the client left first (its job, if still queued, is
        dropped by the batcher without running)."""
        backend.requests.validate(req)
        job = ImageJob(req, cost=req.n, future=asyncio.get_running_loop().create_future(), describe=describe)
        backend.batcher.submit(job)
        try:
            pngs = await _until_disconnected(job.future, request)
        finally:
            backend.batcher.withdraw(job)
        if pngs is None:
            logger.info("request %s to %s (%d images): the client left before the answer; its job was cancelled",
                        request_id(request.scope), request.url.path, req.n)
        return pngs

    @staticmethod
    def _image_request(body: ImageBody | OpenAIImageBody) -> ImageRequest:
        return ImageRequest(prompt=body.prompt, seed=_pick_seed(body.seed), n=body.n, truncation=body.truncation,
                            guidance_scale=body.guidance_scale, temperature=body.temperature, top_k=body.top_k,
                            negative_prompt=body.negative_prompt)

    async def generate(self, body: ImageBody, request: Request) -> Response:
        if body.response_format == "png" and body.n != 1:
            raise ApiError(400, "response_format 'png' returns a single image: use n = 1, or b64_json",
                           "response_format")
        backend = self._image_backend(body.model)
        req = self._image_request(body)
        if (pngs := await self._images(backend, req, request)) is None:
            return Response(status_code=499)
        seed, tag = req.seed, backend.served.tag
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(seed), "X-Model": tag})
        return JSONResponse({"created": int(time.time()), "model": tag, "seed": seed,
                             "images": [{"b64_json": b64(p), "seed": seed + i} for i, p in enumerate(pngs)]})

    async def openai_images(self, body: OpenAIImageBody, request: Request) -> Response:
        if body.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported: this service stores no files; "
                                "use b64_json", "response_format")
        if body.style is not None:
            raise ApiError(400, "style is not supported: this model has no styles to choose from; leave it out",
                           "style")
        backend = self._image_backend(body.model)
        size = f"{backend.requests.image_size}x{backend.requests.image_size}"
        if body.size not in (None, "auto", size):
            raise ApiError(400, f"size {body.size!r} is not available; this model makes {size} "
                                "(send that, 'auto' or no size)", "size")
        req = self._image_request(body)
        if (pngs := await self._images(backend, req, request)) is None:
            return Response(status_code=499)
        return JSONResponse({"created": int(time.time()), "model": backend.served.tag, "seed": req.seed,
                             "data": [{"b64_json": b64(p), "revised_prompt": None, "seed": req.seed + i}
                                      for i, p in enumerate(pngs)]})

    async def txt2img(self, body: Txt2ImgBody, request: Request) -> Response:
        """AUTOMATIC1111's POST /sdapi/v1/txt2img (see service/sdapi.py)."""
        if (err := body.unsupported()) is not None:
            raise err
        checkpoint = body.override_settings.get("sd_model_checkpoint")
        if checkpoint is not None:
            checkpoint = sdapi.checkpoint_tag(checkpoint, [m.tag for m in self.served_models if m.kind == "image"])
        try:
            backend = self._image_backend(checkpoint)
        except ApiError as e:  # the model is named in override_settings here (when one is named at all)
            if e.param == "model":
                e.param = "override_settings" if checkpoint is not None else None
            raise
        size = backend.requests.image_size
        for name in ("width", "height"):
            if getattr(body, name) not in (None, size):
                raise ApiError(400, f"{name} {getattr(body, name)} is not available: {backend.served.name} makes "
                                    f"{size}x{size} images (send width and height {size}, or leave them out)", name)
        guides = isinstance(backend.requests, ARImageRequests)  # a GAN has no guidance: cfg_scale has no effect
        if guides and body.cfg_scale is not None and body.cfg_scale > MAX_GUIDANCE:  # (A1111's slider: 30)
            raise ApiError(400, f"cfg_scale {body.cfg_scale:g}: {backend.served.name} takes at most {MAX_GUIDANCE:g}",
                           "cfg_scale")
        guidance = (backend.requests.guidance_scale if body.cfg_scale is None else body.cfg_scale) if guides else None
        req = ImageRequest(prompt=body.prompt, seed=_pick_seed(body.seed), n=body.n, guidance_scale=guidance,
                           negative_prompt=body.negative_prompt)
        tag = backend.served.tag
        describe = functools.partial(sdapi.infotext, size=size)
        if (pngs := await self._images(backend, req, request, describe)) is None:
            return Response(status_code=499)
        return JSONResponse({
            "images": [b64(p) for p in pngs] if body.send_images else [],
            # the request, with the defaults it ran with (as A1111 echoes it)
            "parameters": {**body.model_dump(), "seed": req.seed if body.seed is not None else -1,
                           "width": size, "height": size, "cfg_scale": guidance if guides else body.cfg_scale},
            "info": json.dumps(sdapi.info(req, tag, size, body.batch_size)),
        })

    async def _run_images(self, backend: ImageBackend, jobs: list[ImageJob]) -> None:
        """One forward pass (or decode loop) for the whole batch, then PNG encoding, both in the
        model's worker process."""
        self._ready_or_503(backend.requests)
        tag = backend.served.tag
        params = [[job.describe(job.payload, i, tag) for i in range(job.payload.n)] for job in jobs]
        try:
            results = await backend.worker.generate_pngs([job.payload for job in jobs], params)
        except WorkerDied as e:
            if not self.engines.stopping:
                logger.error("the worker process of %s has died; /readyz answers 503 until it is started again", tag)
            for job in jobs:
                fail(job, unavailable(f"the image engine of {tag} is not available: {e}"))
            return
        except Exception as e:
            logger.exception("image batch of %d requests failed", len(jobs))
            for job in jobs:
                fail(job, e)
            return
        counter = self.metrics.images.labels(model=backend.served.name)
        for job, pngs in zip(jobs, results):
            counter.inc(len(pngs))
            if job.future is not None and not job.future.done():
                job.future.set_result(pngs)


def _engine_error(e: Exception) -> ApiError | None:
    """The answer to the text engine's refusal or failure: a full queue (its own check, raced
    past the server's, or the server's) is a 429, a dead engine process a 503; None otherwise."""
    if isinstance(e, QueueFull):
        return Overloaded(str(e), RETRY_AFTER_S)
    if isinstance(e, EngineFailed):
        return unavailable(f"the text engine is not available: {e}")
    return None


async def _tokenized(tokenizer: Tokenizer, text: str) -> list[int]:
    """The text's ids: a long text's from a thread, where the tokenizer lets the event loop run
    (100,000 emoji held it 0.12 s), a short one's from here (the thread's hop costs more)."""
    if len(text) > LONG_TEXT_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text)
    return tokenizer.encode(text)


def _checked(engine: EngineProcess, req: CompletionRequest, ahead: int = 0) -> list[int]:
    """The prompt's ids; a full queue is a 429, a dead engine a 503, before any work. `ahead`:
    requests of the same caller that will queue before this one (its other prompts)."""
    try:
        return engine.check(req, ahead)
    except (QueueFull, EngineFailed) as e:
        raise _engine_error(e) from None


async def _first_event(events: AsyncIterator[StreamEvent]) -> StreamEvent:
    """A request's first event: an engine that died since the check fails here, before any byte."""
    try:
        return await events.__anext__()
    except (QueueFull, EngineFailed) as e:
        raise _engine_error(e) from None


def _client_left(request: Request, what: str) -> Response:
    logger.info("request %s to %s (%s): the client left before the answer; its generation was cancelled",
                request_id(request.scope), request.url.path, what)
    return Response(status_code=499)


async def _merged(streams: list[AsyncIterator[StreamEvent]], n: int) -> AsyncIterator[StreamEvent]:
    """The events of one request's prompts (stream i: prompt i's n choices) as they come, each
    choice numbered as OpenAI numbers them: prompt i's choice c is choice i * n + c. An error in
    any stream ends the whole; closing this closes them all (cancelling their generation)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for ev in stream:
                queue.put_nowait(dataclasses.replace(ev, choice=i * n + ev.choice))
            queue.put_nowait(done)
        except Exception as e:
            queue.put_nowait(e)

    pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        for _ in streams:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _chain(first: StreamEvent, rest: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()


async def _collect(run: TextRun) -> Completion:
    """A request's choices, put together from its events."""
    builder = CompletionBuilder(run.choices, run.logprobs)
    await _consume(run.events, builder.add)
    return builder.build(run.prompt_tokens)


async def _consume(events: AsyncIterator[StreamEvent], add: Callable[[StreamEvent], Any]) -> None:
    """Every event to `add`; an engine that dies half-way is a 503, as one dead before it began."""
    try:
        async for ev in events:
            add(ev)
    except (QueueFull, EngineFailed) as e:  # QueueFull: one of several prompts, refused by the engine's check
        raise _engine_error(e) from None


def _in_band_error(e: Exception, request: Request, what: str, tgi_shape: bool = False) -> bytes:
    """The event that ends a stream failing after its 200 went out (called in the `except`),
    counted as the status it would have had: the engine process died (its reader logs the
    cause once) or refused one of several prompts (its own check, raced past the server's),
    each logged in a line that names the request's id, which its client has; or a bug (logged
    with its traceback under that id, which the event names, as its X-Request-ID header does)."""
    rid = None
    if (err := _engine_error(e)) is None:
        rid = request_id(request.scope)
        logger.exception("request %s to %s (%s) failed", rid, request.url.path, what)
        err = ApiError(500, f"internal error (request id {rid})", type="server_error")
    else:
        logger.warning("request %s to %s (%s) failed: %s", request_id(request.scope), request.url.path, what,
                       err.message)
    count_error(request.url.path, err.status)
    return sse_event(error_body(err, tgi_shape, rid)[1])


async def _until_disconnected(work: Awaitable[T], request: Request) -> T | None:
    """Await `work`, but give up (cancelling it, which cancels the generation) as soon as the
    client disconnects; returns None then. The disconnect is awaited, not polled for: image
    jobs queue for less than a polling interval (16 clients of 16 images each, gone after
    10-30 ms: polled every 0.25 s, all 256 images were made; awaited, 80-160)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(lambda _: task.cancel())
    try:
        return await task
    except asyncio.CancelledError:
        # The client left only if `gone` cancelled the work and nobody cancelled this handler:
        # BentoML's first-byte timeout (CONDGEN_TIMEOUT) cancels it, answers 504, and the server
        # then reports a disconnect, which was counted as a client that left (499).
        if gone.done() and not gone.cancelled() and not asyncio.current_task().cancelling():
            return None
        raise
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone: with the body read, the server's next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _finish_reason(reason: str | None, openai: bool) -> str | None:
    return openai_finish_reason(reason) if openai else reason


def _usage_in_stream(options: StreamOptions | None, always: bool) -> tuple[bool, bool]:
    """(a usage chunk at the end, the usage so far in every chunk), as OpenAI's stream_options
    and vLLM's continuous_usage_stats ask; `always`: /complete's stream, which always ends with it."""
    include = always or bool(options and options.include_usage)
    return include, bool(options and options.include_usage and options.continuous_usage_stats)


# API key, CORS, overload limits and deadlines (service.security, service.limits); /openapi.json.
install_security(Generation, routes, LIMITS)
