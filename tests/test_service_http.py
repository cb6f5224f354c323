"""The real server over raw HTTP: every route, streaming, PNGs, seeds, errors, metrics.

One `bentoml serve` subprocess (tests/conftest.py) serves the whole module; the tests run
one after another, so metric deltas measured around a test are exactly that test's traffic.
"""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.encode import png_parameters

pytestmark = pytest.mark.slow


# ---- helpers ----------------------------------------------------------------------------

def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a text/event-stream response, checking the framing as we go."""
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads, buffer = [], ""
    for piece in response.iter_text():
        buffer += piece
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            assert event.startswith("data: "), event
            payloads.append(event[len("data: "):])
    assert buffer == ""
    return payloads


def stream(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        payloads = sse_events(r)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]] + ["[DONE]"]


def joined_text(chunks: list[dict | str], n: int) -> list[str]:
    texts = [""] * n
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    return texts


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def models(client: httpx.Client) -> dict[str, dict]:
    r = client.get("/models")
    assert r.status_code == 200
    return {m["name"]: m for m in r.json()["data"]}


# ---- health and models ------------------------------------------------------------------

def test_ready_and_live(client):
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    assert client.get("/health").status_code == 200  # vLLM's and TGI's probe path


def test_the_root_page_documents_this_api_without_outside_calls(client):
    """BentoML's index page listed only its health routes and loaded Google Tag Manager."""
    for path in ("/", "/docs"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in page.text and "googletagmanager" not in page.text
        assert "https://" not in page.text and "http://" not in page.text
        for asset in ("/static_content/swagger-ui-bundle.js", "/static_content/swagger-ui.css"):
            assert asset in page.text and client.get(asset).status_code == 200
    assert "/v1/models/{model}" in client.get("/openapi.json").json()["paths"]


def test_models_describe_every_store_entry(models):
    assert set(models) == {"gpt", "gan", "ar_image"}
    for name, kind in (("gpt", "text"), ("gan", "image"), ("ar_image", "image")):
        m = models[name]
        assert m["family"] == name and m["kind"] == kind
        assert m["id"].startswith(f"{name}:") and len(m["id"]) > len(name) + 1
        assert isinstance(m["dataset"], str) and m["dataset"]
        assert isinstance(m["created"], int) and m["created_at"].endswith("Z")
        assert isinstance(m["metrics"], dict) and m["metrics"]
    for name in ("gan", "ar_image"):  # the prompt limits, as the text model states its own
        m = models[name]
        assert m["image_size"] > 0 and m["max_prompt_chars"] >= m["context_length"] > 0
    assert models["ar_image"]["evaluations_per_image"] > 0
    assert models["gpt"]["batch_invariant"] is False  # CONDGEN_BATCH_INVARIANT unset


# ---- /complete --------------------------------------------------------------------------

def test_complete_shape_and_usage(client, models):
    r = client.post("/complete", json={"prompt": "The", "max_tokens": 5, "n": 2, "seed": 11})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == models["gpt"]["id"] and body["seed"] == 11
    assert body["id"] and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert isinstance(c["text"], str)
        assert c["finish_reason"] in ("stop", "length", "eos")
        assert c["logprobs"] is None
    u = body["usage"]
    assert u["prompt_tokens"] >= 1 and 1 <= u["completion_tokens"] <= 10
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert r.headers["x-request-id"]


def test_complete_seed_reproduces_and_is_reported_when_picked(client):
    req = {"prompt": "Once upon", "max_tokens": 8, "temperature": 1.0, "n": 2}
    first = client.post("/complete", json=req).json()
    assert isinstance(first["seed"], int)  # the server picked one and says which
    again = client.post("/complete", json={**req, "seed": first["seed"]}).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in first["choices"]]
    # Choice i uses seed + i: choice 1 of seed s is choice 0 of seed s + 1.
    shifted = client.post("/complete", json={**req, "n": 1, "seed": first["seed"] + 1}).json()
    assert shifted["choices"][0]["text"] == first["choices"][1]["text"]


def test_the_gan_takes_ar_only_fields_at_their_off_values_as_it_takes_an_empty_negative_prompt(client):
    """negative_prompt "" was taken and top_k 0 (the documented default, off) refused."""
    plain = client.post("/generate", json={"prompt": "a red circle", "seed": 4, "model": "gan"})
    for extra in ({"top_k": 0}, {"top_k": -1}, {"negative_prompt": ""}):
        r = client.post("/generate", json={"prompt": "a red circle", "seed": 4, "model": "gan", **extra})
        assert r.status_code == 200 and r.json()["images"] == plain.json()["images"], (extra, r.text)


def test_minus_one_picks_a_seed_and_turns_top_k_off(client):
    for path, body in (("/complete", {"prompt": "Hi", "max_tokens": 2, "top_k": -1}), ("/generate", {"prompt": "a"})):
        r = client.post(path, json={**body, "seed": -1})
        assert r.status_code == 200 and 0 <= r.json()["seed"] < 2**32, r.text


def test_complete_greedy_is_deterministic(client):
    req = {"prompt": "import", "max_tokens": 6, "temperature": 0}
    a, b = (client.post("/complete", json={**req, "seed": s}).json() for s in (1, 2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_complete_echo_logprobs_and_length(client):
    r = client.post("/complete", json={"prompt": "def f", "max_tokens": 4, "echo": True, "logprobs": 2,
                                       "seed": 3, "temperature": 0.8})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("def f")
    lp, usage = choice["logprobs"], r.json()["usage"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    p = usage["prompt_tokens"]  # the prompt's tokens first (echo scores them), then the generated ones
    assert len(lp["tokens"]) == p + usage["completion_tokens"] and 1 <= usage["completion_tokens"] <= 4
    assert "".join(lp["tokens"][:p]) == "def f" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    # the two alternatives, and the token itself when it is not one of them (OpenAI's layout)
    assert all(2 <= len(top) <= 3 and top[tok] == v
               for top, tok, v in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][p] == len("def f")


def test_complete_stop_string_ends_the_text(client):
    # A seeded sample, then the same request with a stop string taken from its text: the
    # draws are the same up to the stop, so the answer is exactly the text before it.
    req = {"prompt": "The", "max_tokens": 16, "seed": 5}
    text = client.post("/complete", json=req).json()["choices"][0]["text"]
    k = next((k for k in range(1, len(text)) if text[k] not in text[:k]), None)
    if k is None:
        pytest.skip(f"sample {text!r} has no character that first appears after its start")
    r = client.post("/complete", json={**req, "stop": ["@@@", text[k]]}).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["text"] == text[:k]


def test_complete_stream_matches_the_plain_answer(client):
    req = {"prompt": "In the", "max_tokens": 10, "n": 2, "seed": 21}
    plain = client.post("/complete", json=req).json()
    chunks = stream(client, "/complete", {**req, "stream": True})
    data = chunks[:-1]
    assert all(c["id"] == data[0]["id"] and c["seed"] == 21 for c in data)
    assert joined_text(chunks, 2) == [c["text"] for c in plain["choices"]]
    finishes = {ch["index"]: ch["finish_reason"] for c in data for ch in c["choices"] if ch["finish_reason"]}
    assert finishes == {c["index"]: c["finish_reason"] for c in plain["choices"]}
    assert data[-1]["choices"] == [] and data[-1]["usage"] == plain["usage"]


def test_complete_stream_with_echo_starts_with_the_prompt(client):
    chunks = stream(client, "/complete", {"prompt": "x = ", "max_tokens": 3, "echo": True, "stream": True})
    assert chunks[0]["choices"][0]["text"] == "x = "
    assert joined_text(chunks, 1)[0].startswith("x = ")


def test_stream_client_disconnect_leaves_the_server_healthy(client, server):
    with client.stream("POST", "/complete", json={"prompt": "a", "max_tokens": 60, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())  # read one chunk, then hang up
    r = client.post("/complete", json={"prompt": "a", "max_tokens": 2})
    assert r.status_code == 200


# ---- /generate --------------------------------------------------------------------------

def test_generate_b64_images_decode_with_the_right_size_and_count(client, models):
    size = models["gan"]["image_size"]
    r = client.post("/generate", json={"prompt": "a red circle", "n": 3, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 5 and body["model"] == models["gan"]["id"]
    assert [im["seed"] for im in body["images"]] == [5, 6, 7]
    for im in body["images"]:
        png = base64.b64decode(im["b64_json"])
        assert decode_png(png).shape == (size, size, 3)
        assert png_parameters(png) == {"prompt": "a red circle", "seed": im["seed"],
                                       "model": body["model"], "truncation": 1.0}


def test_generate_png_bytes_carry_parameters_and_reproduce(client, models):
    req = {"prompt": "blue square", "seed": 42, "truncation": 0.7, "response_format": "png"}
    r = client.post("/generate", json=req)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "42"
    params = png_parameters(r.content)
    assert params == {"prompt": "blue square", "seed": 42, "model": models["gan"]["id"], "truncation": 0.7}
    # Re-running the stored parameters gives the same pixels.
    again = client.post("/generate", json={"prompt": params["prompt"], "seed": params["seed"],
                                           "truncation": params["truncation"], "response_format": "png"})
    assert np.array_equal(decode_png(again.content), decode_png(r.content))


def test_generate_seed_is_picked_and_reported(client):
    body = client.post("/generate", json={"prompt": "anything"}).json()
    assert isinstance(body["seed"], int) and body["images"][0]["seed"] == body["seed"]


def test_concurrent_image_requests_share_batches_without_changing_results(client):
    """Requests with different n sent together: each answer equals the one it gets alone."""
    reqs = [{"prompt": f"shape {i}", "n": n, "seed": 100 + 10 * i} for i, n in enumerate([1, 3, 2, 1, 4, 2])]
    alone = [client.post("/generate", json=q).json() for q in reqs]
    before = scrape(client)
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda q: client.post("/generate", json=q).json(), reqs))
    after = scrape(client)
    for a, b in zip(alone, together):
        assert "images" in b, b
        assert [im["seed"] for im in a["images"]] == [im["seed"] for im in b["images"]]
        for x, y in zip(a["images"], b["images"]):
            x, y = (decode_png(base64.b64decode(im["b64_json"])).astype(int) for im in (x, y))
            # Same latents and prompt; a different batch shape may only flip a rounding here and there.
            diff = np.abs(x - y)
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    # Every request went through exactly one batch, every image through one forward pass.
    d = lambda name: metric(after, name, endpoint="images") - metric(before, name, endpoint="images")
    assert d("condgen_batch_size_sum") == len(reqs)
    assert d("condgen_batch_items_sum") == sum(q["n"] for q in reqs)
    assert 1 <= d("condgen_batch_size_count") <= len(reqs)


def test_generate_with_the_autoregressive_model(client, models):
    """`model` picks the AR model; its sampler fields reach it, land in the PNG and reproduce."""
    ar = models["ar_image"]
    req = {"model": "ar_image", "prompt": "a red circle", "n": 2, "seed": 3, "guidance_scale": 2.0,
           "temperature": 0.8, "top_k": 8}
    body = client.post("/generate", json=req).json()
    assert body["model"] == ar["id"] and [im["seed"] for im in body["images"]] == [3, 4]
    pngs = [base64.b64decode(im["b64_json"]) for im in body["images"]]
    assert decode_png(pngs[0]).shape == (ar["image_size"], ar["image_size"], 3)
    assert png_parameters(pngs[1]) == {"prompt": "a red circle", "seed": 4, "model": ar["id"], "truncation": 1.0,
                                       "guidance_scale": 2.0, "temperature": 0.8, "top_k": 8}
    again = client.post("/generate", json={**req, "model": ar["id"]}).json()  # the full tag works too
    assert [im["b64_json"] for im in again["images"]] == [im["b64_json"] for im in body["images"]]
    # Greedy (temperature 0) makes the seed irrelevant: a check that the field reaches the sampler.
    greedy = [client.post("/generate", json={"model": "ar_image", "prompt": "a blue square", "seed": s,
                                             "temperature": 0, "response_format": "png"}).content for s in (1, 2)]
    assert np.array_equal(decode_png(greedy[0]), decode_png(greedy[1]))


# ---- errors -----------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/complete", {"max_tokens": 3}, 400, "prompt"),
    ("/complete", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/complete", {"prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("/complete", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/complete", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/complete", {"prompt": "a", "n": 17}, 400, "n"),
    ("/complete", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/complete", {"prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ("/complete", {"prompt": "a", "seed": "x"}, 400, "seed"),
    ("/complete", {"prompt": "a", "bogus": 1}, 400, "bogus"),
    ("/complete", {"prompt": "a" * 100_001}, 400, "prompt"),  # too long in characters
    ("/complete", {"prompt": "hello world " * 2000, "max_tokens": 1}, 400, "prompt"),  # ... in tokens
    ("/complete", {"prompt": "a", "model": "no-such-model"}, 404, "model"),
    ("/complete", {"prompt": "a", "model": "gan"}, 400, "model"),
    ("/generate", {"prompt": "a", "n": 0}, 400, "n"),
    ("/generate", {"prompt": "a", "n": 17}, 400, "n"),
    ("/generate", {"prompt": "a", "n": 2, "response_format": "png"}, 400, "response_format"),
    ("/generate", {"prompt": "a", "response_format": "jpeg"}, 400, "response_format"),
    ("/generate", {"prompt": "a", "truncation": -1}, 400, "truncation"),
    ("/generate", {"prompt": "a", "model": "gpt"}, 400, "model"),
    ("/generate", {"prompt": "a", "model": "no-such-model"}, 404, "model"),
    ("/generate", {"prompt": "a", "guidance_scale": 2}, 400, "guidance_scale"),  # the GAN has no sampler
    ("/generate", {"prompt": "a", "model": "gan", "top_k": 3}, 400, "top_k"),
    ("/generate", {"prompt": "a", "negative_prompt": "b"}, 400, "negative_prompt"),  # nor guidance
    ("/generate", {"prompt": "a", "model": "ar_image", "negative_prompt": "a " * 40}, 400, "negative_prompt"),
    ("/generate", {"prompt": "a", "model": "ar_image", "guidance_scale": -1}, 400, "guidance_scale"),
    ("/generate", {"prompt": "a", "model": "ar_image", "guidance_scale": 21}, 400, "guidance_scale"),
    ("/generate", {"prompt": "a", "model": "ar_image", "temperature": -0.1}, 400, "temperature"),
    ("/generate", {"prompt": "a", "model": "ar_image", "truncation": 0}, 400, "truncation"),
    ("/generate", {"prompt": "  "}, 400, "prompt"),
    ("/generate", {"prompt": "many words " * 500}, 400, "prompt"),  # too long in tokens
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "gpt", "prompt": "a", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/complete", {"prompt": "a", "presence_penalty": -3}, 400, "presence_penalty"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "a", "size": "1024x1024"}, 400, "size"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_client_mistakes_are_4xx_json_naming_the_field(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_bodies_that_are_not_a_json_object_are_400(client, content):
    r = client.post("/complete", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_stream_request_errors_before_streaming_are_plain_4xx(client):
    r = client.post("/complete", json={"prompt": "a", "stream": True, "top_k": -3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


# ---- metrics ----------------------------------------------------------------------------

def test_each_served_models_counters_exist_from_the_start_and_buckets_span_the_timeout(client, models):
    """A counter first seen at 1 is no increase to increase() or rate(): the first engine
    death (or the first tokens) of a model fired no alert. The queue and batch series are each
    model's too: the GAN's and the AR model's batches, far apart in length, were summed."""
    series = {(name, dict(labels).get("model")) for name, labels in scrape(client)}
    for name, m in models.items():
        counters = ["condgen_generated_tokens_total", "condgen_prompt_tokens_total"] if m["kind"] == "text" \
            else ["condgen_images_total", "condgen_batch_items_count"]
        for counter in ["condgen_engine_deaths_total", "condgen_requests_running", "condgen_requests_waiting",
                        "condgen_queue_time_seconds_count", "condgen_batch_size_count", *counters]:
            assert (counter, name) in series, (counter, name)
    # latency buckets from a GPU's token gaps to CONDGEN_TIMEOUT (they stopped at 1 ms and 60 s)
    bounds = {dict(labels)["le"] for name, labels in scrape(client)
              if name == "condgen_inter_token_latency_seconds_bucket"}
    assert {"0.0001", "300.0"} <= bounds


def test_metrics_move_by_exactly_what_the_requests_produced(client):
    before = scrape(client)
    plain = client.post("/complete", json={"prompt": "a", "max_tokens": 7, "n": 3, "seed": 1}).json()
    chunks = stream(client, "/complete", {"prompt": "b", "max_tokens": 5, "n": 2, "seed": 2, "stream": True})
    images = client.post("/generate", json={"prompt": "c", "n": 3, "seed": 3}).json()
    png = client.post("/generate", json={"prompt": "d", "response_format": "png"})
    bad = client.post("/complete", json={"prompt": "a", "n": 99})
    after = scrape(client)
    assert png.status_code == 200 and bad.status_code == 400

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    tokens = plain["usage"]["completion_tokens"] + chunks[-2]["usage"]["completion_tokens"]
    assert delta("condgen_generated_tokens_total") == tokens
    assert delta("condgen_prompt_tokens_total") == plain["usage"]["prompt_tokens"] + chunks[-2]["usage"]["prompt_tokens"]
    assert delta("condgen_images_total") == len(images["images"]) + 1
    # One TTFT per choice that produced a token; one inter-token gap for every further token.
    assert delta("condgen_time_to_first_token_seconds_count") == 5
    assert delta("condgen_inter_token_latency_seconds_count") == tokens - 5
    assert delta("condgen_queue_time_seconds_count", endpoint="completions") == 2
    assert delta("condgen_queue_time_seconds_count", endpoint="images") == 2
    # Continuous batching: one observation per decode step, of the sequences it sampled.
    assert delta("condgen_batch_size_sum", endpoint="completions") == tokens
    assert delta("condgen_batch_items_sum", endpoint="images") == 4
    assert delta("condgen_request_errors_total", endpoint="/complete", status="400") == 1
    assert metric(after, "condgen_requests_running") == 0 and metric(after, "condgen_requests_waiting") == 0
    # BentoML's own counters see the same traffic.
    assert delta("bentoml_service_request_total", endpoint="/complete", http_response_code="200") == 2
    assert delta("bentoml_service_request_total", endpoint="/complete", http_response_code="400") == 1
    assert delta("bentoml_service_request_total", endpoint="/generate", http_response_code="200") == 2
    assert delta("bentoml_service_request_duration_seconds_count", endpoint="/generate") == 2
