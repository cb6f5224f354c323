"""A text-only and an image-only server: a model variable set empty turns that model off.

A server needed both a text model and a GAN, so serving completions meant training a GAN
(nine minutes for the small default) and holding it in memory. Real servers, over HTTP.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Server, _stop, launch_server, wait_ready


def _serve(home: Path, where: Path, env: dict[str, str]) -> Iterator[Server]:
    proc, srv = launch_server(home, where / "serve.log", env)
    try:
        wait_ready(proc, srv)
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def text_only(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(bentoml_home, tmp_path_factory.mktemp("text_only"), {"GAN_MODEL": "", "AR_IMAGE_MODEL": ""})


@pytest.fixture(scope="module")
def image_only(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(bentoml_home, tmp_path_factory.mktemp("image_only"), {"GPT_MODEL": "", "AR_IMAGE_MODEL": ""})


def _not_served(r: httpx.Response, kind: str, tgi: bool = False) -> None:
    assert r.status_code == 404, (r.status_code, r.text)
    error = r.json() if tgi else r.json()["error"]  # TGI's requests get TGI's error shape
    assert error["code"] == "model_not_found" and f"this server serves no {kind} model" in error[
        "error" if tgi else "message"]


def test_a_text_only_server_completes_and_answers_image_routes_404(text_only: Server):
    with httpx.Client(base_url=text_only.url, timeout=60) as c:
        assert [m["kind"] for m in c.get("/models").json()["data"]] == ["text"]
        assert [m["id"].split(":")[0] for m in c.get("/v1/models").json()["data"]] == ["gpt"]
        done = c.post("/complete", json={"prompt": "The", "max_tokens": 4, "seed": 1})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
        assert c.get("/info").status_code == 200
        _not_served(c.post("/generate", json={"prompt": "a red circle", "seed": 1}), "image")
        _not_served(c.post("/v1/images/generations", json={"prompt": "a red circle"}), "image")
        refused = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle"})
        _not_served(refused, "image")
        assert refused.json()["error"]["param"] is None  # no override_settings was sent
        for path in ("/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/progress", "/sdapi/v1/scripts"):
            _not_served(c.get(path), "image")  # no A1111 API at all, rather than one with no model
        _not_served(c.post("/sdapi/v1/options", json={}), "image")
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    log = text_only.log.read_text(errors="replace")
    assert "the text engine of gpt:" in log and "the image engine of" not in log  # no GAN loaded


def test_an_image_only_server_draws_and_answers_text_routes_404(image_only: Server):
    with httpx.Client(base_url=image_only.url, timeout=60) as c:
        assert [m["kind"] for m in c.get("/models").json()["data"]] == ["image"]
        png = c.post("/generate", json={"prompt": "a red circle", "seed": 1, "response_format": "png"})
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        text = {"prompt": "The", "max_tokens": 4}
        for path, body in [("/complete", text), ("/v1/completions", {**text, "model": "gpt"}),
                           ("/tokenize", {"prompt": "The"}), ("/detokenize", {"tokens": [1]}), ("/generate", {"inputs": "The"}),
                           ("/generate_stream", {"inputs": "The"}), ("/", {"inputs": "The"})]:
            _not_served(c.post(path, json=body), "text", tgi="inputs" in body)
        _not_served(c.get("/info"), "text", tgi=True)
        assert c.get("/health").status_code == 200
    log = image_only.log.read_text(errors="replace")
    assert "the image engine of gan:" in log and "the text engine of" not in log


def _import_service(home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import json, service.app as app; print(json.dumps(app.MODEL_ENVS))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BENTOML_HOME": str(home), **env})


def test_no_model_at_all_stops_the_start_up_in_one_line(bentoml_home: Path):
    run = _import_service(bentoml_home, {"GPT_MODEL": "", "GAN_MODEL": "", "AR_IMAGE_MODEL": ""})
    assert run.returncode != 0
    assert "no model to serve" in run.stderr.splitlines()[-1], run.stderr[-2000:]


def test_a_bento_of_a_text_only_server_keeps_its_gan_off(bentoml_home: Path):
    """The Bento's container defaults: GAN_MODEL empty there too (left out, the container would
    have looked for gan:latest, which the Bento does not pack, and failed to start). An AR model
    left out is not listed: an entry without a value is one `bentoml serve` requires set."""
    run = _import_service(bentoml_home, {"GAN_MODEL": "", "AR_IMAGE_MODEL": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    envs = {e["name"]: e["value"] for e in json.loads(run.stdout.splitlines()[-1])}
    assert envs["GAN_MODEL"] == "" and envs["GPT_MODEL"].startswith("gpt:") and "AR_IMAGE_MODEL" not in envs


def test_a_store_without_the_ar_model_needs_no_ar_setting(bentoml_home: Path, tmp_path: Path):
    """`bentoml serve` requires every variable the service lists without a value: listing
    AR_IMAGE_MODEL empty when the store had no ar_image stopped `make serve` on a fresh machine
    ("Environment variable 'AR_IMAGE_MODEL' is required but not set")."""
    import shutil

    home = tmp_path / "home"
    for name in ("gpt", "gan"):
        shutil.copytree(bentoml_home / "models" / name, home / "models" / name)
    env = {k: v for k, v in os.environ.items() if k not in ("GPT_MODEL", "GAN_MODEL", "AR_IMAGE_MODEL")}
    code = "import json, service.app as app; print(json.dumps(app.MODEL_ENVS))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**env, "BENTOML_HOME": str(home)})
    assert run.returncode == 0, run.stderr[-2000:]
    required = [e["name"] for e in json.loads(run.stdout.splitlines()[-1]) if not e["value"]]
    assert required == [], required  # none: every listed variable has its value

