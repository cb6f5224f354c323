"""GAN networks and the image engine: shapes, augmentation, and the seed contract
(a request's images depend on its own prompt, seed and parameters only)."""
import json

import numpy as np
import pytest
import torch

from models.artifacts import ArtifactError, save_model_dir
from models.errors import InvalidParameter
from models.gan import (Discriminator, GANConfig, Generator, d_hinge_loss, diff_augment,
                        g_hinge_loss, mode_seeking_loss, r1_penalty)
from models.image_engine import ImageEngine, ImageRequest, ImageRequests, generate_in_passes, latents, to_uint8
from models.text_encoder import encode_prompts, trim_padding
from models.tokenizer import Tokenizer

CAPTIONS = ["a small red circle on the left, blue background",
            "blue backdrop with a little crimson disc at the left",
            "a large green square at the top on white", "a purple cross in the middle"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CAPTIONS, 300)


def tiny_config(**kw) -> GANConfig:
    base = dict(z_dim=16, g_ch=8, d_ch=8, text_dim=32, vocab_size=320, context=24)
    return GANConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    return ImageEngine(Generator(tiny_config()), tokenizer, device="cpu")


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminator_shapes(tokenizer, size):
    cfg = tiny_config(image_size=size)
    G, D = Generator(cfg), Discriminator(cfg)
    ids, mask = encode_prompts(tokenizer, CAPTIONS[:3], cfg.context)
    assert ids.shape == mask.shape == (3, cfg.context)
    x = G(torch.randn(3, cfg.z_dim), ids, mask)
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    assert D(x, ids, mask).shape == (3,)
    pairs = torch.tensor([[0, 0], [1, 0], [2, 1], [0, 2]])
    assert D(x, ids, mask, pairs).shape == (4,)
    with pytest.raises(ValueError):
        GANConfig(image_size=48)


def test_losses_and_augmentation_are_differentiable(tokenizer):
    cfg = tiny_config()
    G, D = Generator(cfg), Discriminator(cfg)
    ids, mask = encode_prompts(tokenizer, CAPTIONS[:4], cfg.context)
    fake = G(torch.randn(4, cfg.z_dim), ids, mask)
    aug = diff_augment(fake, "translation,cutout")
    assert aug.shape == fake.shape and not torch.equal(aug, fake)
    g_hinge_loss(D(aug, ids, mask)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())
    real = D(torch.zeros_like(fake), ids, mask)
    assert torch.isfinite(d_hinge_loss(real, real, real))
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment(fake, "color")


def test_r1_penalty_is_the_squared_input_gradient():
    """For a linear D(x) = Σ w·x the input gradient is w whatever x: γ/2 · ‖w‖², and the
    penalty trains w (its gradient is γ·w)."""
    w = torch.randn(3, 8, 8, requires_grad=True)
    real = torch.randn(5, 3, 8, 8, requires_grad=True)
    penalty = r1_penalty((real * w).sum(dim=(1, 2, 3)), real, gamma=0.5)
    assert torch.allclose(penalty, 0.25 * w.detach().square().sum())
    penalty.backward()
    assert torch.allclose(w.grad, 0.5 * w.detach())


def test_mode_seeking_loss_rewards_images_that_differ_with_the_latent():
    za, zb = torch.zeros(2, 4), torch.ones(2, 4)               # latent distance 1
    a = torch.zeros(2, 3, 8, 8, requires_grad=True)
    same, apart = a.detach().clone(), a.detach() + 0.5          # image distance 0 and 0.5
    assert mode_seeking_loss(a, same, za, zb) > 1e4              # collapsed: as bad as it gets
    assert torch.isclose(mode_seeking_loss(a, apart, za, zb), torch.tensor(2.0), rtol=1e-3)
    mode_seeking_loss(a, apart, za, zb).backward()
    assert a.grad.abs().sum() > 0


def test_discriminator_with_spectral_norm(tokenizer):
    cfg = tiny_config(d_spectral_norm=True)
    D = Discriminator(cfg)
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    normed = [m for m in layers if hasattr(m, "parametrizations")]
    assert len(normed) == len(layers) - sum(1 for m in D.text.modules() if isinstance(m, torch.nn.Linear))
    assert not any(hasattr(m, "parametrizations") for m in Discriminator(tiny_config()).modules())
    ids, mask = encode_prompts(tokenizer, CAPTIONS[:2], cfg.context)
    assert D(torch.zeros(2, 3, 32, 32), ids, mask).shape == (2,)


def test_padding_does_not_change_a_prompts_vector(tokenizer):
    cfg = tiny_config()
    G = Generator(cfg).eval()
    short, _ = encode_prompts(tokenizer, ["a red circle"], cfg.context)
    ids, mask = encode_prompts(tokenizer, ["a red circle"], cfg.context)
    ids2 = ids.clone()
    ids2[~mask] = 5  # different filler under the mask
    v1, _ = G.text(ids, mask)
    v2, _ = G.text(ids2, mask)
    assert torch.allclose(v1, v2, atol=1e-5)
    # Nor does cutting the padding that every row has (what the engine serves with).
    ids, mask = encode_prompts(tokenizer, ["a red circle", "a red circle on the left"], cfg.context)
    cut_ids, cut_mask = trim_padding(ids, mask)
    assert cut_ids.shape[1] == int(mask.sum(1).max()) < cfg.context
    assert torch.equal(cut_mask.sum(1), mask.sum(1))
    (v1, t1), (v2, t2) = G.text(ids, mask), G.text(cut_ids, cut_mask)
    assert torch.allclose(v1, v2, atol=1e-5)
    assert torch.allclose(t1[:, :cut_ids.shape[1]][cut_mask], t2[cut_mask], atol=1e-5)


def test_engine_matches_the_plain_generator(engine, tokenizer):
    """The batched engine is the obviously-correct path: z from seed + i, one G call."""
    req = ImageRequest("a red circle", seed=42, n=3, truncation=0.7)
    got = np.stack(engine.generate([req])[0])                                   # (3, S, S, 3)
    cfg = engine.cfg
    z = torch.stack([torch.randn(cfg.z_dim, generator=torch.Generator().manual_seed(42 + i))
                     for i in range(3)]) * 0.7
    ids, mask = encode_prompts(tokenizer, ["a red circle"] * 3, cfg.context)
    with torch.no_grad():
        want = to_uint8(engine.generator(z, ids, mask)).numpy()
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_seeded_batch_invariance(engine):
    a = ImageRequest("a small red circle on the left, blue background", seed=1, n=2)
    b = ImageRequest("a purple cross in the middle", seed=7, n=3, truncation=0.5)
    c = ImageRequest("a large green square at the top on white", seed=1, n=1)
    together = engine.generate([a, b, c])
    alone = engine.generate([b])[0]
    assert [len(x) for x in together] == [2, 3, 1]
    for x, y in zip(together[1], alone):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    # Image i of a request is the n=1 image of seed + i.
    single = engine.generate([ImageRequest(b.prompt, seed=8, truncation=0.5)])[0][0]
    assert np.abs(single.astype(int) - together[1][1].astype(int)).max() <= 1
    # Seeds and prompts matter.
    assert not np.array_equal(together[1][0], together[1][1])
    other = engine.generate([ImageRequest(c.prompt, seed=1, n=2)])[0]
    assert not np.array_equal(other[0], together[0][0])


def test_passes_of_at_most_max_images_give_the_same_images(engine):
    """generate_in_passes (the image worker's) cuts requests into passes of at most max_images:
    image i still comes from seed + i, in request order."""
    reqs = [ImageRequest("a red circle", seed=3, n=5), ImageRequest("a blue square", seed=9, n=1, truncation=0.5),
            ImageRequest("a green cross", seed=20, n=3)]
    passes = []

    def recorded(requests):
        passes.append(sum(r.n for r in requests))
        return engine.generate(requests)

    got = generate_in_passes(recorded, reqs, 2)
    want = engine.generate(reqs)
    assert passes == [2, 2, 2, 2, 1]  # n=5 as 2, 2, 1 (sharing its pass with the n=1); n=3 as 2, 1
    assert [len(x) for x in got] == [5, 1, 3]
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    generate_in_passes(recorded, reqs, 64)
    assert passes[-1] == 9  # all in one pass when they fit


def test_truncation_scales_latents():
    z1 = latents([ImageRequest("x", seed=3, n=2)], 8)
    z_half = latents([ImageRequest("x", seed=3, n=2, truncation=0.5)], 8)
    assert torch.allclose(z_half, 0.5 * z1)


@pytest.mark.parametrize("field,value", [("n", 0), ("n", 17), ("truncation", 0.0),
                                         ("truncation", 1.5), ("prompt", "  "),
                                         ("prompt", "red " * 100), ("seed", -1), ("seed", 2**32),
                                         # a lone surrogate: the tokenizer's bare TypeError
                                         ("prompt", "\ud800 red"), ("negative_prompt", "\udc00"),
                                         # a GAN has no sampler: refused, not ignored
                                         ("guidance_scale", 2.0), ("temperature", 0.5), ("top_k", 5)])
def test_validation(engine, field, value):
    req = ImageRequest("a red circle", seed=0)
    setattr(req, field, value)
    with pytest.raises(InvalidParameter) as e:
        engine.generate([req])
    assert e.value.param == field


def test_a_prompt_too_long_in_characters_is_refused_before_it_is_tokenized(tokenizer, monkeypatch):
    """Tokenizing a 1 MB prompt took half a second of the event loop; its length alone says
    it cannot fit: no token is longer than the longest in the vocabulary."""
    checker = ImageRequests(tokenizer, tiny_config())
    longest = max(tokenizer.hf.get_vocab(), key=len)  # byte-level: one character per byte
    assert checker.max_prompt_chars == checker.cfg.context * len(longest)
    checker.validate(ImageRequest(CAPTIONS[0], seed=0))  # a prompt that fits still passes
    monkeypatch.setattr(tokenizer, "encode", lambda text: pytest.fail("the prompt was tokenized"))
    with pytest.raises(InvalidParameter) as e:
        checker.validate(ImageRequest("x" * (1 << 20), seed=0))
    assert e.value.param == "prompt" and f"at most {checker.max_prompt_chars} characters" in e.value.message


def test_load_round_trip_and_errors(tmp_path, engine, tokenizer):
    cfg = engine.cfg
    save_model_dir(tmp_path / "m", {"family": "gan", **cfg.to_dict()},
                   engine.generator.state_dict(), tokenizer, {"colour": 1.0})
    loaded = ImageEngine.load(tmp_path / "m", device="cpu")
    req = [ImageRequest("a red circle", seed=5, n=2)]
    assert all(np.array_equal(x, y) for x, y in zip(loaded.generate(req)[0], engine.generate(req)[0]))
    assert loaded.image_size == 32
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "family": "gpt"}))
    with pytest.raises(ArtifactError, match="config.json"):
        ImageEngine.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "g_ch": 16}))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        ImageEngine.load(tmp_path / "m")


def test_request_checker_reads_tokenizer_and_config_only(tmp_path, engine, tokenizer):
    """What the server loads to check requests: no weights, the engine's verdicts, bad files named."""
    save_model_dir(tmp_path / "m", {"family": "gan", **engine.cfg.to_dict()},
                   engine.generator.state_dict(), tokenizer)
    (tmp_path / "m" / "model.safetensors").unlink()  # only the worker process reads it
    checker = ImageRequests.load(tmp_path / "m")
    assert checker.image_size == 32 and not hasattr(checker, "generator")
    checker.validate(ImageRequest("a red circle", seed=5, n=2))
    with pytest.raises(InvalidParameter) as e:
        checker.validate(ImageRequest("a red circle", seed=5, n=17))
    assert e.value.param == "n"
    checker.validate(ImageRequest("a red circle", seed=2**32 - 3, n=3))  # seeds up to 2**32 - 1
    with pytest.raises(InvalidParameter) as e:  # image 3 would need seed 2**32
        checker.validate(ImageRequest("a red circle", seed=2**32 - 3, n=4))
    assert e.value.param == "seed"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "image_size": 48}))
    with pytest.raises(ArtifactError, match="config.json"):
        ImageRequests.load(tmp_path / "m")
