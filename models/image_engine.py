"""Batched text-to-image generation: prompts × n images × seeds (× truncation) → uint8.

A request's image i is drawn from its own `torch.Generator` seeded with `seed + i`, on
the CPU (so the same seed gives the same latent on any device), scaled by the
truncation ψ. All requests then run as one forward pass; the generator has no
cross-sample layers and padding is masked out of the prompts' features, so what shares
the batch does not change a request's images (up to float rounding).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.artifacts import build_from_config, load_model_dir, load_tokenizer, read_config
from models.engine import pick_device
from models.errors import InvalidParameter, check_unicode, is_int, is_number
from models.gan import GANConfig, Generator
from models.sampling import MAX_SEED
from models.text_encoder import encode_prompts, trim_padding
from models.tokenizer import Tokenizer

MAX_IMAGES = 16


@dataclass
class ImageRequest:
    prompt: str
    seed: int
    n: int = 1
    truncation: float = 1.0   # 0 < truncation <= 1 (latent truncation psi)
    # Sampler settings of autoregressive image models (None: the model's default). A GAN
    # draws its image in one pass and has no sampler: it refuses them rather than ignore them.
    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    # What guidance steers away from: the unconditional branch's prompt (empty: none), as
    # AUTOMATIC1111's negative prompt replaces Stable Diffusion's empty one.
    negative_prompt: str = ""

    def sampler_fields(self) -> list[str]:
        """The settings this request gives that only a model with a sampler and guidance uses
        (a top_k of 0 and an empty negative_prompt, their defaults, are off)."""
        fields = [f for f in ("guidance_scale", "temperature") if getattr(self, f) is not None]
        if self.top_k not in (None, 0):
            fields.append("top_k")
        if self.negative_prompt:
            fields.append("negative_prompt")
        return fields


def latents(requests: list[ImageRequest], z_dim: int) -> torch.Tensor:
    """(sum of n, Z): image i of a request from a CPU generator seeded with seed + i."""
    rows = []
    for req in requests:
        for i in range(req.n):
            g = torch.Generator().manual_seed(req.seed + i)
            rows.append(torch.randn(z_dim, generator=g) * req.truncation)
    return torch.stack(rows)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) float → (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def per_request(images: np.ndarray, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
    """Split (sum of n, H, W, 3) images, in request order, into one list per request."""
    ends = np.cumsum([r.n for r in requests])[:-1]
    return [list(chunk) for chunk in np.split(images, ends)]


def generate_in_passes(generate: Callable[[list[ImageRequest]], list[list[np.ndarray]]],
                       requests: list[ImageRequest], max_images: int) -> list[list[np.ndarray]]:
    """`generate` (an engine's) over passes of at most max_images images, so that a pass's memory
    stays bounded whatever the requests ask: a request for more is cut into parts (the part
    from image i on seeded with seed + i, so its images are the same), and consecutive parts
    share a pass while they fit."""
    parts = [(r, replace(req, seed=req.seed + start, n=min(max_images, req.n - start)))
             for r, req in enumerate(requests) for start in range(0, req.n, max_images)]
    out: list[list[np.ndarray]] = [[] for _ in requests]
    first = 0
    while first < len(parts):
        end, size = first + 1, parts[first][1].n
        while end < len(parts) and size + parts[end][1].n <= max_images:
            size += parts[end][1].n
            end += 1
        for (r, _), images in zip(parts[first:end], generate([part for _, part in parts[first:end]])):
            out[r].extend(images)
        first = end
    return out


def max_prompt_chars(tokenizer: Tokenizer, context: int) -> int:
    """The most characters a prompt of `context` tokens can have: a longer one is refused unread."""
    return context * tokenizer.max_token_bytes


def check_prompt_length(name: str, text: str, tokenizer: Tokenizer, context: int) -> None:
    """At most `context` tokens; a text too long to be that is refused before it is tokenized."""
    if len(text) > (limit := max_prompt_chars(tokenizer, context)):  # tokenizing 1 MB took 0.5 s
        raise InvalidParameter(name, f"has {len(text)} characters; the limit is {context} tokens, "
                                     f"at most {limit} characters")
    n_tokens = len(tokenizer.encode(text))
    if n_tokens > context:
        raise InvalidParameter(name, f"is {n_tokens} tokens long, the limit is {context}")


def check_image_request(req: ImageRequest, tokenizer: Tokenizer, context: int, sampler: bool = False) -> None:
    """The ImageRequest fields every image engine checks the same way. An engine without a
    sampler (`sampler=False`: one pass from a latent) refuses the sampler fields rather than
    ignore them."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InvalidParameter("prompt", "must be a non-empty string")
    if not isinstance(req.negative_prompt, str):
        raise InvalidParameter("negative_prompt", "must be a string (empty: none)")
    for name in ("prompt", "negative_prompt"):
        check_unicode(name, getattr(req, name))
        check_prompt_length(name, getattr(req, name), tokenizer, context)
    if not is_int(req.n) or not 1 <= req.n <= MAX_IMAGES:
        raise InvalidParameter("n", f"must be an integer from 1 to {MAX_IMAGES}")
    if not is_int(req.seed) or not 0 <= req.seed <= MAX_SEED - (req.n - 1):
        raise InvalidParameter("seed", f"must be an integer from 0 to {MAX_SEED - (req.n - 1)} for n={req.n} "
                                       f"(image i uses seed + i, at most {MAX_SEED})")
    t = req.truncation
    if not is_number(t) or not 0 < t <= 1:
        raise InvalidParameter("truncation", "must be a number in (0, 1]")
    if not sampler and (fields := req.sampler_fields()):
        raise InvalidParameter(fields[0], "applies to autoregressive image models only (ar_image); this model "
                                          "draws an image in one pass, without guidance (use truncation)")


class ImageRequests:
    """Checking image requests for a GAN: what its tokenizer and config decide, no weights.
    The server checks requests with this before they queue; the engine (a subclass) runs in
    a worker process of its own."""
    family, config_class = "gan", GANConfig

    def __init__(self, tokenizer: Tokenizer, cfg: GANConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_size: int = cfg.image_size

    @classmethod
    def load(cls, model_dir: str | Path) -> "ImageRequests":
        """The tokenizer and config of a model directory (`ArtifactError` naming a bad file)."""
        config = read_config(model_dir, cls.family)
        return cls(load_tokenizer(model_dir, config), build_from_config(model_dir, cls.config_class.from_dict, config))

    @property
    def max_prompt_chars(self) -> int:
        return max_prompt_chars(self.tokenizer, self.cfg.context)

    def validate(self, req: ImageRequest) -> None:
        check_image_request(req, self.tokenizer, self.cfg.context)


class ImageEngine(ImageRequests):
    def __init__(self, generator: Generator, tokenizer: Tokenizer, device: str = "auto"):
        super().__init__(tokenizer, generator.cfg)
        self.device = pick_device(device)
        # Channels-last weights make every conv work in NHWC, the layout oneDNN computes in:
        # no layout conversions between layers (10–13 % faster on CPU at batch 1–8, same pixels).
        self.generator = generator.to(self.device, memory_format=torch.channels_last).eval()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "ImageEngine":
        """Load a model directory written by training.train_gan (the EMA generator)."""
        art = load_model_dir(model_dir, lambda c: Generator(GANConfig.from_dict(c)), family=cls.family)
        return cls(art.model, art.tokenizer, device)

    @torch.inference_mode()
    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        """One list per request of n (H, W, 3) uint8 arrays, all from one forward pass."""
        if not requests:
            return []
        for req in requests:
            self.validate(req)
        z = latents(requests, self.cfg.z_dim).to(self.device)                 # (N, Z)
        ids, mask = trim_padding(*encode_prompts(self.tokenizer, [r.prompt for r in requests],
                                                 self.cfg.context, self.device))  # (R, T)
        # Encode each prompt once, then repeat its features for its n images.
        vec, tokens = self.generator.text(ids, mask)                          # (R, D), (R, T, D)
        counts = torch.tensor([r.n for r in requests], device=self.device)
        rep = torch.repeat_interleave(torch.arange(len(requests), device=self.device), counts)
        images = self.generator.synthesize(z, vec[rep], tokens[rep], mask[rep])  # (N, 3, S, S)
        return per_request(to_uint8(images).cpu().numpy(), requests)
