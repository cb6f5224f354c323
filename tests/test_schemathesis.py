"""schemathesis against the service's own OpenAPI document (/openapi.json): a few hundred
generated requests, valid and invalid; no 5xx, and every 4xx carries the JSON error shape.
`python -m load_tests.fuzz --host URL --cases 2000` is the long run (not in CI)."""
from __future__ import annotations

import httpx

from load_tests.fuzz import fuzz


def test_openapi_document_is_served(client):
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/complete" in doc["paths"]


def test_fuzz_a_few_hundred_cases(server):
    out = fuzz(server.url, cases=360, seed=1234)  # spread over 16 operations
    assert out.cases >= 300, out
    assert not out.failures, "\n".join(out.failures[:20])
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
