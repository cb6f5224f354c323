"""A GPT-2 style decoder-only transformer, with a KV cache for incremental decoding.

Parameter names follow GPT-2 / nanoGPT (transformer.h.0.attn.c_attn, ...) so real GPT-2
weights import by name (see `from_hf_gpt2`).

Submodules are called through `.forward`: nn.Module.__call__'s hook checks, some 50 calls a
decode step, cost 10-14 % of the small model's batch-1 forward pass on the CPU, and this model
uses no hooks.
"""
from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from models.artifacts import ArtifactError, positive_ints, read_json, read_shapes
from models.errors import is_number


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (prompt + completion), in tokens
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a saved config.json: every field required and checked (ValueError naming it); a
        missing one must not take its default, which the weights' shapes may not reveal."""
        positive_ints(d, ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"))
        if not isinstance(d.get("bias"), bool):
            raise ValueError(f"bias must be true or false, got {d.get('bias')!r}")
        dropout = d.get("dropout")
        if not is_number(dropout) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self) -> None:
        """A config built directly is checked too: n_head not dividing n_embd built, then failed
        in the first forward pass with a shape error."""
        positive_ints(asdict(self), ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    def to_dict(self) -> dict:
        return {"family": "gpt", **asdict(self)}


def dropout(p: float) -> nn.Module:
    """nn.Dropout, or nn.Identity for p = 0: even an inactive Dropout is a function call, and
    a decode step makes nine (4 % of a batch-1 step of the small model)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# Batch-invariant decoding (`GPT.set_batch_invariant`). MKL chooses a matrix product's kernel
# and how it splits the sum from the product's shape, in ways that differ between CPUs (one row,
# two or three, and four or more rounded differently on one Xeon; five or more on an AVX-512
# one with AMX); GELU's kernel rounds an element by where it falls in the tensor (its vector
# loop's tail, how threads split the tensor: on 3 threads a long prompt's did); and attention
# rounds differently with how many cache positions the batch reads. So by default a row's
# logits depend, in their last bits, on what shares its batch. Computing every matrix product,
# and the MLP whole, in blocks of exactly ROW_BLOCK rows (one shape whatever the batch; a block
# of the MLP's hidden layer holds 16 × n_embd values, no vector tail), and reading the cache in
# whole KV_BLOCKs through a plain attention, makes each row's arithmetic the same whatever the
# batch (tested, and checked when an engine starts: models.continuous.check_batch_invariance).
ROW_BLOCK = 4
KV_BLOCK = 16


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def invariant_read(kv_len: int, head_dim: int) -> int:
    """Cache positions attention reads in the exact mode: whole KV_BLOCKs, and at least enough
    that a decode step's one-query products (head_dim × positions) stay on one kernel whatever
    else the batch reads: PyTorch's CPU bmm computes products under 400 multiply-adds with a
    plain loop, which rounds differently (a head size of 16 over 16 positions did)."""
    return max(round_up(kv_len, KV_BLOCK), round_up(-(-512 // head_dim), KV_BLOCK))


def in_row_blocks(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn over x's rows, ROW_BLOCK rows at a time (the last block padded with zeros)."""
    rows = x.reshape(-1, x.size(-1))
    extra = -rows.size(0) % ROW_BLOCK
    blocks = (F.pad(rows, (0, 0, 0, extra)) if extra else rows).split(ROW_BLOCK)
    return torch.cat([fn(block) for block in blocks])[:rows.size(0)].view(*x.shape[:-1], -1)


def row_blocked_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(x), one product per ROW_BLOCK rows of x: a single product of a batch's rows, even
    padded to a multiple of ROW_BLOCK, is a shape MKL may round differently."""
    return in_row_blocks(lambda block: F.linear(block, linear.weight, linear.bias), x)


def row_blocked_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """mlp(x), ROW_BLOCK rows at a time: GELU's kernel sees one shape whatever the batch."""
    return in_row_blocks(lambda block: type(mlp).forward(mlp, block), x)


def invariant_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kv_len: int) -> Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H, L, D), L a multiple of KV_BLOCK: a query
    sees the cached positions its mask allows (B, 1, T, kv_len), or all first kv_len with no
    mask. The same arithmetic for a row whatever L and T: positions past kv_len are masked
    (they add exact zeros), and several queries per row (a prompt pass; GPT.forward_cached
    makes it at least two) are padded to a multiple of ROW_BLOCK, while one (a decode step)
    always takes the one-row products."""
    T, L = q.size(2), k.size(2)
    if mask is None:
        visible = (torch.arange(L, device=q.device) < kv_len).view(1, 1, 1, L)
    else:
        visible = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], L - kv_len)], dim=-1)
    extra = -T % ROW_BLOCK if T > 1 else 0
    if extra:  # padding queries see everything: no empty softmax
        q = F.pad(q, (0, 0, 0, extra))
        visible = torch.cat([visible.expand(q.size(0), 1, T, L), visible.new_ones(q.size(0), 1, extra, L)], dim=2)
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
    return (scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v)[:, :, :T]


def kv_cache_bytes(n_layer: int, n_embd: int, positions: int, itemsize: int) -> int:
    """Bytes of one sequence's keys and values over `positions`, in every layer."""
    return positions * n_layer * 2 * n_embd * itemsize


class KVCache:
    """Pre-allocated keys and values for one layer: (B, H, max_seq, D), written at given positions.
    Plain tensors, not module state: a cache belongs to a batch being decoded, not to the model
    (it is made on the model's device and dtype by `setup_caches`, never saved or moved)."""

    def __init__(self, batch: int, n_head: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_head, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: Tensor, k: Tensor, v: Tensor, read: int,
               rows: slice | Tensor = slice(None)) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at positions pos (B, T) of cache rows `rows`; return those
        rows' first `read` slots. A slice of rows is written through a view (decoding); a
        tensor of B row indices, scattered rows, is written by indexing (a few prompts
        prefilled together) and read back as a copy."""
        if isinstance(rows, Tensor):
            heads = torch.arange(k.size(1), device=k.device)[None, :, None]
            where = (rows[:, None, None], heads, pos[:, None, :])  # (B, H, T) each, broadcast
            self.k[where], self.v[where] = k, v
            return self.k[rows, :, :read], self.v[rows, :, :read]
        k_rows, v_rows = self.k[rows], self.v[rows]
        index = pos[:, None, :, None].expand_as(k)  # (B, H, T, D)
        k_rows.scatter_(2, index, k)
        v_rows.scatter_(2, index, v)
        return k_rows[:, :, :read], v_rows[:, :, :read]

    def append(self, k: Tensor, v: Tensor, kv_len: int, read: int, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Write one token per row, k, v (B, H, 1, D), every row at position kv_len - 1: a
        strided copy instead of `update`'s scatter (+4.5 % tokens/s at batch 32 on the CPU);
        return the rows' first `read` slots."""
        self.k[rows, :, kv_len - 1] = k[:, :, 0]
        self.v[rows, :, kv_len - 1] = v[:, :, 0]
        return self.k[rows, :, :read], self.v[rows, :, :read]

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (finished rows leave a static batch)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = dropout(cfg.dropout)
        self.attn_dropout_p = cfg.dropout  # a probability: scaled_dot_product_attention applies it
        self.batch_invariant = False  # see GPT.set_batch_invariant

    def forward(self, x: Tensor, cache: KVCache | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, rows: slice | Tensor = slice(None), kv_len: int = 0) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn.forward(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs) each; few calls: a decode step is short
        if cache is None:  # training / full recompute: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.attn_dropout_p if self.training else 0.0)
        else:  # incremental: attend to the first kv_len cached positions, as the mask allows
            read = invariant_read(kv_len, C // self.n_head) if self.batch_invariant else kv_len
            if mask is None:  # one token per row, every row at position kv_len - 1
                k, v = cache.append(k, v, kv_len, read, rows)  # (B, nh, S, hs)
            else:
                k, v = cache.update(pos, k, v, read, rows=rows)
            if self.batch_invariant:
                y = invariant_attention(q, k, v, mask, kv_len)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout.forward(self.c_proj.forward(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 uses the tanh approximation of GELU; matching it keeps imported weights exact.
        return self.dropout.forward(self.c_proj.forward(F.gelu(self.c_fc.forward(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVCache | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, rows: slice | Tensor = slice(None), kv_len: int = 0) -> Tensor:
        x = x + self.attn.forward(self.ln_1.forward(x), cache, pos, mask, rows, kv_len)  # pre-LayerNorm
        return x + self.mlp.forward(self.ln_2.forward(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.caches: list[KVCache] | None = None
        # Ids a tokenizer names (engines set it; training leaves all): the others are never
        # sampled, scored or listed as alternatives.
        self.vocab_in_use = cfg.vocab_size
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Training / full recompute. idx (B, T) -> logits (B, T, V), loss if targets given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte.forward(idx) + self.transformer.wpe.forward(pos)  # (B, T, C)
        x = self.transformer.drop.forward(x)
        for block in self.transformer.h:
            x = block.forward(x)
        logits = self.logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # --- incremental decoding -------------------------------------------------------------
    def set_batch_invariant(self, on: bool = True) -> None:
        """Make a row's logits independent of the batch, bit for bit (CPU, float32): every
        matrix product, and the MLP whole, in blocks of ROW_BLOCK rows, attention read in whole
        KV_BLOCKs (see invariant_attention). By default a row's logits depend on its batch in
        their last bits, which flips a sampled token now and then."""
        in_mlp = {id(part) for mlp in self.modules() if isinstance(mlp, MLP) for part in mlp.modules()}
        for module in self.modules():
            # An MLP's own layers run on its blocks as they are; each other linear layer in blocks
            if isinstance(module, MLP) or isinstance(module, nn.Linear) and id(module) not in in_mlp:
                if on:  # an instance attribute: the default path pays nothing
                    blocked = row_blocked_linear if isinstance(module, nn.Linear) else row_blocked_mlp
                    module.forward = types.MethodType(blocked, module)
                else:
                    module.__dict__.pop("forward", None)
            elif isinstance(module, CausalSelfAttention):
                module.batch_invariant = on

    def column_major_weights(self) -> None:
        """Keep every linear weight (out, in) in memory as its transpose, (in, out), the layout of
        Hugging Face's Conv1D: F.linear then runs MKL's untransposed product, which a decode step's
        shapes take faster on the CPU (+10 % tokens/s at batch 32 with the small model; the same at
        batch 1). Same values, shapes and parameters. The tied embedding is laid out so too: its
        lookups read strided rows (512 ids of GPT-2's vocabulary: 0.16 -> 5-9 ms, in a prompt
        pass of 1.3 s on one CPU thread). `save_model_dir` saves contiguous copies; a plain
        safetensors `save_file` of this state_dict would refuse it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()

    @property
    def batch_invariant(self) -> bool:
        return self.transformer.h[0].attn.batch_invariant

    def setup_caches(self, batch: int, max_seq: int) -> None:
        cfg, p = self.config, self.lm_head.weight
        if self.batch_invariant:  # attention reads whole blocks, at least invariant_read's
            max_seq = invariant_read(max_seq, cfg.n_embd // cfg.n_head)
        self.caches = [KVCache(batch, cfg.n_head, max_seq, cfg.n_embd // cfg.n_head, p.dtype, p.device)
                       for _ in range(cfg.n_layer)]

    def select_cache_rows(self, rows: Tensor) -> None:
        for cache in self.caches:
            cache.select(rows)

    def copy_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of row src into row dst (n samples of one prompt)."""
        for cache in self.caches:
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]

    def forward_cached(self, idx: Tensor, pos: Tensor, mask: Tensor | None, rows: slice | Tensor = slice(None),
                       logits_at: Tensor | None = None) -> Tensor:
        """idx, pos (B, T): tokens and their positions; mask (B, 1, T, S) True = may attend to
        that cached position, or None when every row decodes one token at the same position
        and may see everything before it (no masking to do: 8 % of a batch-1 step on the CPU);
        `rows`: which cache rows these B sequences own (default: all; a slice, or B indices).
        Returns logits (B, T, V), or with `logits_at` (B,) only those at one index of T per
        row, (B, V): a prompt needs the logits of its last token only, and the vocabulary
        projection at every prompt position is a quarter of a small model's prefill FLOPs.

        Each row keeps its own length: a row writes its keys at its own positions, and the
        mask lets a query see only slots at or before its position, so the stale slots past
        a short prompt (right padding) are never read before being overwritten.
        """
        x = self.hidden_cached(idx, pos, mask, rows, prompt_pass=logits_at is not None)
        if logits_at is not None:
            x = x[torch.arange(x.size(0), device=x.device), logits_at]  # (B, C)
        return self.logits(x)  # (B, T, V) or (B, V)

    def hidden_cached(self, idx: Tensor, pos: Tensor, mask: Tensor | None, rows: slice | Tensor = slice(None),
                      prompt_pass: bool = False) -> Tensor:
        """`forward_cached` up to the last block: hidden states (B, T, C), for callers that
        project only some positions to the vocabulary (`logits`). prompt_pass: a prompt's
        pass rather than a decode step (they differ only in the batch-invariant mode)."""
        if prompt_pass and idx.size(1) == 1 and self.batch_invariant:
            # A one-token prompt pass would take the decode step's arithmetic (one query per
            # row, see invariant_attention); the token twice, at the same position (the same
            # keys written twice to the same slot), makes it a prompt pass like any other.
            idx, pos = idx.repeat(1, 2), pos.repeat(1, 2)
            mask = mask.repeat(1, 1, 2, 1) if mask is not None else None
        kv_len = mask.size(-1) if mask is not None else int(pos.max()) + 1  # cached positions to read
        x = self.transformer.wte.forward(idx) + self.transformer.wpe.forward(pos)  # (B, T, C)
        for block, cache in zip(self.transformer.h, self.caches):
            x = block.forward(x, cache, pos, mask, rows, kv_len)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Next-token logits (..., V) of hidden states (..., C); -inf for the ids past
        `vocab_in_use`, which no token has (the vocabulary is padded to a multiple of 64)."""
        logits = self.lm_head.forward(self.transformer.ln_f.forward(x))
        if self.vocab_in_use < logits.size(-1):
            logits[..., self.vocab_in_use:] = float("-inf")
        return logits


# Hugging Face GPT-2 stores these as Conv1D, i.e. (in, out): transpose into nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config settings this model computes only at their defaults, (name, default, what it takes):
# another value would import without error and give other logits than transformers'.
_HF_FIXED = (("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
             ("layer_norm_epsilon", 1e-5, (1e-5,)), ("scale_attn_weights", True, (True,)),
             ("scale_attn_by_inverse_layer_idx", False, (False,)))


def from_hf_gpt2(model_dir: str | Path) -> GPT:
    """Load a local Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors).
    What this model does not compute (an untied lm_head, another activation, layer-norm epsilon
    or attention scaling, an MLP width other than 4 x n_embd) is refused, as is a file it cannot
    read: ArtifactError naming the file."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    hf = read_json(config_path)
    try:
        positive_ints(hf, ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"))
    except ValueError as e:
        raise ArtifactError(f"{config_path}: {e}") from None
    for name, default, taken in _HF_FIXED:
        if (value := hf.get(name, default)) not in taken:
            raise ArtifactError(f"{config_path}: {name}={value!r}: this GPT computes {' or '.join(map(repr, taken))} "
                                f"only")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ArtifactError(f"{config_path}: n_inner={hf['n_inner']}: this GPT's MLP is 4 x n_embd wide")
    if not weights_path.is_file():
        other = next((f.name for f in model_dir.glob("*") if f.name.startswith("model.safetensors.index")
                      or f.suffix == ".bin"), None)
        hint = f" (a .bin checkpoint or sharded safetensors, {other}, are not read: save_pretrained with " \
               f"safe_serialization=True and a max_shard_size larger than the model)" if other else ""
        raise ArtifactError(f"{weights_path}: file is missing{hint}")
    read_shapes(weights_path)  # a file safetensors cannot read fails here, naming it
    try:
        cfg = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)
    except ValueError as e:  # n_head not dividing n_embd
        raise ArtifactError(f"{config_path}: {e}") from None
    model = GPT(cfg)
    ours = model.state_dict()
    theirs = {k.removeprefix("transformer."): v for k, v in load_file(str(weights_path)).items()}
    head, wte = theirs.pop("lm_head.weight", None), theirs.get("wte.weight")  # a head is saved only when not tied
    if hf.get("tie_word_embeddings") is False or (head is not None and wte is not None and not torch.equal(head, wte)):
        raise ArtifactError(f"{weights_path}: lm_head.weight is not the token embedding (wte.weight): this GPT "
                            f"ties them")
    with torch.no_grad():
        for name, target in ours.items():
            if name == "lm_head.weight":  # tied to wte
                continue
            src = theirs.get(name.removeprefix("transformer."))
            if src is None:
                raise ArtifactError(f"{weights_path}: tensor {name.removeprefix('transformer.')} is missing")
            if name.endswith(_CONV1D):
                src = src.t()
            if src.shape != target.shape:
                raise ArtifactError(f"{weights_path}: tensor {name} has shape {tuple(src.shape)}, the config "
                                    f"implies {tuple(target.shape)}")
            target.copy_(src)
    return model
