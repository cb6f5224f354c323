"""`bentoml build` of bentofile.yaml against the test store packs every served model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")

pytestmark = pytest.mark.slow


def _build(env: dict[str, str]) -> dict:
    """`bentoml build` of bentofile.yaml; the Bento's description (`bentoml get -o json`) and its path."""
    build = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([BENTOML, "get", tag, "-o", "json"], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    return {**json.loads(info.stdout), "path": Path(env["BENTOML_HOME"], "bentos", *tag.split(":"))}


def _packed(bento: dict) -> list[str]:
    return sorted(m["tag"].split(":")[0] for m in bento["services"][0]["models"])


def test_bentoml_build_lists_every_served_model(bentoml_home):
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    bento = _build(env)
    assert bento["service"] == "service.app:Generation"
    assert _packed(bento) == ["ar_image", "gan", "gpt"]  # ar_image too, since the store has it
    assert (bento["path"] / "src" / "docs" / "chat_template.jinja").is_file()  # the README's example, in the Bento
    # Served by tag, a bad setting is named in one line (BentoML showed "No module named 'condgen'")
    tag = f"{bento['path'].parent.name}:{bento['path'].name}"
    done = subprocess.run([BENTOML, "serve", tag, "--port", "1"], env={**env, "CONDGEN_MAX_INFLIGHT": "abc"},
                          capture_output=True, text=True, timeout=120)
    out = (done.stdout + done.stderr).strip()
    assert done.returncode != 0 and "CONDGEN_MAX_INFLIGHT='abc'" in out and len(out.splitlines()) == 1, out[-3000:]


def test_a_bento_of_your_own_model_packs_it_and_its_container_serves_it(bentoml_home, tmp_path):
    """A store without `gpt` builds (bentofile.yaml listed gpt:latest), and the container's
    GPT_MODEL is the model the Bento was built with (it was fixed at gpt:latest), at the very
    version it packs (it was the bare name, which a later own-gpt would have taken over)."""
    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models" / "gan", home / "models" / "gan")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "GPT_MODEL": "own-gpt"}
    train = subprocess.run([sys.executable, "-m", "training.train_gpt", "--preset", "tiny", "--name=own-gpt",
                            f"--run_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    bento = _build(env)
    assert _packed(bento) == ["gan", "own-gpt"]
    envs = {e["name"]: e["value"] for e in bento["envs"]}
    packed = {m["tag"].split(":")[0]: m["tag"] for m in bento["services"][0]["models"]}
    # pinned to the packed versions: a newer own-gpt trained later is not in this Bento
    assert envs == {"GPT_MODEL": packed["own-gpt"], "GAN_MODEL": packed["gan"]}
    dockerfile = (bento["path"] / "env" / "docker" / "Dockerfile").read_text()
    assert "ENV GPT_MODEL=$GPT_MODEL" in dockerfile and f"ARG GPT_MODEL={packed['own-gpt']}" in dockerfile
