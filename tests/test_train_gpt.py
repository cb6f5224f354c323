"""The GPT training job on tiny configs: loss falls, resume is exact, DDP runs, the store gets the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tokenizer import Tokenizer
from training.data.text_corpus import load_corpus
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
    # Another run's tokenizer in the folder (a run started there without --resume and stopped)
    # must not be paired with these weights: the checkpoint carries its own.
    (tmp_path / "halted" / "tokenizer.json").write_text(Tokenizer.train(["other text " * 50], 300).to_str())
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


@pytest.mark.parametrize("flag,named", [
    ("--max_steps=0", "--max_steps=0: must be >= 1"), ("--batch_size=0", "--batch_size"),
    ("--eval_interval=0", "--eval_interval"), ("--grad_accum=0", "--grad_accum"), ("--lr=-1", "--lr"),
    ("--dropout=2", "--dropout"), ("--vocab_size=10", "--vocab_size"), ("--block_size=0", "--block_size"),
    ("--device=foo", "--device"), ("--n_head=3", "--n_embd=32 is not divisible by --n_head=3"),
    ("--name=My Model", "--name"),
])
def test_bad_settings_are_refused_before_training_naming_the_option(tmp_path, capsys, flag, named):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", f"--run_dir={tmp_path}", flag])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_an_out_path_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        main(TINY + [f"--run_dir={tmp_path / 'run'}", f"--out={tmp_path / 'afile'}"])
    assert "--out" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_resume_needs_a_matching_readable_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true"])  # a mistyped run_dir does not start afresh
    main(TINY + [f"--run_dir={tmp_path}", "--halt_after=5"])
    with pytest.raises(ValueError, match="n_layer=2, this run asks for n_layer=3"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true", "--n_layer=3"])
    ckpt = tmp_path / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{ckpt} is not a readable checkpoint"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true"])


def test_a_diverging_run_stops_and_saves_no_model(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        main(TINY + [f"--run_dir={tmp_path}", "--lr=1e6", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


def test_too_little_text_is_named(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world")
    with pytest.raises(ValueError, match="block_size"):
        main(TINY + [f"--run_dir={tmp_path / 'run'}", f"--data={tmp_path / 'tiny.txt'}"])


def test_user_text_must_be_utf8_and_the_split_ignores_how_the_path_is_spelled(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub.txt").mkdir(parents=True)  # a folder named like a text file is not one
    for i in range(30):
        (data / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    monkeypatch.chdir(tmp_path)
    assert load_corpus("data").hash == load_corpus(str(data)).hash == load_corpus(f"../{tmp_path.name}/data").hash
    (data / "latin1.txt").write_bytes("Café naïve".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        load_corpus(str(data))
