"""Reliability against real `bentoml serve` processes.

Most tests use a second server (`guarded_server`: an API key, one CORS origin and a capacity of
4 requests in flight, 4 queued images, 2 queued completions); its last test shuts it down with
SIGTERM. The disconnect test uses the session's plain server. No test asserts on timing."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests_support import metric_value

GUARDED_MAX_INFLIGHT = 4
POST_ROUTES = {"/complete": {"prompt": "Hi", "max_tokens": 2}, "/generate": {"prompt": "a red circle"},
               "/v1/completions": {"model": "gpt", "prompt": "Hi", "max_tokens": 2},
               "/v1/images/generations": {"prompt": "a red circle"}}
GET_ROUTES = ["/models", "/v1/models", "/docs.json"]


# ---- API key and CORS ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"x-api-key": "nope"}])
def test_every_route_but_health_metrics_and_docs_needs_the_key(guarded_server, headers):
    url = guarded_server.url
    for path, body in POST_ROUTES.items():
        r = httpx.post(url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in GET_ROUTES:
        r = httpx.get(url + path, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
    for path in ["/livez", "/readyz", "/health", "/metrics", "/docs", "/"]:
        assert httpx.get(url + path, headers=headers, timeout=30).status_code == 200, path
    doc = httpx.get(url + "/openapi.json", headers=headers, timeout=30).json()  # what Swagger UI reads
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}  # its Authorize button


def test_the_key_opens_every_route(guarded_server):
    url = guarded_server.url
    for path, body in POST_ROUTES.items():
        for headers in (guarded_server.auth, {"x-api-key": guarded_server.key}):
            r = httpx.post(url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
    for path in ["/models", "/v1/models", "/openapi.json"]:
        assert httpx.get(url + path, headers=guarded_server.auth, timeout=30).status_code == 200


def test_an_empty_ar_image_model_turns_the_optional_model_off(guarded_server):
    """The store has ar_image, but AR_IMAGE_MODEL="" leaves it out: not listed, not served."""
    names = [m["name"] for m in httpx.get(f"{guarded_server.url}/models", headers=guarded_server.auth,
                                          timeout=30).json()["data"]]
    assert sorted(names) == ["gan", "gpt"]
    r = httpx.post(f"{guarded_server.url}/generate", json={"prompt": "a", "model": "ar_image"},
                   headers=guarded_server.auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_openai_client_sends_the_key_as_bearer(guarded_server):
    good = openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key=guarded_server.key, max_retries=0)
    assert good.completions.create(model="gpt", prompt="Hi", max_tokens=2, seed=3).choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="gpt", prompt="Hi", max_tokens=2)


def test_cors_allows_the_configured_origin_only(guarded_server):
    url = guarded_server.url
    pre = {"access-control-request-method": "POST",  # with the headers the official OpenAI SDKs add
           "access-control-request-headers": "authorization,content-type,x-stainless-os,x-stainless-retry-count"}
    ok = httpx.options(url + "/complete", headers={"origin": "http://allowed.example", **pre}, timeout=30)
    assert ok.status_code == 200  # a pre-flight carries no key and must not need one
    assert ok.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    bad = httpx.options(url + "/complete", headers={"origin": "http://evil.example", **pre}, timeout=30)
    assert "access-control-allow-origin" not in bad.headers
    r = httpx.post(url + "/complete", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"origin": "http://allowed.example", **guarded_server.auth}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


# ---- overload ----------------------------------------------------------------------------------

def _flood_requests() -> list[tuple[str, dict]]:
    reqs = []
    for i in range(2 * GUARDED_MAX_INFLIGHT):
        reqs.append(("/complete", {"prompt": f"Request number {i} says", "max_tokens": 40, "seed": 100 + i,
                                   "temperature": 0.9}))
        reqs.append(("/generate", {"prompt": f"a {['red', 'blue'][i % 2]} circle, picture {i}", "n": 2,
                                   "seed": 500 + 7 * i}))
    return reqs  # 16 = 4x the capacity


def _essence(path: str, body: dict) -> object:
    """What must match between the reference answer and the flooded one."""
    if path == "/complete":
        return body["seed"], [c["text"] for c in body["choices"]]
    return body["seed"], [(im["seed"], _pixels(im["b64_json"])) for im in body["images"]]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def _same(a: object, b: object) -> bool:
    """Equal texts and seeds; images equal up to float rounding, which may flip the last bit of
    a few pixels when the batch shape differs (as in test_service_http)."""
    if isinstance(a, np.ndarray):
        diff = np.abs(a - b)
        return a.shape == b.shape and diff.max() <= 2 and (diff > 0).mean() < 0.01
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_flood_at_four_times_capacity_gives_own_answers_or_fast_429(guarded_server):
    reqs = _flood_requests()
    auth = guarded_server.auth
    with httpx.Client(base_url=guarded_server.url, headers=auth, timeout=120) as c:
        reference = []
        for path, body in reqs:  # one at a time: what each request alone answers
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text[:300]
            reference.append(_essence(path, r.json()))

    barrier = threading.Barrier(len(reqs))

    def send(i: int) -> httpx.Response:
        path, body = reqs[i]
        with httpx.Client(base_url=guarded_server.url, headers=auth, timeout=120) as c:
            barrier.wait()
            return c.post(path, json=body)

    for _round in range(3):  # until the server has refused some (the first round nearly always does)
        with ThreadPoolExecutor(len(reqs)) as pool:
            answers = list(pool.map(send, range(len(reqs))))
        refused = 0
        for i, r in enumerate(answers):
            if r.status_code == 200:
                assert _same(_essence(reqs[i][0], r.json()), reference[i]), f"request {i} got another answer"
            else:
                assert r.status_code in (429, 503), (i, r.status_code, r.text[:300])
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "overloaded"
                refused += 1
        assert refused < len(reqs), "everything was refused"
        if refused:
            break
    else:
        pytest.fail("16 simultaneous requests against a capacity of 4 were never refused")
    assert httpx.get(f"{guarded_server.url}/readyz", timeout=10).status_code == 200


def test_stalled_uploads_get_408_and_free_their_places(guarded_server):
    """Clients that send headers and then stall hold places among the requests in flight only
    until the body timeout (408), not until the deadline: a few idle sockets cannot lock
    everyone out of the generation routes."""
    host, port = guarded_server.url.removeprefix("http://").split(":")
    head = (f"POST /complete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {guarded_server.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    stalled = [socket.create_connection((host, int(port)), timeout=60) for _ in range(GUARDED_MAX_INFLIGHT)]
    for s in stalled:
        s.sendall(head.encode())
    for s in stalled:
        answer = b""
        with s:  # the head and the body may arrive in separate pieces
            while b"request_timeout" not in answer and (piece := s.recv(65536)):
                answer += piece
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:300]
    r = httpx.post(f"{guarded_server.url}/complete", json={"prompt": "Hi", "max_tokens": 2},
                   headers=guarded_server.auth, timeout=60)
    assert r.status_code == 200, r.text[:300]


# ---- graceful shutdown (last: it stops the guarded server) -----------------------------------

def test_sigterm_lets_in_flight_requests_finish_or_fail_cleanly(guarded_server):
    reqs = [("/complete", {"prompt": "Shutting down", "max_tokens": 48, "n": 8, "seed": 9}),
            ("/complete", {"prompt": "Shutting down", "max_tokens": 48, "seed": 10, "stream": True}),
            ("/generate", {"prompt": "a square", "n": 16, "seed": 11}),
            ("/generate", {"prompt": "a circle", "n": 16, "seed": 12})]
    started = threading.Barrier(len(reqs) + 1)

    def send(i: int) -> tuple[int, str]:
        path, body = reqs[i]
        try:
            with httpx.Client(base_url=guarded_server.url, headers=guarded_server.auth, timeout=120) as c:
                started.wait()
                r = c.post(path, json=body)
                if r.status_code == 200 and body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
                elif r.status_code == 200:
                    r.json()  # a whole body, not a truncated one
                else:
                    assert r.json()["error"]["message"]
                return r.status_code, ""
        except httpx.ConnectError as e:  # refused before it was accepted: clean, nothing was lost
            return -1, repr(e)

    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(send, i) for i in range(len(reqs))]
        started.wait()
        time.sleep(0.2)  # the requests are on their way or inside the server
        os.killpg(guarded_server.proc.pid, signal.SIGTERM)
        results = [f.result(timeout=180) for f in futures]
    assert all(code in (200, 429, 503, -1) for code, _ in results), results  # 429: the image queue holds 4
    guarded_server.proc.wait(timeout=60)  # and the server does exit
    log = guarded_server.server.log_tail(20000)
    assert "Traceback" not in log, log[-4000:]
    assert "an engine process has died" not in log  # its engines stop because it does: no death


# ---- a client that leaves a stream stops costing compute --------------------------------------

def test_disconnected_streams_stop_generating(server):
    def metrics() -> str:
        return httpx.get(f"{server.url}/metrics", timeout=30).text

    def tokens() -> float:
        return metric_value(metrics(), "condgen_generated_tokens_total")

    n, max_tokens, clients = 16, 48, 8
    before = tokens()

    def leave_early(i: int) -> int:
        body = {"prompt": f"Disconnect {i}", "max_tokens": max_tokens, "n": n, "seed": i, "stream": True,
                "temperature": 1.0}
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{server.url}/complete", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return 1  # one event, then hang up
        return 0

    with ThreadPoolExecutor(clients) as pool:
        assert sum(pool.map(leave_early, range(clients))) == clients
    deadline = time.monotonic() + 60
    while True:  # the gauges drop to zero once every stream is released
        text = metrics()
        running = metric_value(text, "condgen_requests_running", 'endpoint="completions"')
        waiting = metric_value(text, "condgen_requests_waiting", 'endpoint="completions"')
        if running == 0 and waiting == 0:
            break
        assert time.monotonic() < deadline, f"running={running} waiting={waiting} a minute after the clients left"
        time.sleep(0.2)
    settled = tokens()
    time.sleep(1.0)
    assert tokens() == settled  # nothing is generating any more
    full = clients * n * max_tokens  # what the engine would have made had nobody left
    assert settled - before < 0.75 * full, (settled - before, full)
