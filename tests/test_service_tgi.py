"""text-generation-inference's API (/generate with `inputs`, /generate_stream, POST /) on the
real server, through huggingface_hub's InferenceClient (unchanged) and raw HTTP: the same
tokens as /complete for the same seed, TGI's conventions (greedy by default, stop sequences
kept, finish reasons, per-token details), and a 400 naming what is not implemented."""
from __future__ import annotations

import json

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

pytestmark = pytest.mark.slow

PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def hf(server) -> InferenceClient:
    return InferenceClient(server.url, timeout=60)


def _complete(client, **body) -> dict:
    r = client.post("/complete", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_greedy_by_default_and_seeded_sampling_match_complete(hf, client):
    assert hf.text_generation(PROMPT, max_new_tokens=8) == _complete(client, max_tokens=8, temperature=0)["text"]
    sampled = hf.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=5)
    assert sampled == _complete(client, max_tokens=8, seed=5)["text"]
    # a sampling parameter turns sampling on, as in TGI
    assert hf.text_generation(PROMPT, max_new_tokens=8, temperature=0.7, seed=5) == \
        _complete(client, max_tokens=8, seed=5, temperature=0.7)["text"]


def test_details_tokens_add_up_to_the_text(hf, client):
    out = hf.text_generation(PROMPT, max_new_tokens=10, details=True, decoder_input_details=True, top_n_tokens=2,
                             do_sample=True, seed=3)
    d = out.details
    assert d.finish_reason == "length" and d.generated_tokens == 10 == len(d.tokens) and d.seed == 3
    assert "".join(t.text for t in d.tokens) == out.generated_text
    reference = _complete(client, max_tokens=10, seed=3, logprobs=2, echo=True)["logprobs"]
    prompt_len = len(d.prefill)
    assert d.prefill[0].logprob is None and [p.logprob for p in d.prefill[1:]] == \
        pytest.approx(reference["token_logprobs"][1:prompt_len])
    assert [t.logprob for t in d.tokens] == pytest.approx(reference["token_logprobs"][prompt_len:])
    # (the client leaves top_tokens, a list of lists, as dicts)
    assert all(len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"] for top in d.top_tokens)
    greedy = hf.text_generation(PROMPT, max_new_tokens=4, details=True, top_n_tokens=1)
    assert greedy.details.seed is None  # TGI reports no seed for greedy decoding
    assert [t.id for t in greedy.details.tokens] == [top[0]["id"] for top in greedy.details.top_tokens]


def test_a_stop_sequence_is_kept_and_ends_the_text(hf, client):
    sampled = dict(max_new_tokens=12, do_sample=True, seed=5)
    text = hf.text_generation(PROMPT, **sampled)
    cut = next(i for i in range(2, len(text) - 1) if text.find(text[i:i + 2]) == i)  # a first occurrence
    stop, kept = text[cut:cut + 2], text[:cut + 2]
    out = hf.text_generation(PROMPT, **sampled, stop=[stop], details=True)
    assert out.generated_text == kept and out.details.finish_reason == "stop_sequence"
    streamed = list(hf.text_generation(PROMPT, **sampled, stop=[stop], stream=True, details=True))
    assert "".join(ev.token.text for ev in streamed) == kept
    assert streamed[-1].details.finish_reason == "stop_sequence"


def test_stream_matches_the_plain_answer(hf):
    plain = hf.text_generation(PROMPT, max_new_tokens=9, details=True, do_sample=True, seed=8)
    events = list(hf.text_generation(PROMPT, max_new_tokens=9, stream=True, details=True, do_sample=True, seed=8))
    assert [ev.index for ev in events] == list(range(1, 10))
    assert [ev.token.id for ev in events] == [t.id for t in plain.details.tokens]
    assert all(ev.generated_text is None and ev.details is None for ev in events[:-1])
    assert events[-1].generated_text == plain.generated_text
    assert events[-1].details.generated_tokens == 9 and events[-1].details.seed == 8
    assert "".join(hf.text_generation(PROMPT, max_new_tokens=9, stream=True, do_sample=True, seed=8)) == \
        plain.generated_text


def test_routes_and_return_full_text(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "return_full_text": True}}
    plain = client.post("/generate", json=body).json()
    assert plain["generated_text"].startswith(PROMPT) and "details" not in plain
    assert client.post("/", json=body).json() == [plain]  # the compat route answers a list of one
    r = client.post("/", json={**body, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == plain["generated_text"]
    assert events[-1]["details"] is None  # as TGI: a stream's last event has details only when asked for
    # /generate with `prompt` is still the image route
    assert "images" in client.post("/generate", json={"prompt": "a red circle", "seed": 1}).json()


def test_truncate_keeps_the_end_of_the_input(hf, client):
    long_input = "the of and to in is for that with " * 20
    ids = hf.text_generation(long_input, max_new_tokens=2, truncate=5, details=True, decoder_input_details=True)
    assert len(ids.details.prefill) == 5
    r = client.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and r.json()["code"] == "context_length_exceeded", r.text
    assert r.json()["param"] == "inputs" and r.json()["error_type"] == "validation"
    limit = client.get("/info").json()["max_input_tokens"]
    assert hf.text_generation("short", max_new_tokens=1, truncate=limit) is not None
    for inputs in ("short", long_input):  # as TGI: refused up front, naming truncate, not inputs
        r = client.post("/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 1, "truncate": limit + 1}})
        assert r.status_code == 422 and r.json()["param"] == "parameters.truncate", r.text


def test_best_of_answers_the_candidate_with_the_best_mean_logprob(hf, client):
    """TGI's best_of: sampled candidates (candidate j seeded seed + j), the one with the highest
    mean token logprob answered (as TGI ranks them: a sum favoured short ones), the others in
    details.best_of_sequences (parsed by huggingface_hub)."""
    def score(tokens) -> float:
        return sum(t.logprob for t in tokens) / len(tokens)

    ranked = False  # some seed must make the ranking matter (the first candidate not the best)
    for seed in range(10, 16):  # a stop sequence makes the candidates' lengths differ
        out = hf.text_generation(PROMPT, max_new_tokens=12, best_of=3, do_sample=True, seed=seed, details=True,
                                 stop=[" "])
        others = out.details.best_of_sequences
        assert len(others) == 2 and sorted([out.details.seed] + [s.seed for s in others]) == [seed, seed + 1, seed + 2]
        assert all(score(out.details.tokens) >= score(s.tokens) for s in others)
        assert out.generated_text == "".join(t.text for t in out.details.tokens)
        ranked |= out.details.seed != seed
    assert ranked
    plain = client.post("/generate", json={"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True}})
    assert plain.status_code == 200 and set(plain.json()) == {"generated_text"}
    with pytest.raises(ValidationError, match="needs sampling"):  # greedy candidates would all be the same
        hf.text_generation(PROMPT, max_new_tokens=4, best_of=2)
    with pytest.raises(ValidationError, match="parameters.seed: at most 4294967294 with best_of 2"):
        hf.text_generation(PROMPT, max_new_tokens=4, best_of=2, do_sample=True, seed=2**32 - 1)


def test_langchain_defaults_and_typical_p(hf):
    """LangChain's HuggingFaceEndpoint sends typical_p 0.95, top_p 0.95, temperature 0.8 and
    do_sample false (sampling, in TGI's rules); typical_p is TGI's locally typical sampling."""
    defaults = dict(max_new_tokens=10, typical_p=0.95, top_p=0.95, temperature=0.8, do_sample=False,
                    repetition_penalty=None, watermark=False, stop=[], seed=4, details=True)
    a, b = hf.text_generation(PROMPT, **defaults), hf.text_generation(PROMPT, **defaults)
    assert a.generated_text == b.generated_text and a.details.seed == 4  # sampled, and seeded
    # a tiny mass keeps only the most typical token: the same whatever the seed
    narrow = {hf.text_generation(PROMPT, max_new_tokens=6, typical_p=0.001, seed=s) for s in range(4)}
    assert len(narrow) == 1


def test_info_describes_the_model(client):
    info = client.get("/info").json()
    text = next(m for m in client.get("/models").json()["data"] if m["kind"] == "text")
    assert info["model_id"] == text["id"] and info["max_total_tokens"] == text["context_length"]
    assert info["max_input_tokens"] == text["context_length"] - 1 and info["max_best_of"] == 16  # CONDGEN_TEXT_MAX_RUNNING is 32 here
    # what a client may send at once before a 429: CONDGEN_MAX_INFLIGHT (64), not the engine's 32 + 256 places
    assert info["max_concurrent_requests"] == 64


@pytest.mark.parametrize("parameters, param", [
    ({"typical_p": 0}, "typical_p"),
    ({"best_of": 2}, "best_of"),  # not streamed, as in TGI
    ({"best_of": 0}, "best_of"),
    ({"best_of": 17}, "best_of"),
    ({"watermark": True}, "watermark"),
    ({"grammar": {"type": "json", "value": {}}}, "grammar"),
    ({"adapter_id": "lora"}, "adapter_id"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1000}, "max_new_tokens"),  # beyond the model's context
    ({"temperature": 0}, "temperature"),  # TGI: strictly positive (greedy is do_sample false)
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 2**40}, "seed"),  # TGI's are 64-bit; here 32
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 5}, "max_tokens"),  # not TGI's name: refused, not ignored
    ({"details": True, "decoder_input_details": True}, "decoder_input_details"),  # TGI: not when streaming
])
def test_what_is_not_implemented_is_a_422_naming_it(client, parameters, param):
    """In TGI's error shape, as TGI answers a request it refuses."""
    r = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 422, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error_type"] == "validation", body
    assert body["param"] == f"parameters.{param}", body
    if param == "max_new_tokens" and parameters["max_new_tokens"] > 1:  # TGI's words: input + new within the context
        assert body["code"] == "context_length_exceeded" and "at most the model's context" in body["error"]


def test_bad_bodies(client, hf):
    for body in ({"inputs": ""}, {"inputs": 5}, {"inputs": PROMPT, "stream": "yes"}):
        r = client.post("/", json=body)
        assert r.status_code == 422 and r.json()["param"] in ("inputs", "stream"), r.text
    r = client.post("/generate_stream", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "not valid JSON" in r.json()["error"]
    for method, path in (("GET", "/generate_stream"), ("PUT", "/"), ("POST", "/info")):  # TGI's routes
        r = client.request(method, path)
        assert r.status_code == 405 and r.json()["error_type"] == "validation", r.text
    for route in ("/generate", "/tokenize"):  # refused while the body is read, once it is known to be TGI's
        r = client.post(route, content=b'{"inputs": "a\\ud800b"}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["param"] == "inputs" and "surrogate" in r.json()["error"], r.text
    # huggingface_hub raises its typed errors from TGI's shape (it raised BadRequestError from ours)
    with pytest.raises(ValidationError, match="parameters.watermark"):
        hf.text_generation(PROMPT, watermark=True)
    with pytest.raises(ValidationError, match="parameters.top_p"):
        list(hf.text_generation(PROMPT, top_p=1.5, stream=True))
    assert httpx.get(f"{hf.model}/readyz").status_code == 200
