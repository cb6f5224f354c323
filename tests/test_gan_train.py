"""The GAN job end to end at the tiny preset, resume, the store, DDP, and the metrics
that grade a generator (evaluator accuracy, memorisation)."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.image_engine import ImageEngine, ImageRequest
from models.tokenizer import Tokenizer
from training.data.imagefolder import load_imagefolder, write_imagefolder
from training.data.shapes import ShapesConfig, make_shapes
from training.evaluate import (frechet_distance, memorisation_rate, near_duplicate_threshold,
                               train_evaluator)
from training.synthesize import main as synthesize_main
from training.common import Dist
from training.train_gan import check_captions_fit, main, restore_rng, sample_prompts
from tests_support import record_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run faster on one thread, and much faster on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan") / "run"
    model_dir = main(["--preset", "tiny", f"--out={out}", "--store=false"])
    return out, model_dir


def test_tiny_run_trains_evaluates_and_saves(tiny_run):
    out, model_dir = tiny_run
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]
    assert all(np.isfinite(h["d_loss"]) and np.isfinite(h["g_loss"]) for h in history)
    assert all("coverage" in h and "colour" in h for h in history)
    assert (out / "samples_000006.png").is_file() and (out / "curves.png").is_file()
    assert (out / "evaluator" / "model.safetensors").is_file()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for key in ("train_accuracy", "heldout_accuracy", "coverage", "diversity", "fd",
                "memorisation", "evaluator", "dataset"):
        assert key in metrics, key
    config = json.loads((model_dir / "config.json").read_text())
    assert config["family"] == "gan" and config["data"]["hash"] == metrics["dataset"]
    engine = ImageEngine.load(model_dir, device="cpu")
    images = engine.generate([ImageRequest("a red circle on the left", seed=0, n=2)])[0]
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8


def test_resume_continues_where_it_stopped(tiny_run, tmp_path):
    """3 steps, then --resume to 6: the same weights as 6 steps in one go."""
    _, straight = tiny_run
    out = tmp_path / "run"
    main(["--preset", "tiny", f"--run_dir={out}", "--max_steps=3", "--store=false"])
    # Another run's tokenizer in the folder must not be paired with these weights.
    (out / "tokenizer.json").write_text(Tokenizer.train(["other captions " * 50], 300).to_str())
    resumed = main(["--preset", "tiny", "--out", str(out), "--max_steps=6", "--resume",
                    "--store=false"])
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_halt_after_between_evaluations_then_resume_matches_one_run(tiny_run, tmp_path, capsys):
    """train_gan had no --halt_after. Halting at step 4 (evaluations every 3) checkpoints without
    an evaluation, whose random numbers would make the resumed run differ."""
    _, straight = tiny_run
    out = tmp_path / "run"
    main(["--preset", "tiny", f"--run_dir={out}", "--max_steps=6", "--halt_after=4", "--store=false"])
    assert "halted at step 4 of 6;" in capsys.readouterr().err and not (out / "model").exists()
    resumed = main(["--preset", "tiny", "--out", str(out), "--max_steps=6", "--resume", "--store=false"])
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [3, 6]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ckpt_interval_checkpoints_between_evaluations_and_a_run_stopped_after_one_resumes_exactly(
        tiny_run, tmp_path, monkeypatch):
    """An image job checkpointed only with its evaluations: a long --eval_interval risked that
    many steps. Evaluations every 3 steps, checkpoints every 2 besides; Ctrl-C after step 4's."""
    import training.train_gan as job

    _, straight = tiny_run
    out, saved = tmp_path / "run", record_checkpoints(monkeypatch, job, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        main(["--preset", "tiny", f"--run_dir={out}", "--max_steps=6", "--ckpt_interval=2", "--store=false"])
    assert saved == [2, 3, 4]
    monkeypatch.undo()
    resumed = main(["--preset", "tiny", "--out", str(out), "--max_steps=6", "--resume", "--store=false"])
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("arg, message", [
    ("--max_steps=0", "--max_steps=0: must be >= 1"),
    ("--max_steps=-5", "--max_steps=-5: must be >= 1"),
    ("--eval_interval=0", "--eval_interval=0: must be >= 1"),
    ("--context=0", "--context=0: must be >= 1"),
    ("--lr_d=0", "--lr_d=0.0: must be > 0"),
    ("--beta2=1", "--beta2=1.0: must be in [0, 1)"),
    ("--device=gpu", "--device='gpu': must be one of auto, cpu, cuda"),
    ("--g_ch=12", "--g_ch=12"),
    ("--text_dim=30", "--text_dim=30 is not divisible"),
    ("--image_size=48", "--image_size=48: must be 32 or 64"),
    ("--augment=flip", "--augment='flip'"),
    ("--name=My Model", "--name='My Model'"),
    ("--holdout=green:triangle,blue:triangle,yellow:triangle,purple:triangle,cyan:triangle",
     "leaves triangle with one colour (red)"),
])
def test_bad_settings_are_refused_before_training(arg, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", arg])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing saved


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", "--store=false"])
    assert e.value.code == 2 and "--run_dir=" in capsys.readouterr().err


def test_resume_refuses_a_missing_broken_or_mismatched_checkpoint(tiny_run, tmp_path):
    """No silent fresh start and no raw traceback from torch: a ValueError naming the file."""
    out = tmp_path / "run"
    args = ["--preset", "tiny", f"--out={out}", "--resume", "--store=false"]
    with pytest.raises(ValueError, match="no checkpoint"):
        main(args)
    out.mkdir()
    saved = (tiny_run[0] / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match="ckpt.pt is not a readable checkpoint"):
        main(args)
    (out / "ckpt.pt").write_bytes(saved)
    with pytest.raises(ValueError, match="trained with g_ch=8, this run asks for g_ch=16"):
        main(args + ["--g_ch=16"])


def test_resume_refuses_other_data(tiny_run, tmp_path):
    """The checkpoint's tokenizer was fitted to its data, and the model's `dataset` label names one
    dataset: a resume on other data is refused, naming both."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run[0] / "ckpt.pt", out / "ckpt.pt")
    args = ["--preset", "tiny", f"--out={out}", "--resume", "--store=false", "--n_train=256"]
    with pytest.raises(ValueError, match=r"ckpt.pt was trained on dataset \w+ \(--data='shapes'\), this run's is "
                                         r"dataset \w+ \(--data='shapes'\); --n_train=\d+ then, 256 now: resume with "
                                         r"the same data"):  # what changed is named: the same --data twice told nothing
        main(args)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["dataset"]  # a checkpoint from before the hash: the procedural data's settings decide
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(ValueError, match="trained with n_train=512, this run asks for n_train=256"):
        main(args)


def test_captions_all_longer_than_the_context_are_refused_before_training(tmp_path):
    """Training would cut them all, the trained model would refuse every one as a prompt, and the
    sample grids (captions that fit) would be empty."""
    data = make_shapes(8, seed=2)
    long = [c + ", " + " ".join(f"word{i}" for i in range(40)) for c in data.captions]
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), long)
    with pytest.raises(ValueError, match=r"--context=32: every caption is longer than that \(the longest is \d+ "
                                         r"tokens with this tokenizer\); use a larger --context"):
        main(["--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
              "--store=false"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_captions_some_longer_than_the_context_are_counted_in_one_warning(caplog):
    tokenizer = Tokenizer.train(["a red circle", "a blue square"] * 10, 300)
    with caplog.at_level(logging.WARNING, logger="train_gan"):
        check_captions_fit(tokenizer, ["a red circle", "a blue square " * 20, "a red circle " * 20], 8, True)
    [record] = caplog.records
    assert "--context=8: 2 of 3 captions are longer" in record.getMessage()
    assert "raise --context" in record.getMessage()


def test_sample_grid_of_a_folder_shows_its_first_distinct_captions_that_fit():
    """A folder's images often share a caption: the grid's rows are not one prompt eight times."""
    from training.data.imagefolder import CaptionedImages
    captions = ["a cat", "a cat", "a dog", "a cat " * 30, "a dog"] + [f"a bird number {i}" for i in range(9)]
    data = CaptionedImages(torch.zeros(len(captions), 3, 8, 8, dtype=torch.uint8), captions)
    tokenizer = Tokenizer.train(captions * 5, 300)
    assert sample_prompts(data, None, tokenizer, 16) == ["a cat", "a dog"] + [f"a bird number {i}" for i in range(6)]


def test_context_too_short_for_the_evaluation_prompts_is_refused_before_training(tmp_path):
    """Not at the first evaluation, with the training before it lost (no checkpoint yet)."""
    with pytest.raises(ValueError, match=r"--context=12: the longest evaluation prompt is \d+ tokens"):
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", "--n_train=64", "--context=12",
              "--store=false"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_resume_with_more_processes_than_the_checkpoint_was_written_by():
    """Rank 0 continues its saved stream; rank 1, with none saved, starts as a fresh run's would."""
    torch.manual_seed(5)
    saved = torch.get_rng_state()
    expected = torch.rand(3)
    ckpt = {"rng": [saved]}
    restore_rng(ckpt, Dist(0, 2, torch.device("cpu")), seed=1337)
    assert torch.equal(torch.rand(3), expected)
    restore_rng(ckpt, Dist(1, 2, torch.device("cpu")), seed=1337)
    rank1 = torch.rand(3)
    torch.manual_seed(1338)
    assert torch.equal(rank1, torch.rand(3))


def test_trains_on_an_imagefolder(tmp_path):
    """Bring-your-own data: no attribute labels, so losses and grids but no accuracy."""
    data = make_shapes(24, seed=2)
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()),
                      data.captions)
    model_dir = main(["--preset", "tiny", "--data", str(tmp_path / "data"), "--out",
                      str(tmp_path / "run"), "--max_steps=2", "--eval_interval=2", "--store=false"])
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert "train_accuracy" not in metrics and metrics["n_train"] == 24
    assert (tmp_path / "run" / "samples_000002.png").is_file()
    assert ImageEngine.load(model_dir).generate([ImageRequest("a red circle", seed=1)])[0]


def test_synthesize_exports_what_the_job_reads(tiny_run, tmp_path):
    _, model_dir = tiny_run
    report = synthesize_main([str(model_dir), "--out", str(tmp_path / "synth"), "--n", "12",
                              "--cas_steps", "3", "--device", "cpu"])
    data = load_imagefolder(tmp_path / "synth", image_size=32)
    assert len(data) == 12 and len(data.attributes) == 12
    assert set(report["cas"]) == {"shape", "colour", "size", "position", "background"}


def test_synthesize_refuses_bad_counts_and_prompts_before_any_work(tiny_run, tmp_path, capsys):
    _, model_dir = tiny_run
    out = tmp_path / "synth"
    with pytest.raises(SystemExit) as e:
        synthesize_main([str(model_dir), "--out", str(out), "--n", "0"])
    assert e.value.code == 2 and "--n=0: must be >= 1" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n" + "a big blue square on the left " * 8 + "\n")
    with pytest.raises(SystemExit) as e:
        synthesize_main([str(model_dir), "--out", str(out), "--prompts", str(prompts), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--prompts {prompts}, line 3" in err and "the limit is 32" in err
    prompts.write_text("\n  \n")
    for path, why in ((prompts, "no prompts"), (tmp_path / "missing.txt", "no such file")):
        with pytest.raises(SystemExit) as e:
            synthesize_main([str(model_dir), "--out", str(out), "--prompts", str(path), "--device", "cpu"])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not out.exists()


def test_evaluator_is_accurate_on_real_data():
    """A shorter fit than the job's (800 steps on 12k images): ≥ 98 % on average over the
    attributes, and no attribute below 95 % (shape is the hardest)."""
    _, metrics = train_evaluator(ShapesConfig(), n_train=6000, steps=700, n_test=1000)
    acc = metrics["accuracy"]
    assert sum(acc.values()) / len(acc) >= 0.98 and min(acc.values()) >= 0.95, acc


def test_memorisation_metric():
    train = make_shapes(2000, seed=0).images
    threshold = near_duplicate_threshold(train)
    assert memorisation_rate(train[:200], train, threshold) > 0.99
    noise = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    assert memorisation_rate(noise, train, threshold) < 0.01
    fresh = make_shapes(200, seed=1).images  # new renders of the same distribution
    assert memorisation_rate(fresh, train, threshold) < 0.05


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, b) < 0.1
    assert frechet_distance(a, b + 1) == pytest.approx(8, rel=0.1)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_cli_saves_to_the_store(tmp_path):
    env = _env(tmp_path)
    subprocess.run([sys.executable, "-m", "training.train_gan", "--preset", "tiny",
                    "--out", str(tmp_path / "run"), "--max_steps=2"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    probe = ("import bentoml, json; m = bentoml.models.get('gan:latest'); "
             "print(json.dumps({'labels': m.info.labels, 'files': sorted(p.name for p in "
             "__import__('pathlib').Path(m.path).iterdir())}))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                         text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["labels"]["family"] == "gan" and len(info["labels"]["dataset"]) == 16
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= set(info["files"])


@pytest.mark.slow
def test_torchrun_ddp(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "training.train_gan",
                           "--preset", "tiny", "--out", str(tmp_path / "run"), "--max_steps=2",
                           "--eval_interval=2", "--store=false"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]  # the workers' traceback, if any
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "FutureWarning" not in proc.stderr  # broadcast_buffers, deprecated in torch 2.13
