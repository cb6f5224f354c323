"""The OpenAPI document for the service's own routes, built from the pydantic bodies.

BentoML's /docs.json describes BentoML-style APIs; the routes here are a mounted Starlette
app, so their contract is written out from the same models that validate requests (one
source of truth). Served at GET /openapi.json; schemathesis fuzzes against it
(tests/test_schemathesis.py, load_tests/fuzz.py). GET / and GET /docs show it in Swagger UI,
from the copy BentoML ships: BentoML's own index page describes only its health routes (the
routes here are invisible to it) and loads Google Tag Manager, an outside call a self-hosted
service should not make from its users' browsers.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from service.chat import ChatCompletionBody, template_path
from service.schemas import (CompletionBody, DetokenizeBody, ImageBody, OpenAICompletionBody, OpenAIImageBody,
                             TGIBody, TGITokenizeBody, TokenizeBody, Txt2ImgBody)
from service.security import api_key

REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
                       "request_id": {"type": "string"}}}},
}
# text-generation-inference's, on its routes (service.tgi.error): what its clients parse.
TGI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"},
                   "error_type": {"type": "string", "enum": ["validation", "overloaded", "generation"]},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
}
ERRORS = {
    "400": "a client mistake; `param` names the field",
    "401": "API key missing or wrong (when CONDGEN_API_KEY is set)",
    "404": "the requested model is not served here",
    "413": "body larger than 1 MiB",
    "408": "the body did not arrive in time (CONDGEN_BODY_TIMEOUT_S)",
    "415": "the body is not declared as JSON, or is compressed",
    "429": "at capacity: retry after the `Retry-After` seconds",
    "503": "not ready (models loading, or loading failed)",
    "504": "the request passed its deadline",
}


def _errors(tgi: str = "") -> dict[str, Any]:
    """The error responses. `tgi`: "only", a route of TGI's requests alone, whose errors come in
    TGI's shape (a bad request as a 422; the API key's 401 in this service's); "also", a route
    that answers TGI's requests as well (in TGI's shape once it has read a TGI body)."""
    errors = {k: v for k, v in ERRORS.items() if not (tgi == "only" and k == "400")}
    schema: dict[str, Any] = {"$ref": REF.format(model="Error")}
    if tgi:
        errors["422"] = "a bad text-generation-inference request (TGI's error shape)"
        schema = {"anyOf": [schema, {"$ref": REF.format(model="TGIError")}]}
    out = {}
    for code, why in errors.items():
        headers = {"Retry-After": {"schema": {"type": "integer"}}} if code == "429" else {}
        out[code] = {"description": why, "headers": headers, "content": {"application/json": {"schema": schema}}}
    return out


def _post(summary: str, body: str | tuple[str, ...], ok: dict[str, Any], tgi: str = "") -> dict[str, Any]:
    """A POST route; a tuple of bodies: any one of them (told apart by their required fields)."""
    schema = ({"oneOf": [{"$ref": REF.format(model=b)} for b in body]} if isinstance(body, tuple)
              else {"$ref": REF.format(model=body)})
    return {"post": {
        "summary": summary, "operationId": summary.split(":")[0].replace(" ", "_").lower(),
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "success", "content": ok}, **_errors(tgi)},
    }}


def _get(summary: str, errors: tuple[str, ...] = ("401", "503"), parameters: list[dict[str, Any]] | None = None,
         shape: str = "object", tgi: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": summary.replace(" ", "_").lower(), "responses": {
        "200": {"description": "success", "content": {"application/json": {"schema": {"type": shape}}}},
        **{k: v for k, v in _errors(tgi).items() if k in errors}}}
    return {"get": {**op, "parameters": parameters} if parameters else op}


TXT2IMG_RESPONSE = {"type": "object", "required": ["images", "parameters", "info"], "properties": {
    "images": {"type": "array", "items": {"type": "string", "description": "a base64 PNG"}},
    "parameters": {"type": "object", "description": "the request, with the defaults it ran with"},
    "info": {"type": "string", "description": "JSON: prompts, seeds, infotexts"}}}

MODEL_PARAMETER = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                   "description": "name (gpt), name:latest or the full tag"}


def _null_means_default(schema: dict[str, Any]) -> None:
    """Let every optional property be null, as the routes take it (`_NullIsDefault`: null means
    the default, and OpenAI's client sends such nulls); pydantic's schema says what a value
    must be once given."""
    for name, prop in schema["properties"].items():
        nullable = {"type": "null"} in prop.get("anyOf", ()) or prop.get("type") == "null"
        if name in schema.get("required", ()) or nullable:
            continue
        docs = {k: prop.pop(k) for k in ("default", "description", "title") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **docs}


@functools.lru_cache(maxsize=4)
def build_openapi(keyed: bool = False, chat: bool = False) -> dict[str, Any]:
    """The API's OpenAPI document; `keyed` (CONDGEN_API_KEY set): it says how to send the key,
    which gives Swagger UI its Authorize button; `chat` (CONDGEN_CHAT_TEMPLATE set): it has
    /v1/chat/completions, which exists only then."""
    _, defs = models_json_schema(
        [(m, "validation") for m in (CompletionBody, ImageBody, OpenAICompletionBody, OpenAIImageBody, Txt2ImgBody,
                                     TGIBody, TokenizeBody, TGITokenizeBody, DetokenizeBody, ChatCompletionBody)],
        ref_template=REF)
    schemas = {**defs.get("$defs", {}), "Error": ERROR_SCHEMA, "TGIError": TGI_ERROR_SCHEMA}
    for name in ("CompletionBody", "ImageBody", "OpenAICompletionBody", "OpenAIImageBody", "StreamOptions",
                 "Txt2ImgBody", "TGIBody", "TGIParameters", "TokenizeBody", "TGITokenizeBody", "DetokenizeBody",
                 "ChatCompletionBody", "ChatMessage"):
        _null_means_default(schemas[name])
    if not chat:
        schemas = {k: v for k, v in schemas.items() if k not in ("ChatCompletionBody", "ChatMessage")}
    obj = {"application/json": {"schema": {"type": "object"}}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "condgen", "version": "1", "description": __doc__.strip().splitlines()[0]},
        "paths": {
            "/complete": _post("complete: text completion (JSON, or SSE with stream=true)", "CompletionBody",
                               {**obj, "text/event-stream": {"schema": {"type": "string"}}}),
            "/generate": _post("generate: images from a prompt (JSON with base64 PNGs, or one PNG); with `inputs`, "
                               "text-generation-inference's text generation", ("ImageBody", "TGIBody"),
                               {**obj, "image/png": {"schema": {"type": "string", "format": "binary"}}}, tgi="also"),
            "/generate_stream": _post("tgi generate stream: text-generation-inference's token stream (SSE)",
                                      "TGIBody", {"text/event-stream": {"schema": {"type": "string"}}}, tgi="only"),
            "/": _post("tgi compat: text-generation-inference's route (`stream` chooses; a list of one answer)",
                       "TGIBody", {"application/json": {"schema": {"type": "array"}},
                                   "text/event-stream": {"schema": {"type": "string"}}}, tgi="only"),
            "/info": _get("tgi info", ("401", "404", "503"), tgi="only"),
            "/tokenize": _post("tokenize: a prompt's token ids (vLLM's); with `inputs`, TGI's token spans",
                               ("TokenizeBody", "TGITokenizeBody"), obj, tgi="also"),
            "/detokenize": _post("detokenize: token ids back to text (vLLM's)", "DetokenizeBody", obj),
            "/v1/completions": _post("openai completions", "OpenAICompletionBody",
                                     {**obj, "text/event-stream": {"schema": {"type": "string"}}}),
            **({"/v1/chat/completions": _post("openai chat completions: the messages through the chat template "
                                              "(CONDGEN_CHAT_TEMPLATE)", "ChatCompletionBody",
                                              {**obj, "text/event-stream": {"schema": {"type": "string"}}})}
               if chat else {}),
            "/v1/images/generations": _post("openai images", "OpenAIImageBody", obj),
            "/models": _get("list models"),
            "/v1/models": _get("openai list models"),
            "/v1/models/{model}": _get("openai retrieve model", ("400", "401", "404", "503"), [MODEL_PARAMETER]),
            "/sdapi/v1/txt2img": _post("automatic1111 txt2img: images from a prompt (base64 PNGs, info)",
                                       "Txt2ImgBody", {"application/json": {"schema": TXT2IMG_RESPONSE}}),
            "/sdapi/v1/sd-models": _get("automatic1111 sd models", shape="array"),
            "/sdapi/v1/options": {**_get("automatic1111 options"), "post": {
                "summary": "automatic1111 set options: always 400 (choose the model per request, in "
                           "override_settings.sd_model_checkpoint)", "operationId": "automatic1111_set_options",
                "responses": {k: v for k, v in _errors().items() if k in ("400", "401")}}},
            "/sdapi/v1/scripts": _get("automatic1111 scripts"),
            "/sdapi/v1/progress": _get("automatic1111 progress: images queued or running (state.job_count)"),
        },
        "components": {"schemas": schemas},
    }
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
        doc["security"] = [{"bearer": []}, {"apiKey": []}]  # either
    return doc


async def openapi_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(build_openapi(keyed=api_key() is not None, chat=bool(template_path(os.environ))))


# Swagger UI's files as BentoML serves them (/static_content), pointed at this document.
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>condgen API</title>
  <link rel="stylesheet" href="/static_content/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/static_content/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


async def docs_endpoint(request: Request) -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)
