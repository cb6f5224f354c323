"""The training jobs refuse bad settings at once, naming the option (more of the GAN job's
cases are in test_gan_train.py), `--resume` without a checkpoint is an error, and no run saves
non-finite weights or overwrites what it was not asked to."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tqdm import tqdm

from training import common, ensure_defaults, train_ar_image, train_autoencoder, train_gan, train_gpt
from training.common import (atomic_save, check_folder, check_fresh_run, check_run_folder, parse_config, restore,
                             resumable, run_cli)


@pytest.mark.parametrize("job, arg, message", [
    (train_ar_image, "--max_steps=0", "--max_steps=0: must be >= 1"),
    (train_ar_image, "--eval_interval=0", "--eval_interval=0: must be >= 1"),
    (train_ar_image, "--p_uncond=1", "--p_uncond=1.0: must be in [0, 1)"),
    (train_ar_image, "--n_embd=33", "--n_embd=33 is not divisible by --n_head=2"),
    (train_ar_image, "--patch=3", "--image_size=32 is not a multiple of --patch=3"),
    (train_ar_image, "--n_val=256", "--n_val=256 leaves no training images"),
    (train_ar_image, "--name=My Model", "--name='My Model'"),
    (train_autoencoder, "--max_steps=-1", "--max_steps=-1: must be >= 1"),
    (train_autoencoder, "--sigma=0", "--sigma=0.0: must be > 0"),
    (train_autoencoder, "--ch=12", "--ch=12: must be a multiple of 8"),
    (train_autoencoder, "--image_size=64", "--image_size=64"),
    (train_autoencoder, "--device=gpu", "--device='gpu'"),
])
def test_bad_settings_are_refused_before_training(job, arg, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        job.main(["--preset", "tiny", f"--out={tmp_path / 'run'}", arg])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("job", [train_ar_image, train_autoencoder])
def test_out_that_is_a_file_is_refused(job, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        job.main(["--preset", "tiny", f"--out={tmp_path / 'run'}"])
    assert e.value.code == 2 and "--run_dir=" in capsys.readouterr().err


@pytest.mark.parametrize("job, run_dir", [(train_ar_image, "--out"), (train_autoencoder, "--out"),
                                          (train_gpt, "--run_dir")])  # `--resume` alone in every job
def test_resume_without_a_checkpoint_is_an_error(job, run_dir, tmp_path):
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        job.main(["--preset", "tiny", f"{run_dir}={tmp_path / 'run'}", "--resume", "--device=cpu"])


def test_run_cli_makes_a_user_error_one_line_with_status_2(capsys):
    def main():
        raise ValueError("--data: nope.txt does not exist")

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --data: nope.txt does not exist\n"


@pytest.mark.parametrize("hint, said", [("", "interrupted\n"), ("try again", "interrupted: try again\n")])
def test_run_cli_says_what_a_ctrl_c_leaves_to_do(hint, said, capsys):
    """Every command told to resume "from the last checkpoint in --run_dir", training.store and
    the evaluation tools too, which have neither."""
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(main, on_interrupt=hint)
    assert e.value.code == 130 and capsys.readouterr().err == said


def test_an_interrupted_training_job_names_its_checkpoint_and_step_on_a_line_of_its_own(tmp_path, monkeypatch,
                                                                                         capsys):
    """It said "--resume=true continues from the last checkpoint in --run_dir, if one was written"
    whether or not one was, after the progress bar on the bar's own line."""
    monkeypatch.setattr(common, "_last_checkpoint", None)
    monkeypatch.delenv("RANK", raising=False)

    def main(checkpoint: bool):
        bar = tqdm(total=10, file=sys.stderr)
        bar.update(3)
        if checkpoint:
            atomic_save({"step": 3, "history": {}}, tmp_path / "ckpt.pt")
        raise KeyboardInterrupt

    for checkpoint, said in ((False, "before this run wrote or read a checkpoint: run the same command again"),
                             (True, f"{tmp_path / 'ckpt.pt'} holds step 3: --resume=true continues from it")):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: main(checkpoint), on_interrupt=resumable)
        assert e.value.code == 130
        assert capsys.readouterr().err.split("\n")[-2:] == [f"interrupted: {said}", ""]
    restore(torch.load(tmp_path / "ckpt.pt", weights_only=True), tmp_path / "ckpt.pt")
    assert resumable() == f"{tmp_path / 'ckpt.pt'} holds step 3: --resume=true continues from it"
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks write no checkpoint: they said "none yet"
    assert resumable() == ""
    monkeypatch.setenv("RANK", "0")
    check_fresh_run(tmp_path / "other" / "ckpt.pt", False)  # the next job in this process (make serve)
    assert resumable().startswith("before this run wrote or read a checkpoint")


def test_an_output_folder_that_cannot_be_written_is_refused_before_training():
    """train_gpt --out=/sys/x trained, then failed with a PermissionError traceback: its model
    never reached the store."""
    with pytest.raises(ValueError, match=r"--out=/sys/condgen-test: cannot be written in /sys"):
        check_folder("/sys/condgen-test", "--out")


@pytest.mark.parametrize("bug", [lambda: {}["key"], lambda: __import__("json").loads("{")])
def test_run_cli_keeps_the_traceback_of_a_bug(bug):
    """A library's ValueError, or another type, is not a user's mistake."""
    with pytest.raises((ValueError, KeyError)):
        run_cli(bug)


def test_ensure_defaults_trains_a_default_only_when_it_is_the_configured_model(monkeypatch, capsys):
    """GPT_MODEL / GAN_MODEL naming the user's own model: the service loads that one (and names
    it at start-up if missing), so training the small default would be wasted minutes."""
    trained = []
    monkeypatch.setattr(ensure_defaults, "store_has", lambda tag: tag == "support-gpt:latest")
    monkeypatch.setattr(train_gpt, "main", lambda argv: trained.append("gpt"))
    monkeypatch.setattr(train_gan, "main", lambda argv: trained.append("gan"))
    monkeypatch.setenv("GPT_MODEL", "support-gpt")
    monkeypatch.delenv("GAN_MODEL", raising=False)  # unset: the default, gan:latest
    ensure_defaults.main([])
    assert trained == ["gan"]
    assert "gpt: using the configured GPT_MODEL=support-gpt:latest, not training the default" in capsys.readouterr().err
    monkeypatch.setenv("GPT_MODEL", "gpt")  # the default's name alone is its latest version
    ensure_defaults.main([])
    assert trained == ["gan", "gpt", "gan"]


def test_ensure_defaults_refuses_a_configured_model_of_another_family(monkeypatch):
    """GPT_MODEL naming a GAN was taken ("using the configured GPT_MODEL") and the service then
    refused to start: it is refused here, before the default GAN's minutes of training."""
    trained = []
    monkeypatch.setattr(ensure_defaults, "store_has", lambda tag: True)
    monkeypatch.setattr(ensure_defaults, "store_family", lambda tag: "gan")
    monkeypatch.setattr(train_gan, "main", lambda argv: trained.append("gan"))
    monkeypatch.setenv("GPT_MODEL", "mygan")
    monkeypatch.delenv("GAN_MODEL", raising=False)
    with pytest.raises(ValueError, match="GPT_MODEL=mygan:latest is a 'gan' model, not a 'gpt' one"):
        ensure_defaults.main([])
    assert trained == []


def test_ensure_defaults_trains_no_model_that_is_turned_off(monkeypatch, capsys):
    """GAN_MODEL empty serves text only: the small GAN's nine minutes of training were wasted
    (empty used to mean the default)."""
    trained = []
    monkeypatch.setattr(ensure_defaults, "store_has", lambda tag: False)
    monkeypatch.setattr(train_gpt, "main", lambda argv: trained.append("gpt"))
    monkeypatch.setattr(train_gan, "main", lambda argv: trained.append("gan"))
    monkeypatch.delenv("GPT_MODEL", raising=False)
    monkeypatch.setenv("GAN_MODEL", "")
    ensure_defaults.main([])
    assert trained == ["gpt"]
    assert "gan: GAN_MODEL is empty, so the service will not serve one: not training it" in capsys.readouterr().err


def test_ensure_defaults_stops_before_training_when_a_configured_model_is_missing(monkeypatch, tmp_path):
    """GPT_MODEL naming a model the store lacks (trained into another store, say): the small
    GAN trained for nine minutes, then the service stopped, naming the missing GPT."""
    trained = []
    monkeypatch.setattr(ensure_defaults, "store_has", lambda tag: False)
    monkeypatch.setattr(train_gan, "main", lambda argv: trained.append("gan"))
    monkeypatch.setenv("GPT_MODEL", "support-gpt")
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=f"GPT_MODEL=support-gpt:latest is not in the model store at {tmp_path}"):
        ensure_defaults.main([])
    assert trained == []


def test_ensure_defaults_refuses_a_malformed_tag_in_one_line(monkeypatch, tmp_path):
    """The early check met BentoML's "Invalid Tag" exception: a traceback instead of one line."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "GPT_MODEL": "Bad Tag!",
           "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-m", "training.ensure_defaults"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]  # a user error, as elsewhere
    assert "error: GPT_MODEL='Bad Tag!' is not a model tag" in done.stderr


@pytest.mark.parametrize("cut", ["model.safetensors", "model.yaml"])
def test_ensure_defaults_names_a_version_the_store_holds_in_part(cut, bentoml_home, tmp_path):
    """A copy into the store killed half-way (SIGKILL) leaves a version without some files:
    `make serve` took one without its weights for present (the service then refused to start),
    and one without BentoML's model.yaml for "not a model tag". Both are now named, with what
    to delete, before anything is trained or served."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models" / "gpt", home / "models" / "gpt")
    version = next(d for d in (home / "models" / "gpt").iterdir() if d.is_dir())
    (version / cut).unlink()
    (home / "models" / "gpt" / "latest").unlink()  # the first version: BentoML finds it by listing
    env = {**os.environ, "BENTOML_HOME": str(home), "GAN_MODEL": "", "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("GPT_MODEL", None)
    done = subprocess.run([sys.executable, "-m", "training.ensure_defaults"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()[-1]
    if cut == "model.yaml":
        assert "the model store cannot read gpt:latest" in said and str(home / "models" / "gpt") in said, said
    else:
        assert f"gpt:{version.name} in the model store lacks model.safetensors" in said, said
        assert f"bentoml models delete gpt:{version.name}" in said


def test_ensure_defaults_resumes_a_default_that_stopped_half_way(monkeypatch, tmp_path):
    """`make serve` interrupted during training: the next start continues the run (a fresh run
    would refuse to overwrite the checkpoint)."""
    argvs = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ensure_defaults, "store_has", lambda name: False)
    monkeypatch.setattr(train_gpt, "main", lambda argv: argvs.setdefault("gpt", argv))
    monkeypatch.setattr(train_gan, "main", lambda argv: argvs.setdefault("gan", argv))
    monkeypatch.delenv("GPT_MODEL", raising=False)
    monkeypatch.delenv("GAN_MODEL", raising=False)
    (tmp_path / "runs" / "gpt-small").mkdir(parents=True)
    (tmp_path / "runs" / "gpt-small" / "ckpt.pt").write_bytes(b"")
    ensure_defaults.main([])
    assert "--resume=true" in argvs["gpt"] and "--resume=true" not in argvs["gan"]


def test_a_diverging_run_saves_nothing_with_non_finite_weights(tmp_path, capsys):
    """An infinite-ish learning rate turns the weights into NaN in the update after a finite
    loss: no checkpoint, model folder or store entry may hold them."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train_gpt.main(["--preset", "tiny", f"--run_dir={run}", "--lr=1e30", "--max_steps=3",
                                        "--ckpt_interval=1", "--store=false", f"--out={tmp_path / 'out'}"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "diverged" in err and "nothing was saved" in err, err
    assert ("\n" + err).count("\nerror: ") == 1  # on a line of its own: the open progress bar is closed first
    assert not (tmp_path / "out").exists() and not (run / "model").exists()
    if (run / "ckpt.pt").exists():  # whatever was checkpointed is finite
        state = torch.load(run / "ckpt.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values())
        assert "holds the last good state" in err
    else:
        assert "no checkpoint was written" in err


@pytest.mark.parametrize("job, argv, named", [
    (train_gpt, ["--lr=inf"], "--lr=inf"),
    (train_gpt, ["--seed=99999999999999999999"], "--seed"),
    (train_gan, ["--seed=-5"], "--seed=-5"),
    (train_ar_image, ["--codebook=100000"], "--codebook=100000"),
    (train_gan, ["--device=cuda"], "--device=cuda"),
    (train_gpt, ["--out=/etc/hostname/sub"], "is a file"),
])
def test_settings_that_would_fail_late_are_refused_first(job, argv, named, tmp_path, capsys):
    if "--device=cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: job.main(["--preset", "tiny", f"--run_dir={tmp_path / 'run'}", *argv]))
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_never_overwrites_a_checkpoint_or_a_foreign_out_folder(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"an earlier run's")
    with pytest.raises(SystemExit):
        run_cli(lambda: train_gpt.main(["--preset", "tiny", f"--run_dir={run}", "--store=false"]))
    assert "--resume=true continues it" in capsys.readouterr().err
    assert (run / "ckpt.pt").read_bytes() == b"an earlier run's"
    out.mkdir()
    (out / "important.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run_cli(lambda: train_gpt.main(["--preset", "tiny", f"--run_dir={tmp_path / 'other'}", f"--out={out}"]))
    assert "important.txt" in capsys.readouterr().err and (out / "important.txt").read_text() == "mine"


def test_an_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, fh):
        fh.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("halt", [3, 2])  # at an evaluation (every 3 steps, tiny), between two
@pytest.mark.parametrize("job", [train_ar_image, train_autoencoder, train_gan])
def test_resuming_past_max_steps_saves_the_checkpoint_s_model(job, halt, tmp_path, capsys):
    """The AR and autoencoder jobs resumed at step 3 with --max_steps=2 saved nothing, said
    nothing and exited 0: the checkpoint's training was never saved (train_gpt's rule, tested
    in test_train_gpt.py, and the GAN's: save it, saying there is nothing to train)."""
    run = tmp_path / "run"
    tiny = ["--preset", "tiny", f"--run_dir={run}"] + ([] if job is train_autoencoder else ["--store=false"])
    job.main([*tiny, f"--halt_after={halt}"])
    assert not (run / "model").exists()
    capsys.readouterr()
    job.main([*tiny, "--resume=true", "--max_steps=2"])
    assert f"is at step {halt}, --max_steps=2: nothing to train, saving its model" in capsys.readouterr().err
    assert json.loads((run / "model" / "metrics.json").read_text())["steps"] == halt


@pytest.mark.parametrize("job", [train_gpt, train_ar_image])
def test_resuming_under_another_number_of_processes_warns(job, tmp_path, capsys):
    """A checkpoint of a 2-process torchrun resumed in one process (or the reverse) went on in
    silence with other batches and half the examples per step (train_gan warned)."""
    run = tmp_path / "run"
    tiny = ["--preset", "tiny", f"--run_dir={run}", "--store=false"]
    job.main([*tiny, "--halt_after=3"])
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    assert ckpt["world_size"] == 1
    torch.save({**ckpt, "world_size": 2}, run / "ckpt.pt")
    capsys.readouterr()
    job.main([*tiny, "--resume=true", "--halt_after=1"])
    err = capsys.readouterr().err
    assert "warning: the checkpoint was written by 2 process(es), this run has 1: its batches" in err


def test_a_checkpoint_of_another_job_is_named_as_such(tmp_path, capsys):
    run = tmp_path / "run"
    train_gpt.main(["--preset", "tiny", f"--run_dir={run}", "--store=false", "--halt_after=2"])
    with pytest.raises(SystemExit):
        run_cli(lambda: train_gan.main(["--preset", "tiny", f"--run_dir={run}", "--resume=true", "--store=false"]))
    assert "is a checkpoint of the gpt job, not of gan" in capsys.readouterr().err


def test_a_store_name_that_holds_another_family_is_refused_before_training(monkeypatch, tmp_path):
    """train_gpt --name=mygan put a GPT under a name that held GANs: GAN_MODEL=mygan then
    stopped the service ("is a 'gpt' model")."""
    from training import common, store

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    monkeypatch.setattr(store, "store_family", lambda name: {"mygan": "gan"}.get(name))
    with pytest.raises(ValueError, match="--name=mygan: the store's mygan holds 'gan' models"):
        common.check_outputs("mygan", True, "", "gpt")
    common.check_outputs("mygan", True, "", "gan")  # another version of the same family
    common.check_outputs("mine", True, "", "gpt")
    common.check_outputs("mygan", False, "", "gpt")  # not saved to the store


def test_compare_generators_refuses_models_of_your_own_images_in_one_line(tmp_path):
    """It ended in a TypeError traceback (ShapesConfig(**None)) for a model trained with --data."""
    from training import compare_generators

    config = {"family": "gan", "data": {"source": "my/images", "shapes": None}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="a model was trained on my/images: the comparison grades"):
        compare_generators.run(compare_generators.CompareConfig(gan=str(tmp_path), ar="", ae="", vae=""))
    with pytest.raises(ValueError, match="no model to compare"):
        compare_generators.run(compare_generators.CompareConfig(gan="", ar="", ae="", vae=""))


def test_a_model_folder_goes_into_the_store_by_command(bentoml_home, tmp_path):
    """A job's --out folder, or imported GPT-2 weights, had no documented way into the store
    (GPT_MODEL takes store tags only). `python -m training.store DIR` loads it first, as the
    service will, names it by its family unless told otherwise, and errs in one line."""
    import shutil

    src = next((bentoml_home / "models" / "gpt").glob("*/config.json")).parent
    folder = tmp_path / "my-model"
    shutil.copytree(src, folder)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}

    def store(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.store", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    done = store(str(folder), "--name", "support-gpt")
    assert done.returncode == 0 and done.stdout.startswith("support-gpt:"), done.stderr[-2000:]
    version = done.stdout.strip().split(":")[1]
    stored = tmp_path / "home" / "models" / "support-gpt" / version
    assert (stored / "model.safetensors").is_file()
    # readable by a server running as another user, as the store's folders are (BentoML made it 0700)
    assert stored.stat().st_mode & 0o777 == stored.parent.stat().st_mode & 0o777
    assert (stored / "model.safetensors").stat().st_mode & 0o777 == (stored / "config.json").stat().st_mode & 0o777
    (folder / "config.json").write_text((src / "config.json").read_text().replace('"gpt"', '"gan"', 1))
    refused = store(str(folder), "--name", "support-gpt")
    assert refused.returncode == 2 and "the store's support-gpt holds 'gpt' models" in refused.stderr
    (folder / "config.json").write_text((src / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not weights")
    broken = store(str(folder), "--name", "other")
    assert broken.returncode == 2 and "model.safetensors" in broken.stderr and "Traceback" not in broken.stderr
    assert store(str(tmp_path)).returncode == 2  # no config.json

    # A Hugging Face GPT-2 folder is imported on the way (it had to be imported by hand first)
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.engine import TextEngine
    from models.tokenizer import Tokenizer

    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=40, n_embd=48, n_layer=2, n_head=4)).save_pretrained(
        hf_dir, safe_serialization=True)
    lacking = store(str(hf_dir))
    assert lacking.returncode == 2 and "a Hugging Face GPT-2 folder without tokenizer.json" in lacking.stderr
    words = [" ".join(f"w{i * 7919 % 100_000}" for i in range(5000))]  # merges enough for 400 tokens
    Tokenizer.train(words, 300).save(hf_dir / "tokenizer.json")
    imported = store(str(hf_dir), "--name", "hf-gpt2")
    assert imported.returncode == 0 and imported.stdout.startswith("hf-gpt2:"), imported.stderr[-2000:]
    stored = next((tmp_path / "home" / "models" / "hf-gpt2").glob("*/config.json")).parent
    assert TextEngine.load(stored).model.config.n_layer == 2
    Tokenizer.train(words, 400).save(hf_dir / "tokenizer.json")  # more tokens than the model's 320
    too_big = store(str(hf_dir), "--name", "hf-gpt2")  # named by the user's folder, not the import's
    assert too_big.returncode == 2 and str(hf_dir / "tokenizer.json") in too_big.stderr, too_big.stderr[-2000:]
    (hf_dir / "tokenizer.json").write_text("{not json")
    broken = store(str(hf_dir), "--name", "hf-gpt2")  # was a traceback from the tokenizers library
    assert broken.returncode == 2 and str(hf_dir / "tokenizer.json") in broken.stderr, broken.stderr[-2000:]
    assert "Traceback" not in broken.stderr and not list((tmp_path / "home").glob(".import-*"))


@pytest.mark.parametrize("sigint", ["delivered", "ignored"])
def test_a_ctrl_c_while_the_store_copies_a_model_leaves_it_whole(bentoml_home, tmp_path, sigint):
    """BentoML copies a new version into the store's folder and cleans up after an Exception
    only: a Ctrl-C during that copy left a half-written version, which `name:latest` named when
    it was the first. The copy now finishes, and what follows it (the version's permissions,
    BentoML's removal of its temporary folder: both were skipped); then the command stops as
    interrupted (130), naming the stored version (a training job said to resume, which stored
    a second copy). A process that ignores SIGINT (a job started in the background, as a CI
    script's `cmd &`) goes on ignoring it: it said "interrupted", then finished with 0."""
    src = next((bentoml_home / "models" / "gpt").glob("*/config.json")).parent
    handler = "signal.default_int_handler" if sigint == "delivered" else "signal.SIG_IGN"
    code = ("import os, shutil, signal, sys\n"
            f"signal.signal(signal.SIGINT, {handler})\n"  # whatever the test runner's own SIGINT does
            "from training import store\n"
            "from training.common import resumable, run_cli\n"
            "copytree = shutil.copytree\n"
            "def interrupted_copy(*args, **kwargs):\n"  # the store's copy: Ctrl-C as it begins
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return copytree(*args, **kwargs)\n"
            "shutil.copytree = interrupted_copy\n"
            "run_cli(lambda: store.main([sys.argv[1], '--name', 'held']), on_interrupt=resumable)\n")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True",
           "TMPDIR": str(tmp_path / "tmp")}
    done = subprocess.run([sys.executable, "-c", code, str(src)], env=env, capture_output=True, text=True, timeout=120)
    if sigint == "ignored":
        assert done.returncode == 0 and "interrupted" not in done.stderr, done.stderr[-2000:]
        assert len([d for d in (tmp_path / "home" / "models" / "held").iterdir() if d.is_dir()]) == 1
        return
    assert done.returncode == 130, done.stderr[-2000:]
    assert "stopping once the model is in the store" in done.stderr
    versions = [d for d in (tmp_path / "home" / "models" / "held").iterdir() if d.is_dir()]
    assert len(versions) == 1
    assert f"interrupted: held:{versions[0].name} is in the model store" in done.stderr
    assert versions[0].stat().st_mode & 0o777 == versions[0].parent.stat().st_mode & 0o777
    assert not list((tmp_path / "tmp").glob("bentoml-model-*"))
    for f in src.iterdir():
        if f.is_file() and f.name != "model.yaml":
            assert (versions[0] / f.name).read_bytes() == f.read_bytes(), f.name
    latest = (tmp_path / "home" / "models" / "held" / "latest").read_text()
    assert latest == versions[0].name


def test_a_run_refused_after_its_tokenizer_leaves_no_file(tmp_path):
    """A run refused once its tokenizer was trained (captions longer than --context) left
    tokenizer.json in its run folder: the tokenizer now lives in the checkpoints and the model."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="--context=2"):
        train_gan.main(["--preset", "tiny", f"--run_dir={run}", "--context=2", "--store=false"])
    assert not run.exists() or not any(run.iterdir())


def test_a_tool_never_replaces_a_run_folders_evaluator_of_other_settings(tmp_path):
    """classifier_ascent (or compare_generators) pointed at a training run's folder retrained and
    replaced its evaluator: the run's later evaluations no longer compared with its earlier ones."""
    from training import classifier_ascent

    evaluator = tmp_path / "run" / "evaluator"
    evaluator.mkdir(parents=True)
    (evaluator / "config.json").write_text('{"family": "evaluator", "image_size": 64}')
    cfg = classifier_ascent.AscentConfig(run=str(tmp_path / "run"), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="its evaluator/ was trained with other settings"):
        classifier_ascent.run(cfg)
    assert json.loads((evaluator / "config.json").read_text()) == {"family": "evaluator", "image_size": 64}


@pytest.mark.parametrize("job", [train_gan, train_ar_image, train_autoencoder])
def test_a_fresh_image_run_refuses_a_folder_of_someone_elses_files(job, tmp_path, capsys):
    """The image jobs' --out names their run folder: given a folder of the user's own, a fresh run
    wrote its files beside theirs and overwrote a history.json of theirs. A folder of a run's
    files only (an interrupted first `make serve` leaves its evaluator/) is still taken."""
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(SystemExit) as e:
        job.main(["--preset", "tiny", f"--out={tmp_path}"])
    assert e.value.code == 2 and "holds files that are not a training run's (notes.md)" in capsys.readouterr().err
    (tmp_path / "notes.md").unlink()
    for name in ("evaluator", "model"):
        (tmp_path / name).mkdir()
    (tmp_path / "history.json").write_text("{}")
    check_run_folder(str(tmp_path))


def test_help_shows_the_chosen_presets_values(capsys):
    """`train_gpt --preset tiny --help` listed the small preset's values (the dataclass's
    defaults), which the tiny run does not use."""
    with pytest.raises(SystemExit):
        parse_config(train_gpt.TrainGPTConfig, train_gpt.PRESETS, ["--preset", "tiny", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "embedding width (--preset tiny: 32)" in shown and "(--preset tiny: 'runs/gpt-tiny')" in shown
    with pytest.raises(SystemExit):
        parse_config(train_gpt.TrainGPTConfig, train_gpt.PRESETS, ["--help"])
    assert "embedding width (--preset small: 128)" in " ".join(capsys.readouterr().out.split())


def test_an_abbreviated_or_doubled_option_is_refused(tmp_path, capsys):
    """argparse took --max_step for --max_steps in silence, and an image job given both --run_dir
    and --out (its other name) used the last one."""
    from training import train_gan, train_gpt

    with pytest.raises(SystemExit):
        train_gpt.main(["--preset", "tiny", "--max_step=3", f"--run_dir={tmp_path / 'gpt'}"])
    assert "unrecognized arguments: --max_step=3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--run_dir and --out name one folder, the run's: got .*a, .*b"):
        train_gan.main(["--preset", "tiny", f"--run_dir={tmp_path / 'a'}", f"--out={tmp_path / 'b'}"])
    assert train_gan.run_dir_argv(["--out", "x", "--run_dir=x"]) == ["--run_dir", "x", "--run_dir=x"]
