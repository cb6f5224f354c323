"""Autoencoder baselines: the losses, the fitted latent Gaussian, the engine's seeds and
priors, and the training job at the tiny preset."""
import json

import numpy as np
import pytest
import torch

from models.autoencoder import AEConfig, AutoEncoder, LatentEngine
from models.image_engine import ImageRequest
from models.text_encoder import encode_prompts
from models.tokenizer import Tokenizer
from training.data.imagefolder import write_imagefolder
from training.data.shapes import make_shapes
from training.train_autoencoder import main
from tests_support import record_checkpoints


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a red circle on the left", "a blue square at the top"] * 10, 300)


def _model(variational: bool) -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(AEConfig(z_dim=8, ch=8, variational=variational, vocab_size=300, context=16,
                                text_dim=16))


@pytest.mark.parametrize("variational", [False, True])
def test_forward_and_loss(tokenizer, variational):
    model = _model(variational).train()
    data = make_shapes(8, seed=0)
    x = data.images.float() / 127.5 - 1
    ids, mask = encode_prompts(tokenizer, data.captions, 16)
    recon, loss, parts = model(x, ids, mask)
    assert recon.shape == x.shape and recon.abs().max() <= 1
    assert torch.isfinite(loss) and loss.requires_grad
    assert (parts["kl"] > 0) == variational
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_fitted_gaussian_matches_the_codes():
    model = _model(False).eval()
    images = make_shapes(300, seed=1).images
    model.fit_latent_gaussian(images, batch=128)
    with torch.no_grad():
        codes = model.encode(images.float() / 127.5 - 1)[0].double()
    assert torch.allclose(model.latent_mean.double(), codes.mean(0), atol=1e-4)
    L = model.latent_scale_tril.double()
    assert torch.allclose(L @ L.T, torch.cov(codes.T), atol=1e-3)


def test_engine_seeds_priors_and_batching(tokenizer):
    model = _model(True).eval()
    model.latent_mean.fill_(3.0)  # makes the two priors visibly different
    std = LatentEngine(model, tokenizer, "standard", device="cpu")
    fit = LatentEngine(model, tokenizer, "fitted", device="cpu")
    req = ImageRequest("a red circle", seed=4, n=2)
    a, b = std.generate([req])[0], std.generate([req])[0]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0].shape == (32, 32, 3)
    assert np.array_equal(a[1], std.generate([ImageRequest("a red circle", seed=5)])[0][0])
    mixed = std.generate([ImageRequest("a blue square", seed=0, n=3), req])
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, mixed[1]))
    assert not np.array_equal(a[0], fit.generate([req])[0][0])
    with pytest.raises(ValueError, match="prior"):
        LatentEngine(model, tokenizer, "uniform")


def test_tiny_vae_run(tmp_path, monkeypatch):
    import training.train_autoencoder as job

    out, saved = tmp_path / "run", record_checkpoints(monkeypatch, job)
    model_dir = main(["--preset", "tiny", f"--out={out}", "--variational=true", "--ckpt_interval=2"])
    assert saved == [2, 3, 4, 6]  # with each evaluation (every 3 steps), and every 2 besides
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for prior in ("standard", "fitted"):
        assert {"train_accuracy", "coverage", "fd", "memorisation"} <= set(metrics[prior])
        assert (out / f"samples_{prior}.png").is_file()
    assert metrics["evaluations_per_image"] == 1 and (out / "recon.png").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["family"] == "autoencoder" and config["variational"] is True
    engine = LatentEngine.load(model_dir, prior="fitted", device="cpu")
    assert engine.generate([ImageRequest("a red circle", seed=0)])[0][0].shape == (32, 32, 3)


def test_bad_holdout_is_refused_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", "--holdout=red:square,red:triangle,red:cross"])
    assert e.value.code == 2 and "leaves red with one shape (circle)" in capsys.readouterr().err


def test_n_val_that_leaves_no_folder_images_is_refused_when_the_folder_is_read(tmp_path):
    data = make_shapes(10, seed=2)
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), data.captions)
    with pytest.raises(ValueError, match="--n_val=32 leaves no training images of the 10"):
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", f"--data={tmp_path / 'data'}"])


def test_context_too_short_for_the_evaluation_prompts_is_refused_before_training(tmp_path):
    """Otherwise the final evaluation, after all the training, would fail."""
    with pytest.raises(ValueError, match=r"--context=12: the longest evaluation prompt is \d+ tokens"):
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", "--n_train=64", "--n_val=8", "--context=12"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_a_folder_run_records_its_image_count_and_refuses_a_resume_on_other_data(tmp_path):
    """As the GAN and AR jobs: config.json's data.n_train counts the folder's images, not the
    preset's --n_train, and the checkpoint resumes only on the data it was trained on."""
    data = make_shapes(40, seed=2)
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), data.captions)
    out = tmp_path / "run"
    model_dir = main(["--preset", "tiny", f"--out={out}", f"--data={tmp_path / 'data'}", "--n_val=8", "--max_steps=2"])
    assert json.loads((model_dir / "config.json").read_text())["data"]["n_train"] == 40
    with pytest.raises(ValueError, match=r"was trained on dataset \w+ \(--data='.*data'\), this run's is dataset"):
        main(["--preset", "tiny", f"--out={out}", "--n_val=8", "--max_steps=4", "--resume"])


def test_captions_all_longer_than_the_context_are_refused_before_training(tmp_path):
    data = make_shapes(8, seed=2)
    long = [c + ", " + " ".join(f"word{i}" for i in range(40)) for c in data.captions]
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), long)
    with pytest.raises(ValueError, match=r"every caption is longer than that"):
        main(["--preset", "tiny", f"--out={tmp_path / 'run'}", f"--data={tmp_path / 'data'}", "--n_val=2"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()
