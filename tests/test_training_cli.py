"""The AR image and autoencoder jobs refuse bad settings at once, naming the option (the GAN
job's cases are in test_gan_train.py), and `--resume` without a checkpoint is an error."""
import pytest

from training import ensure_defaults, train_ar_image, train_autoencoder, train_gan, train_gpt
from training.common import run_cli


@pytest.mark.parametrize("job, arg, message", [
    (train_ar_image, "--max_steps=0", "--max_steps=0: must be >= 1"),
    (train_ar_image, "--eval_interval=0", "--eval_interval=0: must be >= 1"),
    (train_ar_image, "--p_uncond=1", "--p_uncond=1.0: must be in [0, 1)"),
    (train_ar_image, "--n_embd=33", "--n_embd=33 is not divisible by --n_head=2"),
    (train_ar_image, "--patch=3", "--image_size=32 is not a multiple of --patch=3"),
    (train_ar_image, "--n_val=256", "--n_val=256 leaves no training images"),
    (train_ar_image, "--store_name=My Model", "--store_name='My Model'"),
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


@pytest.mark.parametrize("job", [train_ar_image, train_autoencoder])
def test_resume_without_a_checkpoint_is_an_error(job, tmp_path):
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        job.main(["--preset", "tiny", f"--out={tmp_path / 'run'}", "--resume", "--device=cpu"])


def test_run_cli_makes_a_user_error_one_line_with_status_2(capsys):
    def main():
        raise ValueError("--data: nope.txt does not exist")

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --data: nope.txt does not exist\n"


@pytest.mark.parametrize("bug", [lambda: {}["key"], lambda: __import__("json").loads("{")])
def test_run_cli_keeps_the_traceback_of_a_bug(bug):
    """A library's ValueError, or another type, is not a user's mistake."""
    with pytest.raises((ValueError, KeyError)):
        run_cli(bug)


def test_ensure_defaults_trains_a_default_only_when_it_is_the_configured_model(monkeypatch, capsys):
    """GPT_MODEL / GAN_MODEL naming the user's own model: the service loads that one (and names
    it at start-up if missing), so training the small default would be wasted minutes."""
    trained = []
    monkeypatch.setattr(ensure_defaults, "store_has", lambda name: False)
    monkeypatch.setattr(train_gpt, "main", lambda argv: trained.append("gpt"))
    monkeypatch.setattr(train_gan, "main", lambda argv: trained.append("gan"))
    monkeypatch.setenv("GPT_MODEL", "support-gpt")
    monkeypatch.setenv("GAN_MODEL", "")  # empty means the default, gan:latest
    ensure_defaults.main([])
    assert trained == ["gan"]
    assert "gpt: using the configured GPT_MODEL=support-gpt:latest, not training the default" in capsys.readouterr().err
    monkeypatch.setenv("GPT_MODEL", "gpt")  # the default's name alone is its latest version
    monkeypatch.delenv("GAN_MODEL")
    ensure_defaults.main([])
    assert trained == ["gan", "gpt", "gan"]
