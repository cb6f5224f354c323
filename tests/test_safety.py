"""Faults and safety that need no server: a training run killed mid-way resumes from its last
complete checkpoint, and nothing on the loading path can unpickle."""
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.artifacts import save_model_dir
from models.engine import TextEngine
from models.gpt import GPT, GPTConfig
from models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_mid_run_then_resume(tmp_path):
    args = [sys.executable, "-m", "training.train_gpt", "--preset", "tiny", "--store=false", "--max_steps=200",
            "--ckpt_interval=5", "--eval_interval=1000", f"--run_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "ckpt.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(ckpt, weights_only=True)["step"]  # the file on disk is always a whole checkpoint
    assert 10 <= step < 200
    subprocess.run(args + ["--resume=true"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    final = torch.load(ckpt, weights_only=True)
    assert final["step"] == 200 and len(final["history"]["train_loss"]) == 200
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_no_unpickling_in_the_code():
    """Serving loads safetensors and JSON; training checkpoints use torch.load(weights_only=True)."""
    offenders = []
    for path in [*ROOT.glob("models/**/*.py"), *ROOT.glob("service/**/*.py"), *ROOT.glob("training/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|Unpickler|torch\.load\((?!.*weights_only=True)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_loading_a_model_never_calls_the_unpickler(tmp_path, monkeypatch):
    tok = Tokenizer.train(["just some text " * 20], 300)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=1, n_embd=8))
    save_model_dir(tmp_path, model.config.to_dict(), model.state_dict(), tok)

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler(pickle.Unpickler):  # a class still: modules imported meanwhile subclass it
        __init__ = refuse

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    TextEngine.load(tmp_path, device="cpu")


@pytest.mark.parametrize("name", ["../etc", "gpt/../../x", "a b", "", "GPT", "a-", "my.", "x" * 64])
def test_store_names_are_validated(name, tmp_path):
    """Refused naming the option, as a store name (BentoML's own refusal of `a-`, which must end
    in a letter or digit, spoke of a tag 'a-:latest' the user never typed)."""
    from training.store import save_to_store

    with pytest.raises(ValueError, match=r"^--name=.*: use lowercase letters, digits"):
        save_to_store(name, tmp_path, labels={"family": "gpt"})
