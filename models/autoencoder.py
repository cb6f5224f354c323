"""Autoencoder baselines: why a decoder alone is not a generator.

A plain autoencoder learns to squeeze an image into z and back, but nothing shapes where
the codes of real images lie, so decoding z ~ N(0, I) lands mostly off the data and
gives the garbage the lecture predicts. Two ways to learn the latent structure:

- the same decoder fed latents drawn from a Gaussian fitted to the encoded training
  images (`prior="fitted"`: mean and full covariance, stored with the weights);
- a VAE (`variational=True`): the KL term pulls the codes towards N(0, I), so the
  standard prior is the right one to sample from.

The decoder can read the prompt's vector (`conditional=True`, the project's text
encoder), which makes the attribute metrics comparable with the GAN and the AR model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.artifacts import load_model_dir
from models.engine import pick_device
from models.image_engine import ImageRequest, ImageRequests, latents, per_request, to_uint8
from models.text_encoder import PromptModelConfig, TextEncoder, encode_prompts
from models.tokenizer import Tokenizer

PRIORS = ("standard", "fitted")


@dataclass
class AEConfig(PromptModelConfig):
    image_size: int = 32
    z_dim: int = 32
    ch: int = 32              # channels at 16×16, doubled at each halving
    variational: bool = False
    conditional: bool = True  # the decoder reads the prompt's vector
    vocab_size: int = 512
    context: int = 32
    text_dim: int = 64
    text_layers: int = 1
    text_heads: int = 4

    def __post_init__(self) -> None:
        if self.image_size != 32:
            raise ValueError(f"image_size must be 32, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"family": "autoencoder", **asdict(self)}


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1),
                         nn.GroupNorm(8, cout), nn.SiLU())


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.ch
        self.encoder = nn.Sequential(_down(3, c), _down(c, 2 * c), _down(2 * c, 4 * c),
                                     nn.Flatten())                            # 32 → 4: (B, 64c)
        self.to_z = nn.Linear(16 * 4 * c, (2 if cfg.variational else 1) * cfg.z_dim)
        self.text = TextEncoder(cfg.text) if cfg.conditional else None
        self.from_z = nn.Linear(cfg.z_dim + (cfg.text_dim if cfg.conditional else 0), 16 * 4 * c)
        self.decoder = nn.Sequential(_up(4 * c, 2 * c), _up(2 * c, c), _up(c, c),
                                     nn.Conv2d(c, 3, 3, padding=1), nn.Tanh())
        # The Gaussian fitted to the encoded training set (prior="fitted"); set by the job.
        self.register_buffer("latent_mean", torch.zeros(cfg.z_dim))
        self.register_buffer("latent_scale_tril", torch.eye(cfg.z_dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images in [-1, 1] (B, 3, S, S) → mean (B, Z) and, for a VAE, log-variance (B, Z)."""
        h = self.to_z(self.encoder(x))
        if self.cfg.variational:
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar.clamp(-12, 8)
        return h, None

    def decode(self, z: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """z (B, Z), prompts (B, T) → images (B, 3, S, S) in [-1, 1]."""
        if self.text is not None:
            z = torch.cat([z, self.text(ids, mask)[0]], dim=1)
        h = self.from_z(z).view(len(z), -1, 4, 4)                             # (B, 4c, 4, 4)
        return self.decoder(h)

    def forward(self, x: Tensor, ids: Tensor, mask: Tensor, sigma: float = 0.1,
                beta: float = 1.0) -> tuple[Tensor, Tensor, dict[str, float]]:
        """x in [-1, 1] → reconstruction, loss, parts. The loss is a negative ELBO per pixel:
        Gaussian likelihood with std `sigma` plus beta·KL for a VAE (plain MSE scaled
        the same way for the autoencoder), so the two are trained on one scale."""
        mu, logvar = self.encode(x)
        z = mu
        if logvar is not None and self.training:
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)              # reparameterisation
        recon = self.decode(z, ids, mask)
        pixels = x[0].numel()
        nll = (recon - x).square().flatten(1).sum(1).mean() / (2 * sigma ** 2)
        kl = torch.zeros((), device=x.device)
        if logvar is not None:
            kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1).mean()
        loss = (nll + beta * kl) / pixels
        return recon, loss, {"mse": float((recon - x).detach().square().mean()), "kl": float(kl.detach())}

    @torch.no_grad()
    def fit_latent_gaussian(self, images: Tensor, batch: int = 512) -> None:
        """Fit mean and covariance of the codes (the means, for a VAE) of uint8 images."""
        codes = torch.cat([self.encode(images[i:i + batch].float() / 127.5 - 1)[0]
                           for i in range(0, len(images), batch)]).double()   # (N, Z)
        cov = torch.cov(codes.T) + 1e-5 * torch.eye(codes.shape[1], dtype=codes.dtype)
        self.latent_mean.copy_(codes.mean(0))
        self.latent_scale_tril.copy_(torch.linalg.cholesky(cov))


class LatentEngine(ImageRequests):
    """The ImageEngine contract for a decoder: z from the chosen prior → image.

    Image i of a request draws ε ~ N(0, I) from a CPU generator seeded with seed + i,
    scaled by the truncation ψ; prior="fitted" maps it through the fitted Gaussian
    (z = mean + L·ε), prior="standard" uses it as is.
    """
    family, config_class = "autoencoder", AEConfig

    def __init__(self, model: AutoEncoder, tokenizer: Tokenizer, prior: str = "standard",
                 device: str = "auto"):
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        super().__init__(tokenizer, model.cfg)
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.prior = prior

    @classmethod
    def load(cls, model_dir: str | Path, prior: str = "standard", device: str = "auto") -> "LatentEngine":
        art = load_model_dir(model_dir, lambda c: AutoEncoder(AEConfig.from_dict(c)), family=cls.family)
        return cls(art.model, art.tokenizer, prior, device)

    def latents(self, requests: list[ImageRequest]) -> Tensor:
        """(sum of n, Z) on the engine's device."""
        eps = latents(requests, self.cfg.z_dim).to(self.device)
        if self.prior == "standard":
            return eps
        return self.model.latent_mean + eps @ self.model.latent_scale_tril.T

    @torch.inference_mode()
    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        """One list per request of n (H, W, 3) uint8 arrays, all from one forward pass."""
        if not requests:
            return []
        for req in requests:
            self.validate(req)
        counts = [r.n for r in requests]
        ids, mask = encode_prompts(self.tokenizer, [r.prompt for r in requests], self.cfg.context,
                                   self.device)                               # (R, T)
        rep = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts)).to(self.device)
        images = self.model.decode(self.latents(requests), ids[rep], mask[rep])  # (N, 3, S, S)
        return per_request(to_uint8(images).cpu().numpy(), requests)
