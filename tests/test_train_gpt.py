"""The GPT training job on tiny configs: loss falls, resume is exact, DDP runs, the store gets the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.train_gpt import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--store=false", "--max_steps=20", "--ckpt_interval=5", "--eval_interval=10"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_tiny_training_lowers_the_loss(tmp_path):
    metrics = main(["--preset", "tiny", "--store=false", f"--run_dir={tmp_path}", f"--out={tmp_path / 'out'}"])
    history = torch.load(tmp_path / "ckpt.pt", weights_only=True)["history"]
    first, last = sum(history["train_loss"][:5]) / 5, sum(history["train_loss"][-5:]) / 5
    assert last < first - 0.3
    assert metrics["val_bits_per_byte"] > 0 and (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "samples.txt").read_text().strip()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    main(TINY + [f"--run_dir={tmp_path / 'straight'}"])
    main(TINY + [f"--run_dir={tmp_path / 'halted'}", "--halt_after=12"])
    assert not (tmp_path / "halted" / "model").exists()  # stopped before the end
    assert torch.load(tmp_path / "halted" / "ckpt.pt", weights_only=True)["step"] == 12
    main(TINY + [f"--run_dir={tmp_path / 'halted'}", "--resume=true"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "halted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_ddp_with_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.train_gpt", *TINY, f"--run_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]  # the workers' traceback, if any
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["val_loss"] < 7


def test_saves_to_the_bentoml_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "store"))
    code = ("from training.train_gpt import main; import bentoml; "
            "m = main(['--preset', 'tiny', '--max_steps=5', '--run_dir=" + str(tmp_path / "run") + "']); "
            "b = bentoml.models.get(m['tag']); print(b.info.labels['family'], b.info.labels['dataset'] == "
            "m['dataset_hash'], sorted(p.name for p in __import__('pathlib').Path(b.path).iterdir()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "gpt True" in out and "model.safetensors" in out and "tokenizer.json" in out and "metrics.json" in out


@pytest.mark.parametrize("flag", ["--n_layer=abc", "--no_such_flag=1", "--preset=huge"])
def test_bad_flags_exit_with_a_usage_error(flag):
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 2
