"""Reliability pieces that need no server: the limits middleware (429 + Retry-After, deadline),
the API key and CORS, model-name validation, the image queue bound, the OpenAPI document, and
model faults at load time (each names the bad file)."""
from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from models.artifacts import ArtifactError
from service.batching import Job, MicroBatcher, Overloaded
from service.limits import LimitMiddleware, Limits, request_id, send_error
from service.metrics import get_metrics
from service.openapi import build_openapi
from service.schemas import ApiError, CompletionBody, ImageBody, OpenAICompletionBody
from service.env import ConfigError, env_choice, env_flag, env_float, env_int
from service.security import APIKeyMiddleware, JSONRoutingErrors, api_key, cors_options, model_tag


def _app(handler_log: dict, limits: Limits, key: str | None = None) -> Starlette:
    release = asyncio.Event()
    handler_log["release"] = release

    async def complete(request):
        handler_log["entered"] = handler_log.get("entered", 0) + 1
        try:
            await release.wait()
        except asyncio.CancelledError:
            handler_log["cancelled"] = True
            raise
        return JSONResponse({"ok": True})

    async def generate(request):  # a stream that never ends by itself
        async def body():
            try:
                yield b"data: {\"first\":1}\n\n"
                await asyncio.sleep(3600)
            finally:
                handler_log["stream_closed"] = True
        return StreamingResponse(body(), media_type="text/event-stream")

    async def models(request):
        return JSONResponse({"data": []})

    routes = [Route("/complete", complete, methods=["POST"]), Route("/generate", generate, methods=["POST"]),
              Route("/models", models), Route("/models/{model}", models), Route("/metrics", models)]
    mw = [Middleware(APIKeyMiddleware, key=key, routes=routes)] if key else []
    return Starlette(routes=routes, middleware=[*mw, Middleware(LimitMiddleware, limits=limits)])


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_beyond_max_inflight_is_429_with_retry_after_at_once():
    log: dict = {}
    app = _app(log, Limits(max_inflight=2, deadline_s=60, retry_after_s=3))

    async def scenario():
        async with _client(app) as c:
            held = [asyncio.create_task(c.post("/complete", json={})) for _ in range(2)]
            while log.get("entered", 0) < 2:
                await asyncio.sleep(0.01)
            refused = await c.post("/complete", json={}, headers={"x-request-id": "mine"})
            other = await c.get("/models")  # not a generation route: never limited
            log["release"].set()
            return refused, other, [await t for t in held]

    refused, other, held = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded" and refused.headers["x-request-id"] == "mine"
    assert other.status_code == 200
    assert [r.status_code for r in held] == [200, 200]


def test_tokenize_and_detokenize_count_among_the_requests_in_flight():
    """They had no limit: a 100,000-character text's tokens are 15 MB of JSON, and 16 such
    requests at once held every other request for 11 s."""
    log: dict = {}
    app = _app(log, Limits(max_inflight=1, deadline_s=60))

    async def scenario():
        async with _client(app) as c:
            held = asyncio.create_task(c.post("/complete", json={}))
            while log.get("entered", 0) < 1:
                await asyncio.sleep(0.01)
            refused = [(await c.post(path, json={})).status_code for path in ("/tokenize", "/detokenize")]
            log["release"].set()
            await held
            return refused

    assert asyncio.run(scenario()) == [429, 429]


def test_deadline_cancels_the_handler_and_answers_504_json():
    log: dict = {}
    app = _app(log, Limits(max_inflight=8, deadline_s=0.3))

    async def scenario():
        async with _client(app) as c:
            return await c.post("/complete", json={})

    r = asyncio.run(scenario())
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["x-should-retry"] == "false"  # the OpenAI client ran the doomed request three times
    assert log.get("cancelled") is True  # the handler's `finally` ran: its engine work is released


def test_a_deadline_passed_after_the_last_byte_is_no_504():
    """A handler still cleaning up (a stream's generators closing) when the deadline passed was
    counted and logged as a 504, although its client had the whole answer (a probe saw it once
    in 120 streams)."""
    cleaned = asyncio.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"all of it", "more_body": False})
        try:
            await asyncio.sleep(3600)  # the clean-up after the answer, cut short by the deadline
        finally:
            cleaned.set()

    labels = {"endpoint": "/complete", "status": "504"}
    get_metrics()
    before = REGISTRY.get_sample_value("condgen_request_errors_total", labels) or 0

    async def scenario():
        async with _client(LimitMiddleware(app, limits=Limits(max_inflight=8, deadline_s=0.2))) as c:
            return await c.post("/complete", json={})

    r = asyncio.run(scenario())
    assert (r.status_code, r.text) == (200, "all of it") and cleaned.is_set()
    assert (REGISTRY.get_sample_value("condgen_request_errors_total", labels) or 0) == before


def test_deadline_mid_stream_ends_it_with_an_in_band_error_event():
    log: dict = {}
    app = _app(log, Limits(max_inflight=8, deadline_s=0.3))

    async def scenario():
        async with _client(app) as c:
            return await c.post("/generate", json={})

    r = asyncio.run(scenario())
    assert r.status_code == 200  # headers had gone before the deadline
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(data[0]) == {"first": 1}
    assert json.loads(data[-2])["error"]["code"] == "deadline_exceeded"
    assert data[-1] == "[DONE]"  # after the error, as vLLM ends a failed stream (TGI's streams have none)
    assert log.get("stream_closed") is True


def test_tgi_requests_get_the_limits_answers_in_tgi_s_shape():
    """A TGI stream past its deadline ended with this service's error event, which huggingface_hub
    raised as UnknownError carrying a dict; its 429s and 504s came in this shape too. A route that
    answers both kinds knows a TGI request once its handler has seen the body."""
    from huggingface_hub.errors import GenerationError
    from huggingface_hub.inference._common import _format_text_generation_stream_output

    async def tgi_stream(request):  # a TGI route: its stream never ends by itself
        async def body():
            yield b'data: {"token": {"id": 1, "text": "a", "logprob": 0.0, "special": false}}\n\n'
            await asyncio.sleep(3600)
        return StreamingResponse(body(), media_type="text/event-stream")

    async def both(request):  # /generate: a TGI body marks the request, then the work stalls
        request.state.tgi = "inputs" in await request.json()
        await asyncio.sleep(3600)

    routes = [Route("/generate_stream", tgi_stream, methods=["POST"]), Route("/generate", both, methods=["POST"])]

    async def scenario():
        app = Starlette(routes=routes, middleware=[Middleware(LimitMiddleware, limits=Limits(1, 0.3, 2))])
        async with _client(app) as c:
            stream = asyncio.create_task(c.post("/generate_stream", json={"inputs": "x"}))
            await asyncio.sleep(0.05)
            full = await c.post("/generate_stream", json={"inputs": "x"})
            return await stream, full, await c.post("/generate", json={"inputs": "x"}), \
                await c.post("/generate", json={"prompt": "x"})

    stream, full, tgi_late, image_late = asyncio.run(scenario())
    last = [line for line in stream.text.splitlines() if line.startswith("data:")][-1]
    with pytest.raises(GenerationError, match="deadline"):
        _format_text_generation_stream_output(last, details=True)
    assert full.status_code == 429 and full.json()["error_type"] == "overloaded" and full.headers["retry-after"] == "2"
    assert tgi_late.status_code == 504 and tgi_late.json()["error_type"] == "generation"
    assert image_late.status_code == 504 and image_late.json()["error"]["code"] == "deadline_exceeded"


def test_a_stream_cut_off_by_its_client_counts_as_a_499(caplog):
    """As a plain answer to a client that left does (counted and logged): BentoML counts a
    request at its last byte, which such a stream never sends, so without this it is counted
    nowhere."""
    caplog.set_level(logging.INFO, logger="condgen.service")
    log: dict = {}
    app = _app(log, Limits(max_inflight=8, deadline_s=60))
    labels = {"endpoint": "/generate", "status": "499"}
    get_metrics()
    before = REGISTRY.get_sample_value("condgen_request_errors_total", labels) or 0
    sent: list[dict] = []
    first_chunk = asyncio.Event()
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            first_chunk.set()

    async def receive() -> dict:
        if body:
            return body.pop()
        await first_chunk.wait()  # the client hangs up once the stream has begun
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"x-request-id", b"r-7")],
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert log.get("stream_closed") is True and sent[-1].get("more_body") is True  # cut off
    assert REGISTRY.get_sample_value("condgen_request_errors_total", labels) == before + 1
    assert "request r-7 to /generate: the client left before the stream's end" in caplog.text  # named no request


def test_a_request_without_an_id_gets_one_that_its_answer_and_log_lines_share():
    """Made up once per request, in its scope's state: the answer's header, the handler's log
    lines and a stream's in-band error all read that one (the in-band 500 made a new one)."""
    scope = {"type": "http", "path": "/complete", "headers": []}
    made = request_id(scope)
    assert len(made) == 32 and request_id(scope) == made
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(send_error(send, scope, ApiError(400, "bad")))
    assert dict(sent[0]["headers"])[b"x-request-id"] == made.encode()
    asked = {"type": "http", "path": "/complete", "headers": [(b"x-request-id", b"mine")]}
    assert request_id(asked) == "mine"


@pytest.mark.parametrize("asked", [b"x" * 201, b"a\tb", b"caf\xe9", b""])
def test_a_client_id_that_is_long_or_not_printable_ascii_is_replaced(asked):
    """A client's X-Request-ID goes into the answer's header and the log: a 100 MB one came back
    whole in the 401, and a tab or a Latin-1 byte went into the log as it was."""
    made = request_id({"type": "http", "headers": [(b"x-request-id", asked)]})
    assert len(made) == 32 and made != asked.decode("latin-1")
    kept = b"req-7.ab:cd/EF_" + b"9" * 185  # 200 printable characters
    assert request_id({"type": "http", "headers": [(b"x-request-id", kept)]}) == kept.decode()


def test_the_access_log_escapes_control_characters(caplog):
    """BentoML's access log writes the request's decoded path as it is: `/x%0a<a made-up line>`
    forged a second log line, and `%1b[2K` reached a terminal that shows the log."""
    import logging

    from service.security import escape_access_log

    escape_access_log()
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        logging.getLogger("bentoml.access").info("%s (%s) %.3fms", "127.0.0.1:1",
                                                 "path=/x\n2026 [INFO] FORGED\r\x1b[2K\x00\x7f\x9b\u2028\\n", 1.0)
    line = caplog.records[-1].getMessage()
    assert not any(c in line for c in "\n\x1b\x00\x7f\x9b\u2028")
    # a literal backslash doubled: the text "\n" does not read as an escaped newline
    assert "path=/x\\n2026 [INFO] FORGED\\r\\x1b[2K\\x00\\x7f\\x9b\\u2028\\\\n" in line


def test_inflight_count_returns_to_zero_after_errors_and_deadlines():
    log: dict = {}
    app = _app(log, Limits(max_inflight=1, deadline_s=0.2))

    async def scenario():
        async with _client(app) as c:
            codes = [(await c.post("/complete", json={})).status_code for _ in range(3)]
            return codes

    assert asyncio.run(scenario()) == [504, 504, 504]  # never 429: each slot was given back


def test_a_place_is_free_once_the_whole_answer_is_sent():
    """A client with its whole answer may send the next request at once, while the handler still
    cleans up (a stream's generators closing): 8 streaming clients against 8 places saw 429s."""
    cleanup = asyncio.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        await cleanup.wait()

    limit = LimitMiddleware(app, Limits(max_inflight=1, deadline_s=60))
    scope = {"type": "http", "path": "/complete", "method": "POST", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario():
        answers: list[list[dict]] = [[], []]
        first = asyncio.ensure_future(limit(scope, receive, lambda m: _append(answers[0], m)))
        await asyncio.sleep(0.01)  # answered, still cleaning up
        second = asyncio.ensure_future(limit(scope, receive, lambda m: _append(answers[1], m)))
        await asyncio.sleep(0.01)
        cleanup.set()
        await asyncio.gather(first, second)
        return [a[0]["status"] for a in answers], limit.inflight

    assert asyncio.run(scenario()) == ([200, 200], 0)


async def _append(messages: list[dict], message: dict) -> None:
    messages.append(message)


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"x-api-key": "wrong"}, 401),
    ({"Authorization": "Bearer k3y"}, 200),
    ({"authorization": "bearer k3y"}, 200),
    ({"x-api-key": "k3y"}, 200),
])
def test_api_key_header_forms(headers, status):
    app = _app({}, Limits(), key="k3y")

    async def scenario():
        async with _client(app) as c:
            return await c.get("/models", headers=headers), await c.get("/metrics")

    labels = {"endpoint": "/models", "status": "401"}
    before = REGISTRY.get_sample_value("condgen_request_errors_total", labels) or 0
    r, metrics = asyncio.run(scenario())
    assert r.status_code == status
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert len(r.headers["x-request-id"]) == 32  # an id, as every answer has
    counted = (REGISTRY.get_sample_value("condgen_request_errors_total", labels) or 0) - before
    assert counted == (status == 401)  # a refused key is an error answer like any other
    assert metrics.status_code == 200  # health and metrics need no key


def test_refused_keys_are_counted_by_route_not_by_the_path_a_client_made_up():
    """A 401 was labelled by the raw path: a scanner without the key added a series to
    /metrics for every path it tried."""
    app = _app({}, Limits(), key="k3y")

    async def scenario():
        async with _client(app) as c:
            for path in ("/models/gpt", "/models/other", "/scan1", "/scan2", "/x" * 300):
                assert (await c.get(path)).status_code == 401

    def count(endpoint: str) -> float:
        return REGISTRY.get_sample_value("condgen_request_errors_total",
                                         {"endpoint": endpoint, "status": "401"}) or 0

    before = count("/models/{model}"), count("unmatched")
    asyncio.run(scenario())
    assert (count("/models/{model}") - before[0], count("unmatched") - before[1]) == (2, 3)
    assert count("/scan1") == count("/scan2") == 0


@pytest.mark.parametrize("raw, allowed", [
    ("*", ["*"]), ("https://app.example.com/, http://localhost:5173", ["https://app.example.com", "http://localhost:5173"]),
    ("not a url", None), ("app.example.com", None), ("https://app.example.com/ui", None),
    ("https://[::1]:8080", ["https://[::1]:8080"]),  # an IPv6 host, as browsers send it (it was refused)
    ("http://*.example.com", None), ("https://app.example.com:99999", None), ("https://user@app.example.com", None),
    # what never equals a browser's Origin, which the server compares as a string
    ("https://App.example.com", None), ("https://app.example.com:443", None), ("https://bücher.example", None)])
def test_a_cors_origin_no_browser_could_send_stops_the_start_up(raw, allowed, monkeypatch):
    """An origin with a typo (no scheme, a path) never matched any browser's, in silence."""
    from service.security import cors_origins

    monkeypatch.setenv("CONDGEN_CORS_ORIGINS", raw)
    if allowed is None:
        with pytest.raises(ConfigError, match="CONDGEN_CORS_ORIGINS: .* is not an origin"):
            cors_origins()
    else:
        assert cors_origins() == allowed


def test_cors_preflight_passes_the_key_check_and_names_the_origin():
    inner = _app({}, Limits(), key="k3y")
    app = JSONRoutingErrors(CORSMiddleware(inner, **cors_options(["http://ok.example"])))
    # What the official OpenAI SDKs ask for: their own x-stainless-* headers besides the usual ones.
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count"

    async def scenario():
        async with _client(app) as c:
            pre = await c.options("/complete", headers={"origin": "http://ok.example",
                                                       "access-control-request-method": "POST",
                                                       "access-control-request-headers": asked})
            bad = await c.options("/complete", headers={"origin": "http://evil.example",
                                                       "access-control-request-method": "POST"})
            return pre, bad

    pre, bad = asyncio.run(scenario())
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ok.example"
    allowed = {h.strip() for h in pre.headers["access-control-allow-headers"].lower().split(",")}
    assert set(asked.split(",")) <= allowed
    assert "access-control-allow-origin" not in bad.headers
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "cors_not_allowed"  # the JSON shape
    assert "http://evil.example" in bad.json()["error"]["message"]


@pytest.mark.parametrize("tag", ["gpt", "gpt:latest", "my-model.v2:20240101_x"])
def test_model_tags_from_the_environment_accepted(tag, monkeypatch):
    monkeypatch.setenv("GPT_MODEL", tag)
    assert model_tag("GPT_MODEL", "gpt:latest") == tag


def test_an_unset_model_tag_means_the_default_and_an_empty_one_no_model(monkeypatch):
    """Empty turns the model off (a text-only or image-only server), as AR_IMAGE_MODEL's did."""
    monkeypatch.delenv("GPT_MODEL", raising=False)
    assert model_tag("GPT_MODEL", "gpt:latest") == "gpt:latest"
    monkeypatch.setenv("GPT_MODEL", "")
    assert model_tag("GPT_MODEL", "gpt:latest") is None


@pytest.mark.parametrize("tag", ["../gpt", "gpt/../../etc", "/abs/path", "gpt:../x", "a b", "GPT", " ",
                                 "gpt:", "gpt:v1:v2", "gpt\n", "..", "a..b"])
def test_model_tags_from_the_environment_refused(tag, monkeypatch):
    monkeypatch.setenv("GAN_MODEL", tag)
    with pytest.raises(ConfigError, match="GAN_MODEL"):
        model_tag("GAN_MODEL", "gan:latest")


@pytest.mark.parametrize("body_cls", [CompletionBody, ImageBody, OpenAICompletionBody])
@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "x:../../y", " gpt", "gpt\x00", "g" * 200, ":v1"])
def test_request_model_field_is_refused_unless_a_tag(body_cls, name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        body_cls.model_validate({"prompt": "p", "model": name})
    assert e.value.errors()[0]["loc"][0] == "model"


def test_request_model_field_accepts_tags():
    for name in ["gpt", "gpt:latest", "gpt:43wh7ghi4k2imax4", "gpt-3.5-turbo-instruct"]:
        assert CompletionBody.model_validate({"prompt": "p", "model": name}).model == name


def test_image_queue_is_bounded_by_cost():
    async def scenario():
        async def run(jobs):  # never called: the consumer is given no chance to run
            raise AssertionError

        b = MicroBatcher("images", run, get_metrics(), max_batch_cost=64, max_queue_cost=5, retry_after_s=7)
        b.submit(Job("a", cost=4))
        b.submit(Job("b", cost=1))
        with pytest.raises(Overloaded) as e:
            b.submit(Job("c", cost=1))
        big = MicroBatcher("images", run, get_metrics(), max_queue_cost=2)
        big.submit(Job("alone", cost=16))  # a job alone is always admitted
        await b.close()
        await big.close()
        return e.value

    err = asyncio.run(scenario())
    assert err.status == 429 and err.headers == {"Retry-After": "7"} and err.code == "overloaded"
    # "5 images queued, limit 5" read as room to spare for a request of 16
    assert "(5 images queued and 1 more asked, limit 5)" in err.message


def test_every_labelled_series_a_dashboard_reads_exists_before_the_first_request():
    """The images' queue time, batch size and batch items had no series until the first image
    request: a rate() or an alert on them showed "no data", not 0."""
    get_metrics().start_series([("gpt", "text"), ("gan", "image"), ("ar_image", "image")], ["/complete", "/generate"])
    for endpoint in ("/complete", "/generate"):  # the first 500 or 503 was no increase() to an alert
        for status in ("500", "503", "504"):
            labels = {"endpoint": endpoint, "status": status}  # (other tests in this process may have counted some)
            assert REGISTRY.get_sample_value("condgen_request_errors_total", labels) is not None
    for name, endpoint, model in [
            ("condgen_queue_time_seconds_count", "images", "gan"), ("condgen_batch_size_count", "images", "gan"),
            ("condgen_batch_items_count", "images", "ar_image"), ("condgen_queue_time_seconds_count", "completions", "gpt"),
            ("condgen_batch_size_count", "completions", "gpt"), ("condgen_requests_waiting", "images", "ar_image")]:
        assert REGISTRY.get_sample_value(name, {"endpoint": endpoint, "model": model}) is not None, (name, model)


def test_openapi_document_covers_every_route_with_the_pydantic_bodies():
    doc = build_openapi()
    assert set(doc["paths"]) == {"/complete", "/generate", "/models", "/v1/completions",
                                 "/v1/images/generations", "/v1/models", "/v1/models/{model}",
                                 "/sdapi/v1/txt2img", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/scripts",
                                 "/sdapi/v1/progress",
                                 "/generate_stream", "/", "/info", "/tokenize", "/detokenize"}
    assert doc["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"
    assert "408" in doc["paths"]["/complete"]["post"]["responses"]
    # TGI's requests: a bad one is a 422 in TGI's shape; /generate answers both kinds
    assert {"400", "422"} & set(doc["paths"]["/generate_stream"]["post"]["responses"]) == {"422"}
    assert {"400", "422"} <= set(doc["paths"]["/generate"]["post"]["responses"])
    for name in ("CompletionBody", "OpenAICompletionBody", "ImageBody", "OpenAIImageBody", "StreamOptions",
                 "Txt2ImgBody", "TGIBody", "TGIParameters", "TokenizeBody", "TGITokenizeBody", "DetokenizeBody"):
        schema = doc["components"]["schemas"][name]  # null means the default, as the routes take it
        for field, prop in schema["properties"].items():
            assert (field in schema.get("required", [])) != ({"type": "null"} in prop.get("anyOf", [])), (name, field)
    body = doc["components"]["schemas"]["CompletionBody"]
    assert body["additionalProperties"] is False and body["properties"]["n"]["anyOf"][0]["maximum"] == 16
    assert "429" in doc["paths"]["/generate"]["post"]["responses"]
    json.dumps(doc)  # serialisable as served


def test_openapi_document_states_the_limits_the_validators_check():
    """A schema-driven client (or the fuzzer) could not see them: `stop` took any number of
    strings, `logit_bias` any keys and biases, an image prompt the empty string; and image
    top_k's description said "default: the model's", where it is 0 (off)."""
    schemas = build_openapi()["components"]["schemas"]
    body = schemas["CompletionBody"]["properties"]
    assert body["stop"]["maxItems"] == 4
    bias = body["logit_bias"]
    assert bias["maxProperties"] == 300 and bias["propertyNames"] == {"pattern": "^[0-9]{1,9}$"}
    assert bias["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}
    for name in ("ImageBody", "OpenAIImageBody"):
        image = schemas[name]["properties"]
        assert image["prompt"]["minLength"] == 1, name
        assert "0 (the default)" in image["top_k"]["description"], name
    from pydantic import ValidationError

    from service.schemas import CompletionBody, ImageBody  # and the validators agree
    for bad in ({"prompt": "a", "stop": ["x"] * 5}, {"prompt": "a", "logit_bias": {"x": 1}},
                {"prompt": "a", "logit_bias": {"1": 101}}):
        with pytest.raises(ValidationError):
            CompletionBody.model_validate(bad)
    with pytest.raises(ValidationError):
        ImageBody.model_validate({"prompt": ""})


# ---- model faults: the loaders refuse, naming the file ---------------------------------------

def _store_copy(bentoml_home: Path, name: str, dst: Path) -> Path:
    src = Path(glob.glob(str(bentoml_home / "models" / name / "*" / "config.json"))[0]).parent
    shutil.copytree(src, dst)
    return dst


def corrupt_weights(d: Path) -> str:
    (d / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 64)
    return "model.safetensors"


def mismatched_config(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    key = "n_embd" if "n_embd" in cfg else next(k for k, v in cfg.items() if isinstance(v, int) and v > 1)
    cfg[key] = cfg[key] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    return "model.safetensors"


def missing_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").unlink()
    return "tokenizer.json"


FAULTS = {"corrupt_weights": corrupt_weights, "mismatched_config": mismatched_config,
          "missing_tokenizer": missing_tokenizer}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", ["gpt", "gan"])
def test_model_faults_fail_loading_naming_the_file(fault, kind, bentoml_home, tmp_path):
    from models.engine import TextEngine
    from models.image_engine import ImageEngine

    d = _store_copy(bentoml_home, kind, tmp_path / kind)
    bad_file = FAULTS[fault](d)
    loader = TextEngine if kind == "gpt" else ImageEngine
    with pytest.raises(ArtifactError) as e:
        loader.load(d, device="cpu")
    first_line = str(e.value).splitlines()[0]
    assert first_line.startswith(str(d / bad_file)), first_line


@pytest.mark.parametrize("read, raw", [
    (lambda: env_int("CONDGEN_X", 64, 1), "abc"), (lambda: env_int("CONDGEN_X", 64, 1), "0.5"),
    (lambda: env_int("CONDGEN_X", 64, 1), "0"), (lambda: env_int("CONDGEN_X", 0, 0), "-1"),
    (lambda: env_int("CONDGEN_X", 0, 0, 8), "9"), (lambda: env_int("CONDGEN_X", 64, 1), "٣"),  # an Arabic-Indic 3
    (lambda: env_float("CONDGEN_X", 10.0, 0), "-1"), (lambda: env_float("CONDGEN_X", 10.0, 0), "0"),
    (lambda: env_float("CONDGEN_X", 10.0, 0), "nan"), (lambda: env_float("CONDGEN_X", 10.0, 0), "inf"),
    (lambda: env_flag("CONDGEN_X", False), "true"), (lambda: env_choice("CONDGEN_X", "auto", "auto|cpu", "a"), "gpu"),
])
def test_a_bad_setting_is_refused_naming_the_variable(read, raw, monkeypatch):
    monkeypatch.setenv("CONDGEN_X", raw)
    with pytest.raises(ConfigError, match=f"CONDGEN_X='{raw}'") as e:
        read()
    # BentoML, serving a Bento by tag, takes a ValueError for "not a tag" and hid the message
    assert not isinstance(e.value, ValueError)


@pytest.mark.parametrize("setting, message", [({"CONDGEN_MAX_INFLIGHT": "abc"}, "CONDGEN_MAX_INFLIGHT='abc'"),
                                              ({"GPT_MODEL": "gan"}, "GPT_MODEL='gan' is a 'gan' model")])
def test_bentoml_serve_stops_on_a_bad_setting_with_one_line(setting, message, bentoml_home):
    """The message naming the variable was the last of 60 lines of traceback."""
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True", **setting}
    done = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "serve", "service.app:Generation",
                           "--host", "127.0.0.1", "--port", "1"], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=120)
    out = (done.stdout + done.stderr).strip()
    assert done.returncode != 0 and message in out and len(out.splitlines()) == 1, out[-3000:]


def test_settings_take_their_defaults_when_unset_or_empty_and_parse_good_values(monkeypatch):
    monkeypatch.setenv("CONDGEN_X", "")
    assert env_int("CONDGEN_X", 64, 1) == 64 and env_flag("CONDGEN_X", True) is True
    monkeypatch.setenv("CONDGEN_X", " 8 ")
    assert env_int("CONDGEN_X", 64, 1) == 8 and env_float("CONDGEN_X", 1.0, 0) == 8.0
    assert env_int("CONDGEN_X", 0, 0, 8) == 8  # the maximum itself is allowed
    monkeypatch.setenv("CONDGEN_X", "0")
    assert env_float("CONDGEN_X", 10.0, 0, allow_minimum=True) == 0 and env_flag("CONDGEN_X", True) is False


@pytest.mark.parametrize("name, raw", [("CONDGEN_MAX_INFLIGHT", "abc"), ("CONDGEN_DEADLINE_S", "-5"),
                                       ("CONDGEN_RETRY_AFTER", "1.5"), ("CONDGEN_BODY_TIMEOUT_S", "-1"),
                                       ("CONDGEN_ENGINE_STALL_S", "-1"),
                                       ("CONDGEN_TEXT_MAX_RUNNING", "0"), ("CONDGEN_DEVICE", "gpu"),
                                       ("CONDGEN_CHAT_TEMPLATE", "/nowhere/chat.jinja"),
                                       ("CONDGEN_BATCH_WAIT_MS", "2000"), ("CONDGEN_TIMEOUT", "1_0"),
                                       ("CONDGEN_DEADLINE_S", "\u0663"), ("CONDGEN_WORKERS", "1000000")])
def test_the_service_refuses_to_start_with_a_bad_setting(name, raw):
    """Read when BentoML imports the service, so a bad value stops the start-up with its name,
    instead of a 500 on every request (the limits were read at the first request)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, name: raw}
    out = subprocess.run([sys.executable, "-c", "import service.app"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and f"{name}='{raw}'" in out.stderr.strip().splitlines()[-1]


def test_the_chat_route_says_why_there_is_none():
    """What an OpenAI client tries first: a bare 404 left its user guessing."""
    app = JSONRoutingErrors(_app({}, Limits()))

    async def scenario():
        async with _client(app) as c:
            return await c.post("/v1/chat/completions", json={"model": "gpt", "messages": []})

    r = asyncio.run(scenario())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "no chat template" in r.json()["error"]["message"] and "/v1/completions" in r.json()["error"]["message"]


def test_routing_errors_keep_the_cors_headers_and_carry_a_request_id():
    """The JSON 404 / 405 were built from scratch, dropping CORS's headers (a browser app saw an
    opaque failure instead of the chat hint) and carrying no X-Request-ID."""
    app = JSONRoutingErrors(CORSMiddleware(_app({}, Limits()), **cors_options(["http://a.example"])))
    origin = {"origin": "http://a.example"}

    async def scenario():
        async with _client(app) as c:
            return (await c.post("/v1/chat/completions", json={}, headers=origin),
                    await c.get("/complete", headers={**origin, "x-request-id": "mine"}))

    missing, wrong_method = asyncio.run(scenario())
    assert missing.status_code == 404 and "no chat template" in missing.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    for r in (missing, wrong_method):
        assert r.headers["access-control-allow-origin"] == "http://a.example" and r.headers["x-request-id"]
        assert r.headers["content-type"] == "application/json" and len(r.headers.get_list("content-type")) == 1
    assert wrong_method.headers["x-request-id"] == "mine" and "POST" in wrong_method.headers["allow"]
    assert int(missing.headers["content-length"]) == len(missing.content)


def test_the_configured_key_is_taken_without_surrounding_whitespace(monkeypatch):
    """A key from a secret file ends in a newline; it was compared with it, so every client,
    which sends the key stripped, got 401. Whitespace alone is refused at start-up."""
    monkeypatch.setenv("CONDGEN_API_KEY", " k3y\n")
    assert api_key() == "k3y"
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("CONDGEN_API_KEY")
        else:
            monkeypatch.setenv("CONDGEN_API_KEY", unset)
        assert api_key() is None
    monkeypatch.setenv("CONDGEN_API_KEY", " \n")
    with pytest.raises(ConfigError, match="CONDGEN_API_KEY is only whitespace"):
        api_key()
    app = _app({}, Limits(), key=" k3y\n")

    async def scenario():
        async with _client(app) as c:
            return [(await c.get("/models", headers=h)).status_code
                    for h in ({"Authorization": "Bearer k3y"}, {"x-api-key": "k3y "}, {"x-api-key": "k3"})]

    assert asyncio.run(scenario()) == [200, 200, 401]


def test_options_needs_the_key_unless_it_is_a_cors_pre_flight():
    """OPTIONS skipped the key check on every path, so anyone could list the routes (404 or
    405 answers); pre-flights are answered by the CORS middleware outside the key check."""
    bare = _app({}, Limits(), key="k3y")
    cors = CORSMiddleware(bare, **cors_options(["http://ok.example"]))
    pre = {"origin": "http://ok.example", "access-control-request-method": "POST"}

    async def scenario():
        async with _client(bare) as c:
            plain = [(await c.options(p)).status_code for p in ("/complete", "/nowhere")]
            keyed = (await c.options("/complete", headers={"x-api-key": "k3y"})).status_code
        async with _client(cors) as c:
            flight = (await c.options("/complete", headers=pre)).status_code
        return plain, keyed, flight

    assert asyncio.run(scenario()) == ([401, 401], 405, 200)


def test_the_api_description_is_open_with_a_key_and_says_how_to_send_it():
    """With a key set, /docs, its assets and /openapi.json needed the header, which a browser
    cannot send on a page load, and the document named no way to send it (no Authorize button)."""
    app = _app({}, Limits(), key="k3y")

    async def scenario():
        async with _client(app) as c:
            open_ = [(await c.get(p)).status_code for p in ("/docs", "/openapi.json", "/", "/static_content/x.css")]
            guarded = [(await c.post("/", json={})).status_code, (await c.get("/models")).status_code]
            return open_, guarded

    open_, guarded = asyncio.run(scenario())
    assert 401 not in open_ and guarded == [401, 401]  # POST / is TGI's generation route
    assert "security" not in build_openapi() and "securitySchemes" not in build_openapi()["components"]
    keyed = build_openapi(keyed=True)
    assert keyed["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert keyed["security"] == [{"bearer": []}, {"apiKey": []}]


def test_a_non_ascii_api_key_sent_as_utf8_is_accepted():
    """The header was decoded as Latin-1 and encoded again as UTF-8: other bytes, always 401."""
    app = _app({}, Limits(), key="clé-ünïcode")

    async def scenario():
        async with _client(app) as c:
            good = await c.get("/models", headers={"x-api-key": "clé-ünïcode".encode()})
            bearer = await c.get("/models", headers={"Authorization": b"Bearer " + "clé-ünïcode".encode()})
            bad = await c.get("/models", headers={"x-api-key": "cle-unicode"})
            return good.status_code, bearer.status_code, bad.status_code

    assert asyncio.run(scenario()) == (200, 200, 401)
