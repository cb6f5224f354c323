"""The raster-scan AR image model: code book, 2-D positions, causality, the shared sampler
(cached decoding against the plain path), guidance, seeds, and the training job end to end."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import models.ar_image as ar
import models.sampling
from models.ar_image import (ARImageConfig, ARImageEngine, ARImageModel, decode_tokens,
                             encode_images, fit_codebook, guide, reference_sample_tokens,
                             sample_tokens)
from models.errors import InvalidParameter
from models.image_engine import ImageRequest
from models.sampling import RowRandom, SamplingBatch, SamplingParams
from models.text_encoder import encode_prompts
from models.tokenizer import Tokenizer
from training.data.imagefolder import write_imagefolder
from training.data.shapes import make_shapes
from training import train_ar_image
from training.train_ar_image import main
from tests_support import record_checkpoints

TINY = ["--preset", "tiny", "--store=false"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a red circle on the left", "a blue square at the top"] * 10, 300)


@pytest.fixture(scope="module")
def model() -> ARImageModel:
    """Random weights, 8×8 pixels, one token per pixel: 64 steps, milliseconds each."""
    torch.manual_seed(0)
    cfg = ARImageConfig(image_size=8, patch=1, codebook=16, n_layer=2, n_head=2, n_embd=32,
                        vocab_size=300, context=16, text_dim=32, guidance_scale=2.0)
    m = ARImageModel(cfg)
    m.codebook.copy_(torch.rand(16, 3))
    return m.eval()


def test_codebook_reconstructs_shapes():
    images = make_shapes(400, seed=3).images
    for patch, k, limit in ((1, 32, 8.0), (2, 64, 12.0)):  # RMSE in 0-255 levels
        codebook = fit_codebook(images[:300], k, patch, n_vectors=20_000, iters=10)
        tokens = encode_images(images[300:], codebook, patch)
        assert tokens.shape == (100, (32 // patch) ** 2) and int(tokens.max()) < k
        rec = decode_tokens(tokens, codebook, patch)
        rmse = float((rec.float() - images[300:].float()).square().mean().sqrt())
        assert rmse < limit, (patch, k, rmse)


def test_2d_positions_distinguish_rows_and_columns(model):
    G = model.cfg.grid
    pos = torch.arange(G * G)
    enc = model.pos_emb(pos).detach()                                      # (L, C)
    assert torch.cdist(enc, enc).add(torch.eye(G * G) * 1e9).min() > 1e-3  # all distinct
    grid = enc.view(G, G, -1)                                              # (row, col, C)
    # One row down is the same step wherever the column is: rows and columns are separate axes...
    down = grid[1:] - grid[:-1]                                            # (G-1, G, C)
    assert torch.allclose(down, down[:, :1].expand_as(down), atol=1e-6)
    # ...and (r, c) is not (c, r).
    assert not torch.allclose(grid[1, 2], grid[2, 1])
    # The vertical neighbour shares the column embedding: raster order puts it G tokens away.
    assert torch.allclose(enc[G] - model.row_emb.weight[1], enc[0] - model.row_emb.weight[0])


def test_a_later_token_never_changes_earlier_logits(model, tokenizer):
    L = model.cfg.seq_len
    ids, mask = encode_prompts(tokenizer, ["a red circle"] * 2, model.cfg.context)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (2, L), generator=g)
    b = a.clone()
    j = 37
    b[:, j] = (a[:, j] + 1) % 16
    with torch.no_grad():
        la, lb = model(a, ids, mask)[0], model(b, ids, mask)[0]            # (2, L, K)
    assert torch.equal(la[:, :j + 1], lb[:, :j + 1])  # logits[:, i] reads tokens[:, :i] only
    assert not torch.allclose(la[:, j + 1], lb[:, j + 1])


def _contexts(model, tokenizer, prompts):
    ids, mask = encode_prompts(tokenizer, prompts, model.cfg.context)
    null_ids, null_mask = encode_prompts(tokenizer, [""] * len(prompts), model.cfg.context)
    return ids, mask, null_ids, null_mask


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cached_decoding_matches_the_plain_path(model, tokenizer, scale):
    """KV cache + guidance rows against recomputing the prefix every step: same tokens."""
    ids, mask, null_ids, null_mask = _contexts(model, tokenizer, ["a red circle", "a blue square"])
    params = SamplingBatch.from_params([SamplingParams(temperature=1.0),
                                        SamplingParams(temperature=0.8, top_k=5, top_p=0.9)])
    scales = torch.full((2, 1), scale)
    fast = sample_tokens(model, model.text_context(ids, mask), model.text_context(null_ids, null_mask),
                         params, [RowRandom(s) for s in (1, 2)], scales)
    slow = reference_sample_tokens(model, ids, mask, null_ids, null_mask, params,
                                   [RowRandom(s) for s in (1, 2)], scales)
    assert fast.shape == (2, model.cfg.seq_len)
    assert torch.equal(fast, slow)


def test_sampling_goes_through_the_shared_sampler(model, tokenizer, monkeypatch):
    """One implementation: models.sampling.sample, once per token; no other sampler runs."""
    assert ar.sample is models.sampling.sample
    calls = []

    def spy(logits, params, randoms, seen=None):
        calls.append(logits.shape)
        return models.sampling.sample(logits, params, randoms, seen)

    def forbidden(*args, **kwargs):
        raise AssertionError("a second sampler ran")

    monkeypatch.setattr(ar, "sample", spy)
    monkeypatch.setattr(torch, "multinomial", forbidden)
    engine = ARImageEngine(model, tokenizer, device="cpu")
    engine.generate([ImageRequest("a red circle", seed=0, n=3)])
    assert len(calls) == model.cfg.seq_len and all(s == (3, 16) for s in calls)


def test_guidance_mix():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.equal(guide(cond, uncond, torch.ones(3, 1)), cond)
    assert torch.allclose(guide(cond, uncond, torch.zeros(3, 1)), uncond)
    assert torch.allclose(guide(cond, uncond, torch.full((3, 1), 3.0)), uncond + 3 * (cond - uncond))


def test_seeds_and_batch_independence(model, tokenizer):
    engine = ARImageEngine(model, tokenizer, device="cpu")
    a = ImageRequest("a red circle on the left", seed=5, n=2)
    alone = engine.generate([a])[0]
    again = engine.generate([a])[0]
    assert all(np.array_equal(x, y) for x, y in zip(alone, again))
    assert alone[0].shape == (8, 8, 3) and alone[0].dtype == np.uint8
    # Image i is seeded with seed + i.
    shifted = engine.generate([ImageRequest("a red circle on the left", seed=6, n=1)])[0]
    assert np.array_equal(alone[1], shifted[0])
    # Neighbours in the batch (other prompts, other guidance) change nothing.
    mixed = engine.generate([ImageRequest("a blue square", seed=1, n=3, guidance_scale=1.0), a,
                             ImageRequest("a blue square", seed=9, n=1, truncation=0.5)])
    assert all(np.array_equal(x, y) for x, y in zip(alone, mixed[1]))
    assert [len(m) for m in mixed] == [3, 2, 1]
    other = engine.generate([ImageRequest("a red circle on the left", seed=99, n=2)])[0]
    assert not all(np.array_equal(x, y) for x, y in zip(alone, other))


def test_negative_prompt_is_the_unconditional_branch(model, tokenizer):
    """A negative prompt takes the empty caption's place in guidance (as in AUTOMATIC1111):
    the engine's images equal the plain path given that prompt as its unconditional context,
    whatever shares the batch; at scale 1 it has no effect."""
    engine = ARImageEngine(model, tokenizer, device="cpu")
    req = ImageRequest("a red circle", seed=4, guidance_scale=2.5, negative_prompt="a blue square")
    alone = engine.generate([req])[0][0]
    ids, mask = encode_prompts(tokenizer, ["a red circle"], model.cfg.context)
    neg_ids, neg_mask = encode_prompts(tokenizer, ["a blue square"], model.cfg.context)
    params = SamplingBatch.from_params([engine.settings(req)[0]])
    tokens = reference_sample_tokens(model, ids, mask, neg_ids, neg_mask, params, [RowRandom(4)],
                                     torch.full((1, 1), 2.5))
    assert np.array_equal(alone, decode_tokens(tokens, model.codebook, model.cfg.patch)[0].permute(1, 2, 0).numpy())
    mixed = engine.generate([ImageRequest("a blue square", seed=1, guidance_scale=2.5), req])
    assert np.array_equal(mixed[1][0], alone)
    plain = engine.generate([ImageRequest("a red circle", seed=4, guidance_scale=2.5)])[0][0]
    assert not np.array_equal(plain, alone)
    unguided = [engine.generate([ImageRequest("a red circle", seed=4, guidance_scale=1.0, negative_prompt=neg)])[0][0]
                for neg in ("", "a blue square")]
    assert np.array_equal(*unguided)


def test_request_sampler_fields(model, tokenizer):
    """temperature 0 is greedy: the seed no longer matters; top_k=1 is greedy too."""
    engine = ARImageEngine(model, tokenizer, device="cpu")
    for fields in (dict(temperature=0.0), dict(top_k=1)):
        a, b = engine.generate([ImageRequest("a red circle", seed=1, **fields),
                                ImageRequest("a red circle", seed=2, **fields)])
        assert np.array_equal(a[0], b[0]), fields
    a, b = engine.generate([ImageRequest("a red circle", seed=1), ImageRequest("a red circle", seed=2)])
    assert not np.array_equal(a[0], b[0])


def test_validation(model, tokenizer):
    engine = ARImageEngine(model, tokenizer, device="cpu")
    bad = [(ImageRequest("", seed=0), "prompt"), (ImageRequest("x", seed=-1), "seed"),
           (ImageRequest("x", seed=0, n=0), "n"), (ImageRequest("x", seed=0, truncation=0.0), "truncation"),
           (ImageRequest("x", seed=0, guidance_scale=-1.0), "guidance_scale"),
           (ImageRequest("x", seed=0, guidance_scale=float("nan")), "guidance_scale"),
           (ImageRequest("x", seed=0, temperature=-0.5), "temperature"),
           (ImageRequest("x", seed=0, top_k=-1), "top_k"),
           (ImageRequest("a " * 40, seed=0), "prompt"),
           (ImageRequest("x", seed=0, negative_prompt="a " * 40), "negative_prompt"),
           (ImageRequest("x", seed=0, negative_prompt=None), "negative_prompt")]
    for req, param in bad:
        with pytest.raises(InvalidParameter) as e:
            engine.validate(req)
        assert e.value.param == param
    assert engine.evaluations_per_image() == 2 * model.cfg.seq_len
    assert engine.evaluations_per_image(1.0) == model.cfg.seq_len


# ------------------------------------------------------------------------ the training job

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny job with --store on, its one BentoML call recorded instead of made (the
    store itself is training.store's business): the name and labels are what is checked."""
    out = tmp_path_factory.mktemp("ar") / "run"
    stored = []

    def fake_save(name, model_dir, labels, metadata=None):
        stored.append((name, Path(model_dir), labels))
        return f"{name}:test"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_ar_image, "save_to_store", fake_save)
        model_dir = main(["--preset", "tiny", f"--out={out}"])
    return out, model_dir, stored


def test_tiny_run_trains_evaluates_and_saves(tiny_run):
    out, model_dir, stored = tiny_run
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]
    assert all(np.isfinite(h["val_loss"]) and "coverage" in h for h in history)
    assert (out / "samples_000006.png").is_file() and (out / "curves.png").is_file()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for key in ("train_accuracy", "heldout_accuracy", "coverage", "fd", "memorisation",
                "unguided", "evaluations_per_image", "val_loss", "dataset"):
        assert key in metrics, key
    assert metrics["evaluations_per_image"] == 2 * metrics["unguided"]["evaluations_per_image"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["family"] == "ar_image" and config["data"]["hash"] == metrics["dataset"]
    assert stored == [("ar_image", model_dir, {"family": "ar_image", "dataset": metrics["dataset"]})]
    engine = ARImageEngine.load(model_dir, device="cpu")
    images = engine.generate([ImageRequest("a red circle on the left", seed=0, n=2)])[0]
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    # The code book is part of the weights: a fresh load decodes with the trained entries.
    assert torch.equal(load_file(str(model_dir / "model.safetensors"))["codebook"],
                       engine.model.codebook)


def test_resume_continues_where_it_stopped(tiny_run, tmp_path):
    """--halt_after 3, then --resume to 6: the same weights as 6 steps in one go."""
    first, straight, _ = tiny_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(first / "evaluator", out / "evaluator")  # cached: no need to train it again
    main([*TINY, f"--run_dir={out}", "--halt_after=3"])
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 3
    resumed = main([*TINY, "--out", str(out), "--resume"])
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ckpt_interval_checkpoints_between_evaluations(tiny_run, tmp_path, monkeypatch):
    """Evaluations every 3 steps (tiny), checkpoints every 2 besides; a run stopped after step
    4's checkpoint resumes to the same weights as one run."""
    first, straight, _ = tiny_run
    out, saved = tmp_path / "run", record_checkpoints(monkeypatch, train_ar_image, stop_after=4)
    out.mkdir()
    shutil.copytree(first / "evaluator", out / "evaluator")
    with pytest.raises(KeyboardInterrupt):
        main([*TINY, f"--run_dir={out}", "--ckpt_interval=2"])
    assert saved == [2, 3, 4]
    monkeypatch.undo()
    resumed = main([*TINY, "--out", str(out), "--resume"])
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_loader_rejects_another_family(tiny_run, tmp_path):
    _, model_dir, _ = tiny_run
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "family": "gan"}))
    with pytest.raises(ValueError, match="ar_image"):
        ARImageEngine.load(bad, device="cpu")


def test_bad_holdout_is_refused_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, f"--run_dir={tmp_path / 'run'}", "--holdout=red:square,red:triangle,red:cross"])
    assert e.value.code == 2 and "leaves red with one shape (circle)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_context_too_short_for_the_evaluation_prompts_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"--context=12: the longest evaluation prompt is \d+ tokens"):
        main([*TINY, f"--run_dir={tmp_path / 'run'}", "--n_train=64", "--n_val=8", "--context=12"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_an_empty_holdout_evaluates_without_heldout_metrics(tmp_path):
    out = tmp_path / "run"
    main([*TINY, f"--run_dir={out}", "--holdout=", "--n_train=64", "--n_val=8", "--max_steps=2",
          "--halt_after=1"])
    row = json.loads((out / "history.json").read_text())[-1]
    assert row["step"] == 1 and "coverage" in row and "heldout_colour" not in row


def test_n_val_that_leaves_no_folder_images_is_refused_when_the_folder_is_read(tmp_path):
    data = make_shapes(10, seed=2)
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), data.captions)
    with pytest.raises(ValueError, match=f"--n_val=32 leaves no training images of the 10 in {tmp_path / 'data'}"):
        main([*TINY, f"--run_dir={tmp_path / 'run'}", f"--data={tmp_path / 'data'}"])


def test_a_folder_run_records_its_image_count_and_refuses_a_resume_on_other_data(tmp_path):
    """config.json's data.n_train counts the folder's images (the last --n_val kept apart), not the
    procedural preset's --n_train; the checkpoint resumes only on the data it was trained on."""
    data = make_shapes(40, seed=2)
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), data.captions)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "No artists with labels")  # matplotlib's, for an empty evaluator plot
        model_dir = main([*TINY, f"--run_dir={out}", f"--data={tmp_path / 'data'}", "--n_val=8", "--max_steps=2"])
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["data"]["n_train"], config["data"]["n_val"]) == (40, 8)
    assert json.loads((model_dir / "metrics.json").read_text())["n_train"] == 32
    with pytest.raises(ValueError, match=r"ckpt.pt was trained on dataset \w+ \(--data='.*data'\), this run's is "
                                         r"dataset \w+ \(--data='shapes'\): resume with the same data"):
        main([*TINY, f"--run_dir={out}", "--n_val=8", "--max_steps=4", "--resume"])


def test_captions_all_longer_than_the_context_are_refused_before_training(tmp_path):
    data = make_shapes(8, seed=2)
    long = [c + ", " + " ".join(f"word{i}" for i in range(40)) for c in data.captions]
    write_imagefolder(tmp_path / "data", list(data.images.permute(0, 2, 3, 1).numpy()), long)
    with pytest.raises(ValueError, match=r"--context=32: every caption is longer than that"):
        main([*TINY, f"--run_dir={tmp_path / 'run'}", f"--data={tmp_path / 'data'}", "--n_val=2"])
    assert not (tmp_path / "run" / "ckpt.pt").exists()
