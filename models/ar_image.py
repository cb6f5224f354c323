"""Raster-scan autoregressive image model: an image is a sequence of code-book tokens,
generated one token at a time by a decoder-only Transformer that reads the prompt.

- Tokens: a code book fitted by k-means to the training data. With `patch=1` it is a colour
  palette (one token per pixel); with `patch=2` each token is a 2×2 patch (a small VQ code
  book), which cuts the sequence from 1024 to 256 tokens at 32 px, the difference between
  minutes and hours of CPU training.
- Positions: a row embedding plus a column embedding of the cell being predicted, so
  (r, c) and (r+1, c) share their column half and the model does not have to learn from
  data that cells 16 tokens apart in raster order are vertical neighbours.
- Text: each block cross-attends to the per-token features of the project's text
  encoder (trained with the model, as the GAN's is).
- Sampling: the project's one sampler (models.sampling.sample: temperature, top-k, top-p,
  inverse-CDF with each image's own generator), a KV cache (models.gpt.KVCache), and
  classifier-free guidance: the model is trained with the caption dropped (replaced by the
  empty caption) in a fraction of steps, and at sampling the conditional and unconditional
  logits are mixed, uncond + s·(cond − uncond). A request's negative prompt takes the empty
  caption's place in the unconditional branch (as in AUTOMATIC1111), so guidance steers away
  from it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.artifacts import load_model_dir, positive_ints
from models.engine import pick_device
from models.errors import InvalidParameter, is_number
from models.gpt import MLP, CausalSelfAttention, GPTConfig, KVCache
from models.image_engine import ImageRequest, ImageRequests, check_image_request, per_request
from models.sampling import RowRandom, SamplingBatch, SamplingParams, sample
from models.text_encoder import PromptModelConfig, TextEncoder, encode_prompts
from models.tokenizer import Tokenizer

MAX_GUIDANCE = 20.0


@dataclass
class ARImageConfig(PromptModelConfig):
    image_size: int = 32
    patch: int = 2             # token side in pixels: 1 = colour palette, 2 = 2×2 patch code book
    codebook: int = 64         # code-book entries (the image vocabulary)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    vocab_size: int = 512      # text vocabulary
    context: int = 32          # longest prompt in tokens
    text_dim: int = 128
    text_layers: int = 1
    text_heads: int = 4
    guidance_scale: float = 3.0  # used when a request names none; 1 = no guidance
    temperature: float = 1.0     # likewise

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ARImageConfig":
        """From a saved config.json; the sizes are required (ValueError naming one that is missing
        or not a positive integer), as the GAN's and the GPT's: a default n_head would load and
        draw wrongly."""
        positive_ints(d, ("image_size", "patch", "codebook", "n_layer", "n_head", "n_embd", "vocab_size", "context",
                          "text_dim", "text_layers", "text_heads"))
        return super().from_dict(d)

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        return 3 * self.patch ** 2

    def to_dict(self) -> dict[str, Any]:
        return {"family": "ar_image", **asdict(self)}


# ------------------------------------------------------------------ the code book (k-means)

def patchify(images: Tensor, patch: int) -> Tensor:
    """uint8 (N, 3, S, S) → (N, L, 3·p·p) float in [0, 1], patches in raster order."""
    N, C, S, _ = images.shape
    g = S // patch
    x = images.float().div(255).view(N, C, g, patch, g, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, g * g, C * patch * patch)


def unpatchify(vectors: Tensor, patch: int) -> Tensor:
    """(N, L, 3·p·p) in [0, 1] → uint8 (N, 3, S, S)."""
    N, L, _ = vectors.shape
    g = math.isqrt(L)
    x = vectors.view(N, g, g, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(N, 3, g * patch, g * patch).mul(255).round().clamp(0, 255).to(torch.uint8)


def nearest_code(vectors: Tensor, codebook: Tensor, chunk: int = 65536) -> Tensor:
    """(M, D), (K, D) → (M,) index of the nearest entry (squared distance)."""
    out = []
    c_sq = codebook.square().sum(1)                                           # (K,)
    for i in range(0, len(vectors), chunk):
        v = vectors[i:i + chunk]
        d2 = c_sq[None] - 2 * v @ codebook.T                                  # (m, K); |v|² is constant per row
        out.append(d2.argmin(1))
    return torch.cat(out)


def fit_codebook(images: Tensor, k: int, patch: int, n_vectors: int = 50_000, iters: int = 25,
                 seed: int = 0) -> Tensor:
    """k-means (k-means++ start, Lloyd iterations) on patches drawn from the training images.

    k-means++ matters here: a small shape covers few pixels, and a uniform random start
    would give its colour no entry. Returns (k, 3·p·p) in [0, 1]; a pure function of the seed.
    """
    g = torch.Generator().manual_seed(seed)
    all_vecs = patchify(images, patch).flatten(0, 1)                          # (N·L, D)
    vecs = all_vecs[torch.randperm(len(all_vecs), generator=g)[:n_vectors]]   # (M, D)
    centres = vecs[torch.randint(len(vecs), (1,), generator=g)]
    d2 = (vecs - centres[0]).square().sum(1)                                  # (M,)
    for _ in range(1, k):
        pick = torch.multinomial(d2 + 1e-12, 1, generator=g)
        centres = torch.cat([centres, vecs[pick]])
        d2 = torch.minimum(d2, (vecs - vecs[pick]).square().sum(1))
    for _ in range(iters):
        assign = nearest_code(vecs, centres)                                  # (M,)
        sums = torch.zeros_like(centres).index_add_(0, assign, vecs)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)             # (k, 1)
        # An entry that lost all its points keeps its place rather than becoming NaN.
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def encode_images(images: Tensor, codebook: Tensor, patch: int) -> Tensor:
    """uint8 (N, 3, S, S) → (N, L) long code indices in raster order."""
    vecs = patchify(images, patch)                                            # (N, L, D)
    return nearest_code(vecs.flatten(0, 1), codebook.to(vecs)).view(vecs.shape[:2])


def decode_tokens(tokens: Tensor, codebook: Tensor, patch: int) -> Tensor:
    """(N, L) code indices → uint8 (N, 3, S, S)."""
    return unpatchify(codebook[tokens], patch)


# ------------------------------------------------------------------------- the network

class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the prompt's token features (keys, values)."""

    def __init__(self, cfg: ARImageConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def keys_values(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, T, D) → k, v (B, nh, T, hs); computed once per prompt, reused every step."""
        B, T, _ = text.shape
        k, v = self.kv(text).view(B, T, 2, self.n_head, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], text_mask: Tensor) -> Tensor:
        B, L, C = x.shape
        q = self.q(x).view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=text_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """Pre-LayerNorm: causal self-attention (GPT's, with its KV cache), cross-attention, MLP."""

    def __init__(self, cfg: ARImageConfig):
        super().__init__()
        gpt = GPTConfig(block_size=cfg.seq_len, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        dropout=cfg.dropout)
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(gpt)
        self.ln_x = nn.LayerNorm(cfg.n_embd)
        self.cross = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(gpt)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], text_mask: Tensor,
                cache: KVCache | None = None, pos: Tensor | None = None, kv_len: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, kv_len=kv_len)  # decoding: every row sees all kv_len
        x = x + self.cross(self.ln_x(x), kv, text_mask)
        return x + self.mlp(self.ln_2(x))


@dataclass
class TextContext:
    """A batch of prompts as the blocks read them: per-block keys/values and the padding mask."""
    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor  # (B, T) True on real tokens

    def repeat(self, index: Tensor) -> "TextContext":
        """Rows `index` of the batch (a prompt's features for each of its n images)."""
        return TextContext([(k[index], v[index]) for k, v in self.kv], self.mask[index])


class ARImageModel(nn.Module):
    def __init__(self, cfg: ARImageConfig):
        super().__init__()
        self.cfg = cfg
        self.bos = cfg.codebook  # the start token: one past the code book
        self.text = TextEncoder(cfg.text)
        self.tok_emb = nn.Embedding(cfg.codebook + 1, cfg.n_embd)
        self.row_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.col_emb = nn.Embedding(cfg.grid, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.codebook, bias=False)
        # The code book travels with the weights (model.safetensors), so tokens always
        # decode with the entries they were trained on.
        self.register_buffer("codebook", torch.zeros(cfg.codebook, cfg.token_dim))
        self.caches: list[KVCache] | None = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("c_proj.weight", "cross.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(3 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pos_emb(self, pos: Tensor) -> Tensor:
        """Raster index (...) → row embedding + column embedding of that cell (..., C)."""
        return self.row_emb(pos // self.cfg.grid) + self.col_emb(pos % self.cfg.grid)

    def text_context(self, ids: Tensor, mask: Tensor) -> TextContext:
        _, feats = self.text(ids, mask)                                       # (B, T, D)
        return TextContext([b.cross.keys_values(feats) for b in self.blocks], mask)

    def forward(self, tokens: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. tokens (B, T ≤ L) code indices, prompt ids/mask (B, Tt)
        → logits (B, T, K) where logits[:, i] predicts tokens[:, i] from tokens[:, :i],
        and the mean cross-entropy."""
        B, T = tokens.shape
        ctx = self.text_context(ids, mask)
        # Input at position i is the previous token (the start token at i = 0) plus the
        # position of the cell being predicted.
        prev = torch.cat([tokens.new_full((B, 1), self.bos), tokens[:, :-1]], dim=1)  # (B, T)
        x = self.drop(self.tok_emb(prev) + self.pos_emb(torch.arange(T, device=tokens.device)))
        for block, kv in zip(self.blocks, ctx.kv):
            x = block(x, kv, ctx.mask)
        logits = self.head(self.ln_f(x))                                      # (B, T, K)
        return logits, F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    # --- incremental decoding -------------------------------------------------------------
    def setup_caches(self, batch: int) -> None:
        cfg, p = self.cfg, self.head.weight
        self.caches = [KVCache(batch, cfg.n_head, cfg.seq_len, cfg.n_embd // cfg.n_head, p.dtype,
                               p.device) for _ in range(cfg.n_layer)]

    def decode_step(self, prev: Tensor, i: int, ctx: TextContext) -> Tensor:
        """prev (B,) the token at i-1 (or the start token), i the cell to predict → logits (B, K)."""
        B = prev.shape[0]
        pos = torch.full((B, 1), i, dtype=torch.long, device=prev.device)    # (B, 1): every row is at i
        x = self.tok_emb(prev[:, None]) + self.pos_emb(pos)                   # (B, 1, C)
        for block, cache, kv in zip(self.blocks, self.caches, ctx.kv):
            x = block(x, kv, ctx.mask, cache, pos, kv_len=i + 1)
        return self.head(self.ln_f(x))[:, 0]                                  # (B, K)


# --------------------------------------------------------------------------- sampling

def guide(cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
    """Classifier-free guidance on logits (B, K), scale (B, 1); scale 1 returns cond exactly."""
    return torch.where(scale == 1, cond, uncond + scale * (cond - uncond))


@torch.inference_mode()
def sample_tokens(model: ARImageModel, ctx: TextContext, null: TextContext, params: SamplingBatch,
                  randoms: list[RowRandom], scale: Tensor) -> Tensor:
    """Raster-scan decoding with the KV cache. ctx: the B rows' prompts; null: their
    unconditional prompts, empty or negative (read only when some row's scale is not 1); scale (B, 1)
    → tokens (B, L). One uniform per row per step from that row's generator."""
    B, L = len(randoms), model.cfg.seq_len
    guided = bool((scale != 1).any())
    if guided:  # the unconditional rows ride in the same batch, rows B..2B-1
        ctx = TextContext([(torch.cat([k, nk]), torch.cat([v, nv]))
                           for (k, v), (nk, nv) in zip(ctx.kv, null.kv)],
                          torch.cat([ctx.mask, null.mask]))
    rows = 2 * B if guided else B
    model.setup_caches(rows)
    device = model.head.weight.device
    prev = torch.full((rows,), model.bos, dtype=torch.long, device=device)
    out = torch.empty(B, L, dtype=torch.long, device=device)
    try:
        for i in range(L):
            logits = model.decode_step(prev, i, ctx).float()                  # (rows, K)
            if guided:
                logits = guide(logits[:B], logits[B:], scale)
            out[:, i] = sample(logits, params, randoms)                       # (B,)
            prev = torch.cat([out[:, i], out[:, i]]) if guided else out[:, i]
    finally:
        model.caches = None  # the cache is per call; do not keep its memory between requests
    return out


@torch.inference_mode()
def reference_sample_tokens(model: ARImageModel, ids: Tensor, mask: Tensor, null_ids: Tensor,
                            null_mask: Tensor, params: SamplingBatch,
                            randoms: list[RowRandom], scale: Tensor) -> Tensor:
    """The plain path the cached one is tested against: recompute the whole prefix every
    step with `forward`, same sampler, same uniforms."""
    B, L = len(randoms), model.cfg.seq_len
    tokens = torch.zeros(B, 0, dtype=torch.long, device=ids.device)
    for _ in range(L):
        probe = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # the last slot is never read
        cond = model(probe, ids, mask)[0][:, -1].float()
        uncond = model(probe, null_ids, null_mask)[0][:, -1].float()
        nxt = sample(guide(cond, uncond, scale), params, randoms)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens


# ----------------------------------------------------------------------------- engine

def request_sampling(req: ImageRequest, temperature: float,
                     guidance_scale: float) -> tuple[SamplingParams, float]:
    """A request's sampler settings and guidance scale; a field it leaves None takes the
    engine's default (from the model's config). The request's `truncation` ψ < 1 becomes
    nucleus sampling (top_p = ψ): keeping the likeliest mass at each step is the discrete
    counterpart of the GAN's latent truncation.
    """
    params = SamplingParams(temperature=temperature if req.temperature is None else req.temperature,
                            top_k=req.top_k or 0, top_p=float(req.truncation))
    return params, float(guidance_scale if req.guidance_scale is None else req.guidance_scale)


class ARImageRequests(ImageRequests):
    """Checking requests for an AR image model: its tokenizer and config, no weights (the
    server's side; the engine, a subclass, runs in a worker process)."""
    family, config_class = "ar_image", ARImageConfig

    def __init__(self, tokenizer: Tokenizer, cfg: ARImageConfig, guidance_scale: float | None = None):
        """guidance_scale: the default for requests that name none (None: the model's config)."""
        super().__init__(tokenizer, cfg)
        self.guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale

    def evaluations_per_image(self, guidance_scale: float | None = None) -> int:
        """Network evaluations (one-token forward passes) per image: one per token, twice
        that with guidance."""
        s = self.guidance_scale if guidance_scale is None else guidance_scale
        return self.cfg.seq_len * (1 if s == 1 else 2)

    def validate(self, req: ImageRequest) -> None:
        check_image_request(req, self.tokenizer, self.cfg.context, sampler=True)
        s = req.guidance_scale
        if s is not None and (not is_number(s) or not math.isfinite(s) or not 0 <= s <= MAX_GUIDANCE):
            raise InvalidParameter("guidance_scale", f"must be a number in [0, {MAX_GUIDANCE:g}]")
        self.settings(req)[0].validate()

    def settings(self, req: ImageRequest) -> tuple[SamplingParams, float]:
        return request_sampling(req, self.cfg.temperature, self.guidance_scale)


class ARImageEngine(ARImageRequests):
    """The ImageEngine contract for the AR model: load, image_size, validate, generate.

    Image i of a request draws from its own CPU generator seeded with seed + i. All images
    of all requests decode in one loop (one row each, plus one unconditional row each when
    guided); rows never mix, so a request's images do not depend on what shares its batch
    (up to float rounding). Cost: seq_len sequential steps per batch.
    """

    def __init__(self, model: ARImageModel, tokenizer: Tokenizer, device: str = "auto",
                 guidance_scale: float | None = None):
        """guidance_scale: the default for requests that name none (None: the model's config)."""
        super().__init__(tokenizer, model.cfg, guidance_scale)
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "ARImageEngine":
        """Load a model directory written by training.train_ar_image."""
        art = load_model_dir(model_dir, lambda c: ARImageModel(ARImageConfig.from_dict(c)), family=cls.family)
        return cls(art.model, art.tokenizer, device)

    @torch.inference_mode()
    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        """One list per request of n (H, W, 3) uint8 arrays, all from one decode loop."""
        if not requests:
            return []
        for req in requests:
            self.validate(req)
        settings = [self.settings(r) for r in requests]
        counts = [r.n for r in requests]
        rep = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts)).to(self.device)
        params = SamplingBatch.from_params([p for (p, _), n in zip(settings, counts) for _ in range(n)],
                                           self.device)
        scale = torch.tensor([[s] for (_, s), n in zip(settings, counts) for _ in range(n)],
                             device=self.device)                              # (N, 1)
        randoms = [RowRandom(r.seed + i) for r in requests for i in range(r.n)]
        # Each prompt is encoded once, then its features repeated for its n images.
        ids, mask = encode_prompts(self.tokenizer, [r.prompt for r in requests], self.cfg.context,
                                   self.device)                               # (R, T)
        ctx = self.model.text_context(ids, mask).repeat(rep)
        # The unconditional rows: each request's negative prompt, the empty caption when none
        # (each distinct one encoded once).
        negatives = list(dict.fromkeys(r.negative_prompt for r in requests))
        null_ids, null_mask = encode_prompts(self.tokenizer, negatives, self.cfg.context, self.device)
        which = torch.tensor([negatives.index(r.negative_prompt) for r in requests], device=self.device)
        null = self.model.text_context(null_ids, null_mask).repeat(which[rep])
        tokens = sample_tokens(self.model, ctx, null, params, randoms, scale)  # (N, L)
        images = decode_tokens(tokens, self.model.codebook, self.cfg.patch)   # (N, 3, S, S)
        return per_request(images.permute(0, 2, 3, 1).cpu().numpy(), requests)
