"""`bentoml build` of bentofile.yaml against the test store packs every served model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")

pytestmark = pytest.mark.slow


def test_bentoml_build_lists_every_served_model(bentoml_home):
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    build = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([BENTOML, "get", tag, "-o", "json"], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    bento = json.loads(info.stdout)
    assert bento["service"] == "service.app:Generation"
    assert sorted(m["tag"].split(":")[0] for m in bento["models"]) == ["gan", "gpt"]  # bentofile.yaml's
    # ar_image is optional, so not in bentofile.yaml; the service declares it when the store has it.
    assert sorted(m["tag"].split(":")[0] for m in bento["services"][0]["models"]) == ["ar_image", "gan", "gpt"]
