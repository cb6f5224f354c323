"""Prompt → conditioning: a small Transformer over the project's BPE tokens.

It is trained from scratch together with the network that owns it (the generator and
the discriminator each own one), so it only has to learn the captions' vocabulary. It
returns both a pooled vector (for FiLM / projection conditioning) and per-token
features (for cross-attention), so "red circle and blue square" can bind words to places.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.tokenizer import Tokenizer


@dataclass
class TextEncoderConfig:
    vocab_size: int = 512
    context: int = 32       # longest prompt in tokens
    dim: int = 128
    n_layer: int = 1
    n_head: int = 4


class PromptModelConfig:
    """What the configs of prompt-conditioned image models share: their text encoder's
    settings (fields vocab_size, context, text_dim, text_layers, text_heads) and loading
    from a saved config.json, whose extra keys (family, data, train) are ignored."""
    vocab_size: int
    context: int
    text_dim: int
    text_layers: int
    text_heads: int

    @property
    def text(self) -> TextEncoderConfig:
        return TextEncoderConfig(self.vocab_size, self.context, self.text_dim, self.text_layers,
                                 self.text_heads)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.dim, cfg.n_head, 4 * cfg.dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.n_layer)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: (B, T) with mask True on real tokens → vector (B, D), tokens (B, T, D)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)                                   # (B, T, D)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        x = self.norm(x)                                                    # (B, T, D)
        m = mask.unsqueeze(-1).to(x.dtype)                                  # (B, T, 1)
        # Mean over real tokens only: padding never changes a prompt's vector.
        vec = self.proj((x * m).sum(1) / m.sum(1).clamp(min=1.0))           # (B, D)
        return vec, x


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], context: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and pad to the full context (a fixed shape, so a prompt's numbers do not
    depend on the longest prompt in its batch). Longer prompts are cut; the engine
    rejects them before they get here."""
    ids = torch.full((len(prompts), context), tokenizer.eot_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), context), dtype=torch.bool)
    for i, toks in enumerate(tokenizer.encode_batch(prompts)):
        toks = toks[:context] or [tokenizer.eot_id]  # an empty caption still gets one token
        ids[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks)] = True
    return ids.to(device), mask.to(device)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row. The mask keeps padding out of every
    result, so a prompt's numbers change only by float rounding, and a batch of short prompts
    stops paying for the full context (3-9 % of the small GAN's time, 12-token prompts of 32)."""
    longest = max(int(mask.sum(1).max()), 1)
    return ids[:, :longest], mask[:, :longest]
