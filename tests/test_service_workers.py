"""CONDGEN_WORKERS=2: two server processes behind one port, each with its own models and
batchers; answers stay reproducible and /metrics adds up what both workers did."""
from __future__ import annotations

import base64
import glob
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import _stop, launch_server, wait_ready
from test_reliability_faults import _engine_pids
from test_service_http import decode_png

pytestmark = pytest.mark.slow
READY_LINE = "loaded and warmed up gpt:"  # each worker logs it once its models are ready


@pytest.fixture(scope="module")
def two_workers(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("workers") / "serve.log"
    proc, srv = launch_server(bentoml_home, log, {"CONDGEN_WORKERS": "2", "CONDGEN_TORCH_THREADS": "1"})
    try:
        wait_ready(proc, srv)  # one worker answered ready; wait for the other's models as well
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count(READY_LINE) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield srv
    finally:
        _stop(proc)


def _counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def test_two_workers_answer_alike_and_count_together(two_workers):
    url = two_workers.url
    images_before = _counter(url, "condgen_images_total")
    tokens_before = _counter(url, "condgen_generated_tokens_total")
    image_req = {"prompt": "a red circle", "n": 2, "seed": 11}
    text_req = {"prompt": "The", "max_tokens": 5, "seed": 3, "temperature": 0.9}
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda _: httpx.post(f"{url}/generate", json=image_req, timeout=120), range(8)))
        texts = list(pool.map(lambda _: httpx.post(f"{url}/complete", json=text_req, timeout=120), range(8)))
    assert all(r.status_code == 200 for r in images + texts)
    assert two_workers.log.read_text(errors="replace").count(READY_LINE) == 2  # one per worker
    # Whichever worker answered, the same seed gives the same image (up to float rounding
    # between batch shapes, as in test_service_http) and the same text.
    pixels = [[decode_png(base64.b64decode(im["b64_json"])).astype(int) for im in r.json()["images"]]
              for r in images]
    for other in pixels[1:]:
        for a, b in zip(pixels[0], other):
            diff = np.abs(a - b)
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    assert len({r.json()["choices"][0]["text"] for r in texts}) == 1
    assert _counter(url, "condgen_images_total") - images_before == 16
    generated = sum(r.json()["usage"]["completion_tokens"] for r in texts)
    assert _counter(url, "condgen_generated_tokens_total") - tokens_before == generated


def test_health_answers_for_every_worker(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """With one worker's text engine dead, /livez and /readyz answered for whichever worker took
    the probe: 200 and 503 in turn, so a probe that waits for three failures in a row kept a
    replica that failed half its requests. Both now answer 503 until that worker recovers, then
    200: through a restart that succeeds (its worker said "ready" until the restart was over),
    and one that cannot start again until its weights are back."""
    root = tmp_path_factory.mktemp("worker_health")
    home = root / "bentoml_home"
    shutil.copytree(bentoml_home, home, ignore=shutil.ignore_patterns("bentos", "tmp", "*.log"))
    weights = Path(glob.glob(str(home / "models" / "gpt" / "*" / "model.safetensors"))[0])
    proc, srv = launch_server(home, root / "serve.log", {"CONDGEN_WORKERS": "2", "CONDGEN_TORCH_THREADS": "1"})
    try:
        wait_ready(proc, srv)
        deadline = time.monotonic() + 120
        while len(_engine_pids(srv.log.read_text(errors="replace"), "text")) < 2:
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.2)
        while httpx.get(f"{srv.url}/readyz", timeout=10).status_code != 200:  # both workers loaded
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.2)
        readyz = lambda: httpx.get(f"{srv.url}/readyz", timeout=10).status_code
        os.kill(_engine_pids(srv.log.read_text(errors="replace"), "text")[0], signal.SIGKILL)
        while readyz() != 503:
            assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.6)  # both workers know (the watch looks every 0.5 s)
        seen: list[int] = []
        while seen[-10:] != [200] * 10:  # until it is back for good
            assert time.monotonic() < deadline, (seen, srv.log_tail())
            seen.append(readyz())
        back = seen.index(200)
        assert back > 0 and set(seen[back:]) == {200}, seen  # 503 while it restarts, then 200: no flapping
        weights.rename(weights.with_suffix(".away"))  # its next start fails
        os.kill(_engine_pids(srv.log.read_text(errors="replace"), "text")[-1], signal.SIGKILL)
        while "starting the text engine again failed" not in srv.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.2)
        time.sleep(1)  # its state written (every 0.5 s)
        answers = {path: [httpx.get(f"{srv.url}{path}", timeout=10).status_code for _ in range(12)]
                   for path in ("/livez", "/readyz", "/health")}
        assert answers == {path: [503] * 12 for path in answers}
        weights.with_suffix(".away").rename(weights)  # the next try (5 s on) succeeds
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.25)
        assert all(httpx.get(f"{srv.url}{path}", timeout=10).status_code == 200
                   for path in ("/livez", "/readyz", "/health") for _ in range(6))
    finally:
        _stop(proc)
