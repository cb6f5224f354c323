"""Locust users for the service. Every response is checked, not just its status:
the schema, that each image decodes as a PNG, and that the seed echoed is the seed sent.

    locust -f load_tests/locustfile.py --host http://127.0.0.1:3000            (web UI)
    python -m load_tests.run --host http://127.0.0.1:3000 --users 8 --run-time 30s   (headless, thresholds)

The user classes can be picked on the command line (`CompletionUser StreamingUser ...`);
by default locust runs them all, weighted. At the start of a test the server's GET /models says
which kinds of model it serves, and users needing a kind it lacks are left out (a text-only
server got image requests that all failed with 404); the chat user runs only against a server
whose OpenAPI document lists /v1/chat/completions (one started with CONDGEN_CHAT_TEMPLATE).
With CONDGEN_API_KEY set, as the server's, every request sends it.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import time

import requests
from locust import HttpUser, between, events, task
from PIL import Image

PROMPTS = [
    "Return the value of the",
    "This module provides",
    "If the argument is a string,",
    "The default value is",
    "Raise an exception when",
]
IMAGE_PROMPTS = [
    "a small red circle on the left, blue background",
    "a large green square in the centre on a white backdrop",
    "blue backdrop with a little crimson disc at the left",
    "a yellow triangle at the top, black background",
]


def auth_headers() -> dict[str, str]:
    key = os.environ.get("CONDGEN_API_KEY", "").strip()  # stripped, as the server strips it
    return {"Authorization": f"Bearer {key}"} if key else {}


class ServiceUser(HttpUser):
    """Sends the API key, if any; `kinds`: what its tasks need ("text", "image" models; "chat",
    the chat route)."""
    abstract = True
    kinds: frozenset[str] = frozenset()
    text_model = "gpt"  # the served text model's name, as GET /models gives it (the chat body needs one)

    def on_start(self) -> None:
        self.client.headers.update(auth_headers())


@events.test_start.add_listener
def leave_out_unserved_kinds(environment, **_) -> None:
    """Drop the users whose kinds the server does not serve, unless that leaves none (then the
    failures show it). A server that cannot say keeps every user."""
    try:
        resp = requests.get(f"{environment.host}/models", headers=auth_headers(), timeout=10)
        resp.raise_for_status()
        models = resp.json()["data"]
        served = {m["kind"] for m in models}
        doc = requests.get(f"{environment.host}/openapi.json", headers=auth_headers(), timeout=10)
        if doc.ok and "/v1/chat/completions" in doc.json().get("paths", {}):
            served.add("chat")
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:
        logging.warning("could not read the served models from %s/models (%s): running every user", environment.host, e)
        return
    ServiceUser.text_model = next((m.get("name") for m in models if m["kind"] == "text" and m.get("name")),
                                  ServiceUser.text_model)
    keep = [u for u in environment.user_classes if u.kinds <= served]
    left_out = [u.__name__ for u in environment.user_classes if u not in keep]
    if keep and left_out:
        logging.info("the server serves %s models only: leaving out %s", "/".join(sorted(served)), ", ".join(left_out))
        environment.user_classes[:] = keep


def _fail(resp, why: str) -> None:
    resp.failure(f"{why}: {resp.text[:200]!r}")


def check_completion(resp, seed: int, n: int) -> None:
    try:
        body = resp.json()
        ok = (body["seed"] == seed and len(body["choices"]) == n
              and all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length", "eos")
                      for c in body["choices"])
              and body["usage"]["completion_tokens"] >= 1)
    except (ValueError, KeyError, TypeError) as e:
        return _fail(resp, f"bad completion body ({e})")
    if not ok:
        _fail(resp, "completion does not match the request")


def check_chat(resp, seed: int) -> None:
    try:
        body = resp.json()
        [choice] = body["choices"]
        ok = (body["object"] == "chat.completion" and body["seed"] == seed
              and choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
              and choice["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1)
    except (ValueError, KeyError, TypeError) as e:
        return _fail(resp, f"bad chat completion body ({e})")
    if not ok:
        _fail(resp, "chat completion does not match the request")


def check_images(resp, seed: int, n: int) -> None:
    try:
        body = resp.json()
        images = body["images"]
        if body["seed"] != seed or len(images) != n:
            return _fail(resp, "wrong seed or image count")
        for i, img in enumerate(images):
            if img["seed"] != seed + i:
                return _fail(resp, f"image {i} has seed {img['seed']}, expected {seed + i}")
            Image.open(io.BytesIO(base64.b64decode(img["b64_json"]))).verify()
    except Exception as e:  # any decoding problem is a failed response
        _fail(resp, f"bad image body ({type(e).__name__}: {e})")


class CompletionUser(ServiceUser):
    """Plain /complete requests of mixed lengths."""
    weight = 3
    kinds = frozenset({"text"})
    wait_time = between(0.05, 0.3)

    @task
    def complete(self) -> None:
        seed = random.randrange(2**31)
        payload = {"prompt": random.choice(PROMPTS), "max_tokens": random.choice([8, 16, 32]),
                   "temperature": 0.8, "top_k": 50, "seed": seed}
        with self.client.post("/complete", json=payload, name="/complete", catch_response=True) as resp:
            if resp.status_code != 200:
                return _fail(resp, f"status {resp.status_code}")
            check_completion(resp, seed, 1)  # a 200 that passes counts as a success (a later success() would
            # overwrite the failure a check reported)


class StreamingUser(ServiceUser):
    """/complete with stream=true: Server-Sent Events until `data: [DONE]`."""
    weight = 2
    kinds = frozenset({"text"})
    wait_time = between(0.05, 0.3)

    @task
    def stream(self) -> None:
        seed = random.randrange(2**31)
        payload = {"prompt": random.choice(PROMPTS), "max_tokens": 24, "seed": seed, "stream": True}
        with self.client.post("/complete", json=payload, name="/complete stream", stream=True,
                              catch_response=True) as resp:
            try:
                self._read_stream(resp, seed)
            finally:
                # Locust times a stream to its headers (which come with the first event here):
                # report the whole stream, to its last byte, as its latency.
                resp.request_meta["response_time"] = (time.time() - resp.request_meta["start_time"]) * 1000

    @staticmethod
    def _read_stream(resp, seed: int) -> None:
        if resp.status_code != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            return _fail(resp, f"status {resp.status_code}, type {resp.headers.get('content-type')}")
        chunks, done = 0, False
        for line in resp.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                return _fail(resp, "an SSE chunk is not JSON")
            if chunk.get("seed", seed) != seed:
                return _fail(resp, "the stream reports another seed")
            chunks += 1
        if not done or chunks == 0:
            return _fail(resp, f"stream ended without [DONE] ({chunks} chunks)")
        resp.success()


class ChatUser(ServiceUser):
    """/v1/chat/completions, a one-message conversation (servers with a chat template only)."""
    weight = 1
    kinds = frozenset({"text", "chat"})
    wait_time = between(0.05, 0.3)

    @task
    def chat(self) -> None:
        seed = random.randrange(2**31)
        messages = [{"role": "user", "content": random.choice(PROMPTS)}]  # short: the tiny test model's context is 64
        payload = {"model": self.text_model, "messages": messages, "max_tokens": random.choice([8, 16]),
                   "temperature": 0.8, "seed": seed}
        with self.client.post("/v1/chat/completions", json=payload, name="/v1/chat/completions",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                return _fail(resp, f"status {resp.status_code}")
            check_chat(resp, seed)  # as check_completion: no success() after it


class ImageUser(ServiceUser):
    """/generate with n = 1 and n = 4."""
    weight = 2
    kinds = frozenset({"image"})
    wait_time = between(0.05, 0.3)

    def _generate(self, n: int) -> None:
        seed = random.randrange(2**31)
        payload = {"prompt": random.choice(IMAGE_PROMPTS), "n": n, "seed": seed}
        with self.client.post("/generate", json=payload, name=f"/generate n={n}", catch_response=True) as resp:
            if resp.status_code != 200:
                return _fail(resp, f"status {resp.status_code}")
            check_images(resp, seed, n)  # as check_completion: no success() after it

    @task(3)
    def one(self) -> None:
        self._generate(1)

    @task(1)
    def four(self) -> None:
        self._generate(4)


class MixedUser(CompletionUser, StreamingUser, ImageUser):
    """A product backend doing a bit of everything (realistic prompts, mixed endpoints)."""
    weight = 1
    kinds = frozenset({"text", "image"})
    tasks = {CompletionUser.complete: 3, StreamingUser.stream: 2, ImageUser.one: 2, ImageUser.four: 1}
