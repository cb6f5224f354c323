"""Image routes against the real server: a client that leaves before its images are made,
and the wording of a model of the wrong kind. Uses the session's server (tests/conftest.py)."""
from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests_support import engines_paused, metric_value, wait_for

pytestmark = pytest.mark.slow


def _metric(client: httpx.Client, name: str, labels: str = "") -> float:
    return metric_value(client.get("/metrics").text, name, labels)


def test_a_queued_image_request_whose_client_left_is_never_generated(client, server):
    """Its job is dropped by the batcher before it runs, and the request is answered 499 (logged
    and counted, as /complete does). The engine processes are paused while it queues, so the
    job is certainly still waiting when its client hangs up."""
    body = {"prompt": "a red circle", "n": 16, "seed": 1}
    images = lambda: _metric(client, "condgen_images_total")
    left = lambda: _metric(client, "condgen_request_errors_total", 'endpoint="/generate",status="499"')
    images_before, left_before = images(), left()
    with ThreadPoolExecutor(2) as pool, engines_paused(server.pid):
        # The image worker holds two batches: these two, so that the next request queues.
        busy = [pool.submit(client.post, "/generate", json=body) for _ in range(2)]
        wait_for(lambda: _metric(client, "condgen_requests_running", 'endpoint="images"') == 2,
                 "the two requests did not reach the image worker")
        payload = json.dumps(body).encode()
        with socket.create_connection((client.base_url.host, client.base_url.port)) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_for(lambda: _metric(client, "condgen_requests_waiting", 'endpoint="images"') == 1,
                     "the third request did not queue")
        wait_for(lambda: left() == left_before + 1, "the request whose client left was not answered 499", 10)
    assert [f.result().status_code for f in busy] == [200, 200]
    wait_for(lambda: _metric(client, "condgen_requests_waiting", 'endpoint="images"') == 0
             and _metric(client, "condgen_requests_running", 'endpoint="images"') == 0, "the queue did not drain")
    assert images() - images_before == 2 * body["n"]  # the third request's 16 images were never made
    assert "left before the answer" in server.log_tail(20_000)


@pytest.mark.parametrize("path, model, message", [
    ("/generate", "gpt", "model 'gpt' is a text model; this route needs an image model"),
    ("/complete", "gan", "model 'gan' is an image model; this route needs a text model"),
])
def test_a_model_of_the_wrong_kind_is_named_in_plain_english(client, path, model, message):
    r = client.post(path, json={"prompt": "a", "model": model})
    assert r.status_code == 400 and r.json()["error"]["message"] == message


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"prompt": "   "}, "prompt"),
    ("/complete", {"prompt": "a", "max_tokens": 4000}, "max_tokens"),  # past the context: the engine's check
])
def test_an_engine_check_names_the_field_in_its_message(client, path, body, param):
    """As a schema error's message does ("n: Input should be ..."); the engine's said "must be a
    non-empty string" with the field in `param` only."""
    err = client.post(path, json=body).json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
