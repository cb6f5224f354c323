"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained by our own jobs.

Byte-level means every Unicode string round-trips losslessly: unknown characters fall
back to their UTF-8 bytes, which are always in the base vocabulary.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


class Tokenizer:
    """Thin wrapper that fixes our conventions: byte-level BPE, one end-of-text token."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        # Special tokens typed by a user are text, not control tokens (no prompt injection of EOT).
        self.hf.encode_special_tokens = True
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_id: int = eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: lossless
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)
