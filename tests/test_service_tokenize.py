"""POST /tokenize and /detokenize on the real server: vLLM's bodies (and TGI's /tokenize), the
same ids the completion routes count and take."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TEXT = "Héllo wörld 🙂, the quick brown fox"


def test_tokenize_counts_what_completions_count(client):
    r = client.post("/tokenize", json={"model": "gpt", "prompt": TEXT, "return_token_strs": True}).json()
    models = {m["name"]: m for m in client.get("/models").json()["data"]}
    assert r["max_model_len"] == models["gpt"]["context_length"] and r["count"] == len(r["tokens"])
    done = client.post("/v1/completions", json={"model": "gpt", "prompt": TEXT, "max_tokens": 3, "seed": 2}).json()
    assert done["usage"]["prompt_tokens"] == r["count"]
    # the ids are the prompt: as a token array, the same completion
    again = client.post("/v1/completions", json={"model": "gpt", "prompt": r["tokens"], "max_tokens": 3,
                                                  "seed": 2}).json()
    assert again["choices"][0]["text"] == done["choices"][0]["text"]
    assert len(r["token_strs"]) == r["count"] and any(s.startswith("bytes:") for s in r["token_strs"])
    assert client.post("/detokenize", json={"model": "gpt", "tokens": r["tokens"]}).json() == {"prompt": TEXT}


def test_an_empty_prompt_is_end_of_text(client):
    r = client.post("/tokenize", json={"prompt": ""}).json()
    usage = client.post("/complete", json={"prompt": "", "max_tokens": 1}).json()["usage"]
    assert r["count"] == 1 == usage["prompt_tokens"]


def test_tgi_tokenize_gives_each_token_its_span(client):
    spans = client.post("/tokenize", json={"inputs": TEXT}).json()
    ids = client.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
    assert [s["id"] for s in spans] == ids
    assert all(s["text"] == TEXT[s["start"]:s["stop"]] for s in spans)
    assert spans[0]["start"] == 0 and spans[-1]["stop"] == len(TEXT)


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "x", "model": "gan"}, "model"),
    ("/tokenize", {"prompt": "x" * 100_001}, "prompt"),
    ("/tokenize", {"inputs": ""}, "inputs"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "max_tokens": 3}, "max_tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_requests_name_the_field(client, route, body, param):
    r = client.post(route, json=body)
    if "inputs" in body:  # TGI's request: its error shape, a 422
        assert r.status_code == 422 and r.json()["param"] == param and r.json()["error_type"] == "validation", r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("route, body", [("/tokenize", {"prompt": "x" * 100_001}),
                                         ("/tokenize", {"inputs": "x" * 100_001}),
                                         ("/generate", {"inputs": "x" * 100_001})])
def test_a_text_too_long_says_so_in_the_code_the_completion_routes_use(client, route, body):
    r = client.post(route, json=body)
    code = r.json()["code"] if "inputs" in body else r.json()["error"]["code"]  # TGI's requests: TGI's shape
    assert r.status_code == (422 if "inputs" in body else 400) and code == "prompt_too_long", r.text
