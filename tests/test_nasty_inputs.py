"""Hand-written hostile requests against the real server: every one is answered with a 4xx
and the JSON error shape (never a 5xx, never a hang), and the server stays ready after."""
from __future__ import annotations

import gzip
import json
import socket
import time

import httpx
import pytest

from tests_support import metric_value

ROUTES = ["/complete", "/generate", "/v1/completions", "/v1/images/generations", "/sdapi/v1/txt2img"]
MB = 1 << 20


def _valid(route: str) -> dict:
    body: dict = {"prompt": "a red circle"}
    if route == "/v1/completions":
        body["model"] = "gpt"
    return body


def _assert_json_4xx(r: httpx.Response, *statuses: int) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


def _post_raw(client: httpx.Client, route: str, content: bytes,
              ctype: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return client.post(route, content=content, headers=headers)


@pytest.mark.parametrize("route", ROUTES)
def test_one_megabyte_prompt(client, route):
    body = {**_valid(route), "prompt": "x" * (MB - 200)}  # just inside the body limit
    err = _assert_json_4xx(client.post(route, json=body))
    # Refused by its length in characters, before the tokenizer spends the event loop's time on it.
    assert err["param"] == "prompt" and "characters" in err["message"], err
    over = {**_valid(route), "prompt": "x" * MB}  # just outside it
    assert _assert_json_4xx(client.post(route, json=over), 413)["code"] == "request_too_large"


@pytest.mark.parametrize("route", ["/complete", "/generate"])
def test_ten_megabyte_body_with_and_without_a_length(client, route):
    junk = b'{"prompt": "' + b"y" * (10 * MB) + b'"}'
    _assert_json_4xx(_post_raw(client, route, junk), 413)

    def chunks():  # chunked transfer: no content-length to refuse up front
        for i in range(0, len(junk), 64 * 1024):
            yield junk[i:i + 64 * 1024]

    _assert_json_4xx(client.post(route, content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("raw", [
    b'{"prompt": "\xff\xfe\xfa"}',  # invalid UTF-8
    b"\xc3\x28",
    b"",  # empty body
    b"   ",
    b"null",
    b"[]",
    b'"just a string"',
    b"42",
    b"{",
    b'{"prompt": "a",}',
    b"[" * 100_000,  # nested past the parser's recursion limit
    b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"prompt": {"nested": {"junk": [1, {"a": null}]}}}',
    b'{"seed": ' + b"9" * 5000 + b', "prompt": "a"}',  # past Python's 4300 digits for str -> int
], ids=lambda b: repr(b[:24]))
def test_malformed_bodies(client, route, raw):
    _assert_json_4xx(_post_raw(client, route, raw), 400)


BAD_NUMBERS = [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("temperature", "1e999"),
    ("top_p", "NaN"), ("truncation", "NaN"), ("truncation", "Infinity"),
    ("n", "-1"), ("n", "0"), ("n", "1000000000000000000000000000000"), ("n", "1.5"), ("n", '"four"'),
    ("max_tokens", "-5"), ("max_tokens", "0"), ("max_tokens", "9223372036854775808"), ("max_tokens", "1e30"),
    ("seed", "-2"), ("seed", "18446744073709551616"), ("seed", '"seven"'), ("seed", "4294967296"),
    ("top_k", "9223372036854775808"), ("top_k", "-2"),  # 2**63 once failed a whole decode step (500)
    # strict types, as OpenAI's: no string, boolean or float passes for an integer
    ("max_tokens", "true"), ("max_tokens", '"4"'), ("n", '"2"'), ("n", "2.0"), ("seed", '"1"'), ("seed", "true"),
    ("temperature", "true"), ("temperature", '"0.5"'),
]
TEXT_ONLY, IMAGE_ONLY = {"temperature", "top_p", "max_tokens"}, {"truncation"}


@pytest.mark.parametrize("route,field,value", [
    (route, field, value) for route in ROUTES for field, value in BAD_NUMBERS
    if not (field in TEXT_ONLY and "complet" not in route) and not (field in IMAGE_ONLY and "complet" in route)])
def test_bad_numbers(client, route, field, value):
    raw = json.dumps(_valid(route))[:-1] + f', "{field}": {value}}}'
    err = _assert_json_4xx(_post_raw(client, route, raw.encode()), 400)
    assert err["param"] == field


@pytest.mark.parametrize("route", ROUTES)
def test_seed_plus_n_must_stay_32_bit(client, route):
    """Choice / image i uses seed + i, and seeds are 32-bit: the last one must fit, or the
    answer would report a seed that cannot be sent back (and that draws seed 0's numbers)."""
    count = "batch_size" if route.startswith("/sdapi") else "n"  # AUTOMATIC1111's name for it
    body = {**_valid(route), "seed": 2**32 - 2, count: 3}
    err = _assert_json_4xx(client.post(route, json=body), 400)
    assert err["param"] == "seed" and str(2**32 - 3) in err["message"]


@pytest.mark.parametrize("route", ["/complete", "/v1/completions"])
@pytest.mark.parametrize("field,value", [("stream", "yes"), ("stream", 1), ("echo", 1), ("echo", "true"),
                                         ("logprobs", True), ("stop", 5)])
def test_wrong_types_are_refused_not_converted(client, route, field, value):
    err = _assert_json_4xx(client.post(route, json={**_valid(route), field: value}), 400)
    assert err["param"] == field


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/xml"])
def test_wrong_content_type(client, route, ctype):
    _assert_json_4xx(_post_raw(client, route, json.dumps(_valid(route)).encode(), ctype), 415)


@pytest.mark.parametrize("route", ROUTES)
def test_a_compressed_body_is_refused_naming_the_encoding(client, route):
    """It was read as bytes that are not JSON: a 400 that sent its sender looking at the JSON."""
    r = client.post(route, content=gzip.compress(json.dumps(_valid(route)).encode()),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    err = _assert_json_4xx(r, 415)
    assert "content-encoding 'gzip'" in err["message"]
    plain = client.post(route, json=_valid(route), headers={"content-encoding": "identity"})
    assert plain.status_code == 200, plain.text


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_fields_are_named(client, route):
    err = _assert_json_4xx(client.post(route, json={**_valid(route), "max_token": 5, "__proto__": {}}), 400)
    assert "max_token" in err["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("prompt", ["\ud800 lone surrogate", "nul \x00 byte", "\u202e\u200b\ufeff", "🙂" * 100])
def test_odd_but_valid_strings_never_crash(client, route, prompt):
    body = {**_valid(route), "prompt": prompt, "seed": 1}
    if "complete" in route:
        body["max_tokens"] = 4
    raw = json.dumps(body).encode()  # keeps the lone surrogate as a \ud800 escape
    r = _post_raw(client, route, raw)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        _assert_json_4xx(r)
    if "\ud800" in prompt:  # not Unicode: refused, naming the field
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_of_very_many_fields_is_refused_by_their_count(client, route):
    """Counted before any field is checked: 95,000 unknown fields, each refused by name, held
    the event loop 0.2 s."""
    body = {**_valid(route), **{f"k{i}": 0 for i in range(5000)}}
    err = _assert_json_4xx(client.post(route, json=body), 400)
    assert f"the body has {len(body)} fields" in err["message"]


@pytest.mark.parametrize("route", ["/complete", "/v1/completions"])
def test_a_long_logit_bias_is_refused_by_its_length(client, route):
    bias = {str(i): 1.0 for i in range(20_000)}
    err = _assert_json_4xx(client.post(route, json={**_valid(route), "logit_bias": bias}), 400)
    assert err["param"] == "logit_bias" and "at most 300 tokens, got 20000" in err["message"]


def test_errors_send_back_no_more_than_a_short_piece_of_a_huge_value(client):
    huge = "a" * 500_000
    for route, body in [("/sdapi/v1/options", {"sd_model_checkpoint": huge}), ("/sdapi/v1/options", {huge: 1}),
                        ("/sdapi/v1/options", {"sd_model_checkpoint": [0] * 100_000})]:
        r = client.post(route, json=body)
        assert r.status_code == 400 and len(r.content) < 2000, (route, len(r.content))
    r = _post_raw(client, "/detokenize", b'{"tokens": [' + b"9" * 4000 + b"]}")
    assert r.status_code == 400 and len(r.content) < 2000, r.text[:300]


@pytest.mark.parametrize("route,field", [("/tokenize", "prompt"), ("/tokenize", "inputs"), ("/generate", "inputs"),
                                         ("/complete", "prompt")])
def test_a_lone_surrogate_written_as_bytes_or_in_utf_16_is_refused(client, route, field):
    """JSON's own decoding let a surrogate written as UTF-8 bytes through, and a UTF-16 body
    hid its escape from a byte search: the tokenizer raised a TypeError (a 500)."""
    as_bytes = _post_raw(client, route, b'{"%s": "a\xed\xa0\x80"}' % field.encode())
    assert 400 <= as_bytes.status_code < 500, as_bytes.text[:300]
    utf16 = _post_raw(client, route, json.dumps({field: "a\ud800"}).encode("utf-16"))
    assert 400 <= utf16.status_code < 500 and "surrogate" in utf16.text, utf16.text[:300]
    fine = _post_raw(client, route, json.dumps({field: "a \U0001f642"}).encode("utf-16"))
    assert fine.status_code == 200, fine.text[:300]  # UTF-16 JSON is still JSON, a surrogate pair text


@pytest.mark.parametrize("route", ["/complete", "/v1/completions"])
def test_too_many_or_too_long_stop_strings(client, route):
    _assert_json_4xx(client.post(route, json={**_valid(route), "stop": ["x"] * 1000}), 400)
    _assert_json_4xx(client.post(route, json={**_valid(route), "stop": "s" * 10_000}), 400)


def test_wrong_methods_and_paths_get_the_json_error_shape(client):
    for method, path, status in [("GET", "/complete", 405), ("PUT", "/generate", 405), ("DELETE", "/models", 405),
                                 ("POST", "/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("GET", "/v1/models/nope", 404), ("GET", "/../../etc/passwd", 404)]:
        err = _assert_json_4xx(client.request(method, path), status)
        assert path.split("/")[-1] in err["message"], (method, path, err)


def test_a_client_gone_while_its_body_is_read_is_no_server_error(client, server):
    """Headers and half a body, then the socket closes: a 499 in the log, not a 500 with a traceback."""
    before = metric_value(client.get("/metrics").text, "condgen_request_errors_total", 'status="500"')
    for route in ("/complete", "/generate"):
        with socket.create_connection((client.base_url.host, client.base_url.port)) as s:
            s.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 50\r\n\r\n{{\"prompt\": \"a\"".encode())
    for _ in range(100):  # until both have been handled
        if server.log_tail(50_000).count("left before its body was read") >= 2:
            break
        time.sleep(0.1)
    assert client.post("/complete", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200  # served after
    assert metric_value(client.get("/metrics").text, "condgen_request_errors_total", 'status="500"') == before
    assert "ClientDisconnect" not in server.log_tail(20_000)


def test_server_is_still_ready_after_the_abuse(client):
    assert client.get("/readyz").status_code == 200
    r = client.post("/complete", json={"prompt": "Hello", "max_tokens": 3, "seed": 5})
    assert r.status_code == 200 and r.json()["seed"] == 5
