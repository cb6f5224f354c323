"""The sampler: logits -> logit bias -> repetition penalty -> presence / frequency penalties
-> temperature -> bans -> top-k / top-p / typical-p / min-p -> softmax -> inverse-CDF draw with
one uniform from the request's own generator; greedy rows take the argmax of the biased,
penalised logits with the bans.

Everything is batched over rows, each row with its own parameters, so one decode step
serves many requests; a row's draw depends only on its logits and its own generator.
The bias and the penalties act on the raw logits first (the order of Hugging Face and vLLM),
so that they also apply to greedy decoding. A ban (-inf) is -inf whatever the bias, penalties
and temperature do, so banning after them draws what banning first would, and the filters
see the bans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.errors import InvalidParameter, is_int, is_number

# torch's CPU generator keeps only the low 32 bits of a seed (seeds 0 and 2**32 draw the same
# numbers), so a request's seeds, seed + i for its n choices or images, stay within 32 bits.
MAX_SEED = 2**32 - 1
MAX_TOP_K = 2**31 - 1  # beyond any vocabulary; larger values would not fit the sampler's tensors
# A penalty divides positive logits: below this, float32 logits overflow to inf (and a penalty
# under 1.4e-45 rounds to 0), softmax turns them into NaN, and the draw is garbage.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10
MAX_TEMPERATURE = 100  # far past any useful setting; keeps logits / temperature finite
# Below this a temperature decodes greedily, as vLLM's does: dividing by it would overflow the
# logits, and under about 1e-45 it is 0 in a float32 tensor (greedy or not by what shared the batch).
GREEDY_BELOW = 1e-5
MAX_PENALTY = 2  # presence and frequency penalties, in [-2, 2] as OpenAI's
MAX_LOGIT_BIAS_TOKENS = 300  # entries of one request's logit_bias: each costs work at every step


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or under GREEDY_BELOW) means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    min_p: float = 0.0  # drop tokens below min_p * p(best), in [0, 1] (1: the best only, ties kept)
    # locally typical sampling's mass kept, in (0, 1]: the tokens whose surprise is closest to
    # the distribution's entropy (text-generation-inference's and Hugging Face's typical_p)
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (prompt and completion)
    # OpenAI's: subtracted from the logit of every token the completion already holds, once
    # (presence) or once per occurrence (frequency); negative values encourage repeats.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias in [-100, 100]) pairs added to those logits: -100 all but bans a token,
    # 100 all but forces it (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        for name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):  # library callers
            value = getattr(self, name)
            if not (is_int(value) if name == "top_k" else is_number(value)):
                raise InvalidParameter(name, f"must be {'an integer' if name == 'top_k' else 'a number'}, got {value!r}")
        checks = [
            ("temperature", math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
             f"must be a finite number in [0, {MAX_TEMPERATURE}]"),
            ("top_k", 0 <= self.top_k <= MAX_TOP_K, f"must be in [0, {MAX_TOP_K}] (0 turns it off)"),
            ("top_p", math.isfinite(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", math.isfinite(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("typical_p", math.isfinite(self.typical_p) and 0 < self.typical_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty)
             and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]"),
            ("presence_penalty", math.isfinite(self.presence_penalty) and abs(self.presence_penalty) <= MAX_PENALTY,
             f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_PENALTY,
             f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidParameter(name, f"{why}, got {getattr(self, name)!r}")
        if not (isinstance(self.logit_bias, tuple)
                and all(isinstance(e, tuple) and len(e) == 2 for e in self.logit_bias)):
            raise InvalidParameter("logit_bias", f"must be a tuple of (token id, bias) pairs, got {self.logit_bias!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidParameter("logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not (is_int(token) and token >= 0 and is_number(bias) and math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidParameter("logit_bias", f"needs token ids >= 0 and biases in [-100, 100], "
                                                     f"got {token!r}: {bias!r}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise InvalidParameter("logit_bias", "names a token more than once")


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per batch, and the names of the
    optional steps any row needs (`uses`, plain Python): checking a tensor every decode step
    costs a device round trip, and the sort that top-p needs is the most expensive part of
    sampling."""
    temperature: Tensor  # (B, 1)
    top_k: Tensor  # (B, 1) long, 0 = off
    top_p: Tensor  # (B, 1)
    min_p: Tensor  # (B, 1)
    typical_p: Tensor  # (B, 1)
    repetition_penalty: Tensor  # (B, 1)
    presence_penalty: Tensor  # (B, 1)
    frequency_penalty: Tensor  # (B, 1)
    logit_bias: tuple[Tensor, Tensor, Tensor]  # (row, token, bias) of every row's entries, (K,) each
    # of "greedy", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "counts" (presence or frequency),
    # "logit_bias"
    uses: frozenset[str] = frozenset()

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> "SamplingBatch":
        """Two host-to-device copies (the float columns as one tensor, top-k), three more when
        some row has a logit bias: the continuous engine builds this whenever its rows change."""
        off = SamplingParams()
        uses = {name for name in ("top_k", "top_p", "min_p", "typical_p", "repetition_penalty")
                if any(getattr(p, name) != getattr(off, name) for p in params)}
        if any(p.greedy for p in params):
            uses.add("greedy")
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            uses.add("counts")
        if any(p.logit_bias for p in params):
            uses.add("logit_bias")
        floats = torch.tensor([[0.0 if name == "temperature" and p.greedy else getattr(p, name)
                                for name in _FLOAT_COLUMNS] for p in params], device=device)
        temperature, top_p, min_p, typical_p, repetition, presence, frequency = floats.split(1, dim=1)  # (B, 1) views
        top_k = torch.tensor([[p.top_k] for p in params], dtype=torch.long, device=device)
        return cls(temperature, top_k, top_p, min_p, typical_p, repetition, presence, frequency,
                   _bias_entries([p.logit_bias for p in params], device), frozenset(uses))

    def select(self, rows: Tensor) -> "SamplingBatch":
        """Keep only `rows` (when finished sequences leave the batch). `uses` stays as it was:
        a step that no remaining row needs is a no-op for them."""
        row, token, bias = self.logit_bias
        if row.numel():  # renumber the entries of the rows that stay
            new_row = torch.full((self.temperature.size(0),), -1, dtype=torch.long, device=rows.device)
            new_row[rows] = torch.arange(rows.numel(), device=rows.device)  # old row -> new row, -1 if gone
            kept = new_row[row] >= 0
            row, token, bias = new_row[row][kept], token[kept], bias[kept]
        return SamplingBatch(*(t.index_select(0, rows) for t in
                               (self.temperature, self.top_k, self.top_p, self.min_p, self.typical_p,
                                self.repetition_penalty,
                                self.presence_penalty, self.frequency_penalty)),
                             (row, token, bias), self.uses)


_FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


def _bias_entries(biases: list[tuple[tuple[int, float], ...]], device: torch.device | str) -> tuple[Tensor, ...]:
    """Every row's logit_bias as three (K,) tensors: row, token, bias (empty, and no copy, when
    no row has one)."""
    entries = [(r, token, bias) for r, pairs in enumerate(biases) for token, bias in pairs]
    if not entries:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, empty.float()
    row, token, bias = zip(*entries)
    return (torch.tensor(row, dtype=torch.long, device=device), torch.tensor(token, dtype=torch.long, device=device),
            torch.tensor(bias, dtype=torch.float32, device=device))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """CTRL-style penalty on tokens already in the row: positive logits divided, negative multiplied.

    logits (B, V) float, seen (B, V) bool, penalty (B, 1).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_count_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's presence and frequency penalties: logit - frequency * count - presence * (count > 0),
    where count is how often the row's completion holds the token (its prompt does not count, as
    in vLLM). logits and counts (B, V) float, presence and frequency (B, 1)."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def filter_logits(logits: Tensor, params: SamplingBatch) -> Tensor:
    """Set to -inf every logit that top-k, then top-p, then typical-p (each on the renormalised
    rest), then min-p removes.

    logits (B, V); per row, top_k 0 = off, top_p 1 = off, typical_p 1 = off, min_p 0 = off. A
    token always survives. Each filter runs only when some row uses it (`params.uses`).
    """
    out, top_k, top_p, min_p = logits, params.top_k, params.top_p, params.min_p
    if "top_k" in params.uses:
        k_max = min(max(int(top_k.max()), 1), logits.size(-1))  # ≥ 1: rows that used it may have left
        best = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
        kth = best.gather(1, (top_k.clamp(1, k_max) - 1))  # (B, 1): each row's k-th best logit
        out = out.masked_fill((top_k > 0) & (logits < kth), float("-inf"))
    if "top_p" in params.uses:
        sorted_logits, order = out.sort(dim=-1, descending=True, stable=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
        remove = (top_p < 1) & (mass_before >= top_p)  # keeps the token that crosses top_p
        remove[:, 0] = False
        out = out.masked_fill(torch.zeros_like(remove).scatter_(1, order, remove), float("-inf"))
    if "typical_p" in params.uses:  # Meister et al., "Locally Typical Sampling" (2022)
        logp = out.log_softmax(dim=-1)
        entropy = torch.special.entr(logp.exp()).sum(dim=-1, keepdim=True)  # expected surprise
        distance, order = (-logp - entropy).abs().sort(dim=-1, stable=True)  # tokens removed before: inf, last
        probs = logp.gather(1, order).exp()
        crossing = ((probs.cumsum(dim=-1) - probs) < params.typical_p).sum(dim=-1, keepdim=True).sub_(1).clamp_(min=0)
        # beyond the token that crosses typical_p (the first, where typical_p rounds to 0 in float32);
        # a token as typical as that one stays too (as in Hugging Face's TypicalLogitsWarper: equally
        # likely tokens are kept or dropped together)
        remove = (params.typical_p < 1) & (distance > distance.gather(1, crossing))
        out = out.masked_fill(torch.zeros_like(remove).scatter_(1, order, remove), float("-inf"))
    if "min_p" in params.uses:
        probs = out.softmax(dim=-1)
        out = out.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return out


def inverse_cdf_sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Pick, per row, the first token whose cumulative probability exceeds u * total.

    probs (B, V) >= 0, uniforms (B,) in [0, 1). `right=True` never lands on a zero-probability
    token: the chosen i satisfies cdf[i-1] <= x < cdf[i], so p_i > 0.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    x = (uniforms * cdf[:, -1]).unsqueeze(-1)  # (B, 1); scaling by the total absorbs rounding
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.size(-1) - 1)


class RowRandom:
    """A row's own stream of uniforms: a CPU generator seeded by the request, read in blocks.

    torch.rand(k) yields exactly the numbers of k calls to torch.rand(1) (tested), so a seed
    gives the same tokens whatever the block size; one generator call per row and step cost
    1.6 µs a row, a third of the sampler's time at 32 rows.
    """

    def __init__(self, seed: int, block: int = 64):
        self.generator = torch.Generator().manual_seed(seed)
        self.block = block
        self._buffer: list[float] = []

    def next(self) -> float:
        if not self._buffer:
            self._buffer = torch.rand(self.block, generator=self.generator).tolist()[::-1]
        return self._buffer.pop()


def draw_uniforms(rows: list[RowRandom]) -> Tensor:
    """One uniform per row, each from that row's own stream (float32, CPU)."""
    return torch.tensor([row.next() for row in rows])


def sample(logits: Tensor, params: SamplingBatch, randoms: list[RowRandom],
           seen: Tensor | None = None, counts: Tensor | None = None,
           banned: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Choose one token per row. logits (B, V) float32; returns (B,) long on logits' device.
    seen (B, V) bool: tokens of the prompt and completion; counts (B, V) float: how often the
    completion holds each token (read only when some row's penalty needs them); banned: (rows,
    tokens), (K,) long each, never drawn this step (end-of-text, stop tokens, before a row's min_tokens)."""
    if "logit_bias" in params.uses:
        logits = logits.index_put(params.logit_bias[:2], params.logit_bias[2], accumulate=True)
    if seen is not None and "repetition_penalty" in params.uses:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and "counts" in params.uses:
        logits = apply_count_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    tempered = logits / params.temperature.clamp(min=1e-6)
    if banned is not None:  # into the division's new tensor: a copy of the logits costs 4 % of a batch-32 step
        tempered.index_put_(banned, tempered.new_tensor(float("-inf")))
    filtered = filter_logits(tempered, params)
    probs = filtered.softmax(dim=-1)
    uniforms = draw_uniforms(randoms).to(logits.device)  # drawn for greedy rows too: streams stay aligned
    drawn = inverse_cdf_sample(probs, uniforms)
    if "greedy" not in params.uses:
        return drawn
    greedy = params.temperature.squeeze(-1) == 0  # (B,)
    if banned is not None:  # greedy: the logits' own argmax (dividing by 1e-6 may round two logits to one value)
        logits = logits.index_put(banned, logits.new_tensor(float("-inf")))
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def top_logprobs(logprobs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row: (values (B, k), ids (B, k))."""
    return logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
