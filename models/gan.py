"""Text-conditioned GAN: generator, discriminator, augmentation and losses.

Generator: z ~ N(0, I) and the prompt's vector go through a linear layer to a 4×4 map,
then upsampling blocks whose per-sample normalisation is modulated by the prompt
(FiLM), with one cross-attention layer from image positions to the prompt's tokens;
each block adds its own RGB output to the upsampled image so far (skip architecture).
Nothing in it mixes samples (no BatchNorm), so an image depends only on its own
latent and prompt, whatever else shares the batch.

Discriminator: residual blocks and projection conditioning (Miyato & Koyama 2018):
logit = w·φ(x) + ⟨embed(text), φ(x)⟩. It is kept smooth by the R1 gradient penalty
(`r1_penalty`, applied by the training job) rather than by spectral normalisation, which
stays available (`d_spectral_norm`): bounding every layer's gain slowed how fast D learns
shape (a supervised probe of the same trunk: 52 % shape accuracy after 600 steps with
spectral norm, 98 % without), and a generator learns only what its discriminator can see.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.artifacts import positive_ints
from models.text_encoder import PromptModelConfig, TextEncoder


@dataclass
class GANConfig(PromptModelConfig):
    image_size: int = 32
    z_dim: int = 64
    g_ch: int = 32          # generator channels at full resolution, doubled per halving (≤ 8×)
    d_ch: int = 32          # discriminator channels at full resolution, likewise
    attn_res: int = 8       # generator resolution that cross-attends to the prompt's tokens
    vocab_size: int = 512
    context: int = 32
    text_dim: int = 128
    text_layers: int = 1
    text_heads: int = 4
    d_spectral_norm: bool = False  # spectral norm on every D layer (instead of R1)

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {self.image_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GANConfig":
        """From a saved config.json; the sizes are required (ValueError naming one that is missing
        or not a positive integer): the default text_heads, say, would load and draw wrongly."""
        positive_ints(d, SIZES)
        return super().from_dict(d)

    def channels(self, base: int, res: int) -> int:
        return base * min(8, self.image_size // res)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES = ("image_size", "z_dim", "g_ch", "d_ch", "attn_res", "vocab_size", "context", "text_dim", "text_layers",
         "text_heads")


class FiLM(nn.Module):
    """Per-sample GroupNorm whose scale and shift come from the text vector."""

    def __init__(self, ch: int, c_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, ch // 4), ch, affine=False)
        self.affine = nn.Linear(c_dim, 2 * ch)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(c)[:, :, None, None].chunk(2, dim=1)   # (B, C, 1, 1) each
        return self.norm(h) * (1 + gamma) + beta


class GBlock(nn.Module):
    """×2 nearest upsample, two 3×3 convs with FiLM, and a 1×1 skip."""

    def __init__(self, cin: int, cout: int, c_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film1 = FiLM(cout, c_dim)
        self.film2 = FiLM(cout, c_dim)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(h, scale_factor=2, mode="nearest")                 # (B, Cin, 2H, 2W)
        x = F.leaky_relu(self.film1(self.conv1(h), c), 0.2)
        x = F.leaky_relu(self.film2(self.conv2(x), c), 0.2)
        return x + self.skip(h)                                              # (B, Cout, 2H, 2W)


class CrossAttention(nn.Module):
    """Image positions attend to the prompt's tokens: words like 'left' can place things."""

    def __init__(self, ch: int, text_dim: int, n_head: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, ch // 4), ch)
        self.attn = nn.MultiheadAttention(ch, n_head, kdim=text_dim, vdim=text_dim,
                                          batch_first=True)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        q = self.norm(h).flatten(2).transpose(1, 2)                          # (B, HW, C)
        out, _ = self.attn(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return h + out.transpose(1, 2).reshape(B, C, H, W)


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text)
        c0 = cfg.channels(cfg.g_ch, 4)
        self.fc = nn.Linear(cfg.z_dim + cfg.text_dim, 16 * c0)
        self.film0 = FiLM(c0, cfg.text_dim)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        self.to_rgb = nn.ModuleList()
        res, cin = 4, c0
        while res < cfg.image_size:
            res *= 2
            cout = cfg.channels(cfg.g_ch, res)
            self.blocks.append(GBlock(cin, cout, cfg.text_dim))
            self.to_rgb.append(nn.Conv2d(cout, 3, 1))
            if res == cfg.attn_res:
                self.attn[str(len(self.blocks) - 1)] = CrossAttention(cout, cfg.text_dim)
            cin = cout

    def synthesize(self, z: torch.Tensor, vec: torch.Tensor, tokens: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """z (B, Z), text vector (B, D), tokens (B, T, D), mask (B, T) → images (B, 3, S, S) in [-1, 1]."""
        h = self.fc(torch.cat([z, vec], dim=1)).view(z.shape[0], -1, 4, 4)  # (B, C0, 4, 4)
        h = F.leaky_relu(self.film0(h, vec), 0.2)
        rgb = None
        for i, (block, to_rgb) in enumerate(zip(self.blocks, self.to_rgb)):
            h = block(h, vec)
            if str(i) in self.attn:
                h = self.attn[str(i)](h, tokens, mask)
            # StyleGAN2's skip generator: every resolution adds to the image, so colours
            # and layout are learned at 8×8 before the fine stages have learned anything.
            up = 0 if rgb is None else F.interpolate(rgb, scale_factor=2, mode="bilinear",
                                                     align_corners=False)
            rgb = up + to_rgb(h)                                             # (B, 3, res, res)
        return torch.tanh(rgb)

    def forward(self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vec, tokens = self.text(ids, mask)
        return self.synthesize(z, vec, tokens, mask)


def _no_norm(module: nn.Module) -> nn.Module:
    return module


class DBlock(nn.Module):
    """Two 3×3 convs, ×2 max-pool downsample, 1×1 skip."""

    def __init__(self, cin: int, cout: int, sn: Callable[[nn.Module], nn.Module] = spectral_norm):
        super().__init__()
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = sn(nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))
        # Max-pooling keeps the strongest edge response of each window: where a small shape's
        # corners are, which average-pooling blurs away (a supervised probe of this trunk
        # learnt shape 1.6× faster with max- than with average-pooling).
        return F.max_pool2d(h + self.skip(x), 2)                             # (B, Cout, H/2, W/2)


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text)
        # A full-resolution stem: small shapes are only ~8 px across.
        sn = spectral_norm if cfg.d_spectral_norm else _no_norm
        res = cfg.image_size
        cin = cfg.channels(cfg.d_ch, res)
        self.from_rgb = sn(nn.Conv2d(3, cin, 3, padding=1))
        blocks = []
        while res > 4:
            res //= 2
            cout = cfg.channels(cfg.d_ch, res)
            blocks.append(DBlock(cin, cout, sn))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        # Flatten the 4×4 map rather than sum-pool it: where the object is, is part of
        # what the caption says.
        self.phi = sn(nn.Linear(16 * cin, cin))
        self.out = sn(nn.Linear(cin, 1))
        self.embed = sn(nn.Linear(cfg.text_dim, cin))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                pairs: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, 3, S, S), captions (M, T) → logits: high means real and matching.

        By default image i is scored with caption i. `pairs` (P, 2) lists (image, caption)
        index pairs instead, so one pass scores real images with their own and with
        mismatched captions without running the image trunk twice."""
        vec, _ = self.text(ids, mask)                                        # (M, D)
        h = self.blocks(self.from_rgb(x))                                    # (N, C, 4, 4)
        phi = F.leaky_relu(self.phi(F.leaky_relu(h, 0.2).flatten(1)), 0.2)   # (N, C)
        if pairs is not None:
            phi, vec = phi[pairs[:, 0]], vec[pairs[:, 1]]                    # (P, C), (P, D)
        return self.out(phi).squeeze(1) + (self.embed(vec) * phi).sum(1)


def translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each image by up to ratio·S pixels, zero-filled (DiffAugment 'translation')."""
    B, _, H, W = x.shape
    s = int(H * ratio + 0.5)
    tx = torch.randint(-s, s + 1, (B, 1, 1), device=x.device)
    ty = torch.randint(-s, s + 1, (B, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device),
                            indexing="ij")
    gy = (gy + ty + 1).clamp(0, H + 1)                                       # (B, H, W)
    gx = (gx + tx + 1).clamp(0, W + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)                     # (B, H+2, W+2, C)
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded[b, gy, gx].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero one random square of side ratio·S per image (DiffAugment 'cutout')."""
    B, _, H, W = x.shape
    s = int(H * ratio + 0.5)
    cy = torch.randint(0, H - s + 1, (B, 1, 1), device=x.device)
    cx = torch.randint(0, W - s + 1, (B, 1, 1), device=x.device)
    gy = torch.arange(H, device=x.device)[None, :, None]
    gx = torch.arange(W, device=x.device)[None, None, :]
    inside = (gy >= cy) & (gy < cy + s) & (gx >= cx) & (gx < cx + s)        # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Differentiable augmentation applied to real and fake alike, so D cannot tell them
    apart by the augmentation and G gets gradients through it. No colour jitter: colour
    is what the captions describe."""
    for name in filter(None, policy.split(",")):
        if name == "translation":
            x = translate(x, 1 / 16)
        elif name == "cutout":
            x = cutout(x, 1 / 4)
        else:
            raise ValueError(f"unknown augmentation {name!r} (use translation, cutout)")
    return x


def d_hinge_loss(real: torch.Tensor, fake: torch.Tensor, mismatched: torch.Tensor) -> torch.Tensor:
    """Real+matching pushed above +1; fakes and real images with the wrong caption below -1
    (the matching-aware term makes D, and so G, care about the text)."""
    return F.relu(1 - real).mean() + 0.5 * (F.relu(1 + fake).mean() + F.relu(1 + mismatched).mean())


def r1_penalty(scores: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ/2 · E‖∇ₓ D(x)‖² over real images x (Mescheder et al. 2018; StyleGAN2): keeps D
    smooth where the data is. `scores` must come from `real` with requires_grad set; the
    graph is kept, so the penalty trains D."""
    grad, = torch.autograd.grad(scores.sum(), real, create_graph=True)
    return 0.5 * gamma * grad.square().sum(dim=(1, 2, 3)).mean()


def mode_seeking_loss(a: torch.Tensor, b: torch.Tensor, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Mode seeking (MSGAN, Mao et al. 2019): images a, b of the same prompts from latents
    za, zb. The reciprocal of their distance per unit of latent distance, so the generator is
    pushed to make the seed matter instead of drawing one image per prompt."""
    ratio = (a - b).abs().mean(dim=(1, 2, 3)) / (za - zb).abs().mean(dim=1)
    return 1 / (ratio.mean() + 1e-5)


def g_hinge_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def contrastive_loss(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, M ≥ B): image i with caption j, caption i being image i's own. Cross-entropy
    towards the own caption along rows, and along columns of the first B (XMC-GAN): every
    other caption in the batch (and any extra hard negatives) is a negative, a far richer
    text signal than one mismatched pair, and it needs no labels."""
    B = scores.shape[0]
    target = torch.arange(B, device=scores.device)
    return 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores[:, :B].T, target))
