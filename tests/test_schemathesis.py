"""schemathesis against the service's own OpenAPI document (/openapi.json): a few hundred
generated requests, valid and invalid; no 5xx, and every 4xx carries the JSON error shape.
`python -m load_tests.fuzz --host URL --cases 2000` is the long run (not in CI)."""
from __future__ import annotations

import httpx

from load_tests.fuzz import check_response, fuzz, is_tgi_request


def test_openapi_document_is_served(client):
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/complete" in doc["paths"]


def test_fuzz_a_few_hundred_cases(server):
    out = fuzz(server.url, cases=360, seed=1234)  # spread over 17 operations (with /v1/chat/completions)
    assert out.cases >= 300, out
    assert not out.failures, "\n".join(out.failures[:20])
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_the_fuzzer_holds_each_request_to_its_own_error_shape():
    ours = b'{"error": {"message": "top_p: bad", "type": "invalid_request_error", "param": "top_p"}}'
    theirs = b'{"error": "parameters.top_p: bad", "error_type": "validation"}'
    json_type = "application/json"
    assert is_tgi_request("/generate_stream", {}) and is_tgi_request("/generate", {"inputs": "x"})
    assert not is_tgi_request("/generate", {"prompt": "x"}) and not is_tgi_request("/generate", ["inputs"])
    assert check_response(400, json_type, ours) is None and check_response(422, json_type, theirs, tgi=True) is None
    assert check_response(400, json_type, theirs) is not None  # TGI's shape on one of our requests
    assert check_response(400, json_type, ours, tgi=True) is not None  # ours on a TGI request
    assert check_response(401, json_type, ours, tgi=True) is None  # the API key is checked before the body is read
    assert check_response(500, json_type, ours) is not None and check_response(400, "text/plain", ours) is not None
