"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained by our own jobs.

Byte-level means every Unicode string round-trips losslessly: unknown characters fall
back to their UTF-8 bytes, which are always in the base vocabulary.
"""
from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MAX_TRAINING_WORD = 256  # characters; see Tokenizer.train
MIN_VOCAB = 257  # every byte, and end-of-text


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the others for characters from 256 up (`tokenizers`' ByteLevel uses the same table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


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
        """A tokenizer of at most vocab_size tokens: the 256 bytes and end-of-text, then the
        merges the texts teach."""
        if vocab_size < MIN_VOCAB:  # the trainer returned the 257 in silence
            raise ValueError(f"vocab_size={vocab_size}: must be at least {MIN_VOCAB} (256 bytes and end-of-text)")
        if isinstance(texts, str):  # iterated, it is one text per character
            raise ValueError("texts: an iterable of strings, not one string")
        hf = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # BPE training time grows with the square of a word's length: a 3 MB line with no
        # whitespace (DNA, base64, minified JSON) took most of an hour. Training alone cuts such
        # runs into words of at most MAX_TRAINING_WORD characters; encoding keeps them whole.
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_TRAINING_WORD}}}"), behavior="isolated"), byte_level])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: lossless
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        hf.pre_tokenizer = byte_level
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def to_str(self) -> str:
        """The tokenizer.json text (a training checkpoint carries it beside the weights)."""
        return self.hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Bytes in the longest token (byte-level: one vocabulary character per byte). A text of
        c characters has at least c bytes, so at least c / max_token_bytes tokens: its length
        alone can show that it will not fit a context, without tokenizing it."""
        return max(len(token) for token in self.hf.get_vocab())

    def token_name(self, token_id: int) -> str:
        """A token's text, as logprobs show it. A byte-level token can hold part of a
        character, which decodes to U+FFFD (130 of the default model's 2,048 tokens do): such a
        token is named by its bytes, as OpenAI names them ("bytes:\\xe2\\x80"), so that distinct
        tokens keep distinct names."""
        names = self._token_names
        # A model's vocabulary may be padded past the tokenizer's: such ids decode to nothing.
        return names[token_id] if token_id < len(names) else f"<unused:{token_id}>"

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for (a special token: its text's)."""
        pieces = self._token_bytes
        return pieces[token_id] if token_id < len(pieces) else b""

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        byte_of = _byte_level_chars()
        pieces = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i) or ""
            special = piece == EOT or not all(c in byte_of for c in piece)
            pieces.append(self.decode([i]).encode() if special else bytes(byte_of[c] for c in piece))
        return pieces

    @functools.cached_property
    def _token_names(self) -> list[str]:
        names = []
        for raw in self._token_bytes:
            try:
                names.append(raw.decode())
            except UnicodeDecodeError:
                names.append("bytes:" + repr(raw)[2:-1])
        return names

    def encode(self, text: str) -> list[int]:
        # (encode_batch, not encode: it releases the GIL, so that a thread tokenizing a long text
        # leaves the others running: a server's event loop)
        return self.hf.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids and, for each, the characters of `text` it covers, (start, stop): the tokens
        of one character share its span."""
        enc = self.hf.encode_batch([text], add_special_tokens=False)[0]
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Decodes a completion one token at a time, in time that does not grow with its length.

    A byte-level token can end inside a UTF-8 character; the standard library's incremental
    UTF-8 decoder holds back only such a begun character and releases everything else at once,
    an invalid byte as one U+FFFD, as decoding the whole text would. (Decoding the tokens since
    the last complete character again at each step held back every invalid byte for good,
    with a cost that grew with their number; `tokenizers`' DecodeStream holds back everything
    after such a point, stop strings in it included.)
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def pending(self) -> bytes:
        """The bytes of a character begun and not yet complete."""
        return self.utf8.getstate()[0]

    def step(self, token_id: int) -> str:
        """The text this token makes final: all of it but a character it leaves unfinished."""
        return self.utf8.decode(self.tokenizer.token_bytes(token_id))

    def start_of(self, token_id: int) -> int:
        """Where the next token's text will start, in characters, counted from the end of the
        text returned so far: there, or one character later when a begun character is pending
        and the token cannot continue it (the begun character will be one U+FFFD)."""
        if not (pending := self.pending):
            return 0
        try:
            codecs.utf_8_decode(pending + self.tokenizer.token_bytes(token_id)[:1], "strict", False)
        except UnicodeDecodeError:
            return 1
        return 0

    def flush(self) -> str:
        """The rest, an incomplete character decoded as U+FFFD."""
        out = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return out
