"""Completion routes against the real server: clients that leave before or during their answer,
and streamed logprobs when a stop string holds text back. Uses the session's server
(tests/conftest.py)."""
from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests_support import engines_paused, metric_value, wait_for

pytestmark = pytest.mark.slow


def _metric(client: httpx.Client, name: str, labels: str = "") -> float:
    return metric_value(client.get("/metrics").text, name, labels)


def _left(client: httpx.Client, path: str) -> float:
    return _metric(client, "condgen_request_errors_total", f'endpoint="{path}",status="499"')


def _send(client: httpx.Client, path: str, body: dict) -> socket.socket:
    s = socket.create_connection((client.base_url.host, client.base_url.port))
    payload = json.dumps(body).encode()
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (path.encode(), len(payload), payload))
    return s


def test_queued_completions_whose_clients_left_are_never_admitted(client, server):
    """Streaming or not, a request whose client hangs up while it waits for a decode slot leaves
    the engine's queue: answered 499, never admitted, not one token made. The engine is paused
    meanwhile, so the requests are certainly still queued when their clients leave."""
    body = {"prompt": "Once", "max_tokens": 40, "n": 4, "seed": 3}
    requests = [("/complete", body), ("/complete", {**body, "stream": True}),
                ("/v1/completions", {**body, "model": "gpt"})]
    tokens = lambda: _metric(client, "condgen_generated_tokens_total")
    admitted = lambda: _metric(client, "condgen_queue_time_seconds_count", 'endpoint="completions"')
    before = tokens(), admitted(), _left(client, "/complete"), _left(client, "/v1/completions")
    logged = lambda: server.log.read_text(errors="replace").count("left before the answer; its generation was cancelled")
    logged_before = logged()
    with engines_paused(server.pid):
        in_progress = lambda: _metric(client, "bentoml_service_request_in_progress")  # noqa: E731
        started = in_progress()
        sockets = [_send(client, path, b) for path, b in requests]
        wait_for(lambda: in_progress() == started + 3, "the requests did not reach their handlers", 10)
        for s in sockets:
            s.close()
        wait_for(lambda: (_left(client, "/complete"), _left(client, "/v1/completions"))
                  == (before[2] + 2, before[3] + 1), "the requests whose clients left were not answered 499", 10)
    # The engine reads each request with its cancellation, then this one: once it is answered,
    # the others have been dropped from the queue.
    r = client.post("/complete", json={"prompt": "a", "max_tokens": 2, "seed": 0})
    assert r.status_code == 200
    assert tokens() - before[0] == r.json()["usage"]["completion_tokens"]
    assert admitted() - before[1] == 1
    assert logged() - logged_before == 3  # each left after its body was read (not a 499 before that)


@pytest.mark.parametrize("held", [True, False], ids=["released-later", "stop-hit"])
def test_streamed_logprobs_are_the_plain_answers_when_a_stop_string_holds_text(client, held):
    """Each chunk carries the logprobs of the text it releases (OpenAI's layout): the tokens held
    back with a possible stop string come with their text; the chunks add up, offsets included,
    to the plain answer's logprobs (which list a stop string's tokens too)."""
    req = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 5, "logprobs": 1}
    free = client.post("/complete", json=req).json()["choices"][0]["logprobs"]
    pieces = free["tokens"]
    # Three tokens of whole characters, then one more: a stop string starting with them holds them back.
    k = next((k for k in range(len(pieces) - 3) if all(p and "\ufffd" not in p for p in pieces[k:k + 4])), None)
    if k is None:
        pytest.skip(f"sample {pieces!r} has no four tokens of whole characters in a row")
    stop = "".join(pieces[k:k + 3]) + ("\x00" if held else "")  # held: never matched, released later
    plain = client.post("/complete", json={**req, "stop": [stop]}).json()["choices"][0]
    assert (plain["finish_reason"] == "stop") == (not held)
    with client.stream("POST", "/complete", json={**req, "stop": [stop], "stream": True}) as r:
        chunks = [json.loads(line[6:])["choices"] for line in r.iter_lines()
                  if line.startswith("data: {") and '"choices":[{' in line]
    choices = [c[0] for c in chunks]
    held_back = [c for c in choices if c["finish_reason"] is None and not c["text"]]
    assert held_back == []  # a chunk per released text, not one per token
    for c in choices[:-1]:
        if "\ufffd" not in c["text"]:  # (a token ending inside a character decodes as U+FFFD alone)
            assert "".join(c["logprobs"]["tokens"]) == c["text"]
    streamed = {k: [x for c in choices for x in c["logprobs"][k]] for k in plain["logprobs"]}
    assert streamed == plain["logprobs"]
    assert "".join(c["text"] for c in choices) == plain["text"]
