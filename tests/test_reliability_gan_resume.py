"""The GAN job killed with SIGKILL mid-run resumes from its last complete checkpoint
(the GPT job's twin is in test_safety.py). Checkpoints are written to a temp name and renamed,
so the file on disk is always a whole one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["step"] if ckpt.is_file() else -1


def test_gan_sigkill_mid_run_then_resume(tmp_path):
    steps = 16
    args = [sys.executable, "-m", "training.train_gan", "--preset", "tiny", "--store=false",
            f"--max_steps={steps}", "--eval_interval=2", "--evaluator_steps=5", "--evaluator_n=128",
            "--n_train=128", "--threads=1", f"--out={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(tmp_path / "bentoml_home")}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "ckpt.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _step(ckpt) < 4:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _step(ckpt)  # loads: the file on disk is a whole checkpoint
    assert 4 <= killed_at < steps
    subprocess.run(args + ["--resume=true"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    final = torch.load(ckpt, weights_only=True)
    assert final["step"] == steps
    # One history row per evaluation, each step once: the run went on, it did not start over.
    assert [row["step"] for row in final["history"]] == list(range(2, steps + 1, 2))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file left behind
