"""Hand-written hostile requests against the real server: every one is answered with a 4xx
and the JSON error shape (never a 5xx, never a hang), and the server stays ready after."""
from __future__ import annotations

import json

import httpx
import pytest

ROUTES = ["/complete", "/generate", "/v1/completions", "/v1/images/generations"]
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
    assert err["param"] in ("prompt", None)
    over = {**_valid(route), "prompt": "x" * MB}  # just outside it
    _assert_json_4xx(client.post(route, json=over), 413)


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
], ids=lambda b: repr(b[:24]))
def test_malformed_bodies(client, route, raw):
    _assert_json_4xx(_post_raw(client, route, raw), 400)


BAD_NUMBERS = [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("temperature", "1e999"),
    ("top_p", "NaN"), ("truncation", "NaN"), ("truncation", "Infinity"),
    ("n", "-1"), ("n", "0"), ("n", "1000000000000000000000000000000"), ("n", "1.5"), ("n", '"four"'),
    ("max_tokens", "-5"), ("max_tokens", "0"), ("max_tokens", "9223372036854775808"), ("max_tokens", "1e30"),
    ("seed", "-1"), ("seed", "18446744073709551616"), ("seed", '"seven"'),
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
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/xml"])
def test_wrong_content_type(client, route, ctype):
    _assert_json_4xx(_post_raw(client, route, json.dumps(_valid(route)).encode(), ctype), 415)


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


@pytest.mark.parametrize("route", ["/complete", "/v1/completions"])
def test_too_many_or_too_long_stop_strings(client, route):
    _assert_json_4xx(client.post(route, json={**_valid(route), "stop": ["x"] * 1000}), 400)
    _assert_json_4xx(client.post(route, json={**_valid(route), "stop": "s" * 10_000}), 400)


def test_wrong_methods_and_paths_do_not_5xx(client):
    for method, path in [("GET", "/complete"), ("PUT", "/generate"), ("DELETE", "/models"),
                         ("POST", "/nope"), ("GET", "/../../etc/passwd")]:
        r = client.request(method, path)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)


def test_server_is_still_ready_after_the_abuse(client):
    assert client.get("/readyz").status_code == 200
    r = client.post("/complete", json={"prompt": "Hello", "max_tokens": 3, "seed": 5})
    assert r.status_code == 200 and r.json()["seed"] == 5
