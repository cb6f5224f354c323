"""Train the GPT token sampler: `python -m training.train_gpt --preset small`.

Runs unchanged on one CPU, one GPU, or under `torchrun --nproc_per_node=N` (DDP).
Each step's batch and dropout are drawn from generators seeded by (seed, step, rank),
so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.artifacts import save_model_dir
from models.engine import CompletionRequest, TextEngine
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import EOT, MIN_VOCAB, Tokenizer
from training.common import (SEED, above, all_reduce_mean, at_least, atomic_save, autocast_for,
                             check_device, check_folder, check_fresh_run, check_model_folder, check_outputs,
                             check_resume_data, check_world_size, cosine_lr, diverged, fraction, get_tokenizer,
                             load_checkpoint, one_of, parse_config, report_halt, report_resume, require_finite,
                             restore, resumable, run_cli, setup_distributed, teardown_distributed)
from training.data.text_corpus import load_corpus


@dataclass
class TrainGPTConfig:
    data: str = field(default="", metadata={"help": "comma-separated .txt / .jsonl files or folders of them; "
                                                     "empty = Python's own docs"})
    max_chars: int = field(default=0, metadata={"help": "use only the first N characters of the corpus (0 = all)",
                                                "valid": at_least(0)})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size to train, an upper bound (256 "
                                                            "bytes + end-of-text + merges: a small text has fewer)",
                                                    "valid": at_least(MIN_VOCAB)})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks", "valid": at_least(1)})
    n_head: int = field(default=4, metadata={"help": "attention heads", "valid": at_least(1)})
    n_embd: int = field(default=128, metadata={"help": "embedding width", "valid": at_least(1)})
    block_size: int = field(default=128, metadata={"help": "context length in tokens", "valid": at_least(2)})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability", "valid": fraction()})
    bias: bool = field(default=True, metadata={"help": "biases in Linear and LayerNorm"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per process",
                                                  "valid": at_least(1)})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "valid": at_least(1)})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps", "valid": at_least(1)})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate", "valid": above(0)})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps", "valid": at_least(0)})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)",
                                                       "valid": at_least(0)})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)",
                                                    "valid": at_least(0)})
    eval_interval: int = field(default=100, metadata={"help": "steps between validation runs", "valid": at_least(1)})
    eval_batches: int = field(default=20, metadata={"help": "batches per validation run", "valid": at_least(1)})
    ckpt_interval: int = field(default=100, metadata={"help": "steps between checkpoints", "valid": at_least(1)})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "valid": one_of("auto", "cpu", "cuda")})
    seed: int = field(default=1337, metadata={"help": "seed for init, batches and dropout", "valid": SEED})
    run_dir: str = field(default="runs/gpt", metadata={"help": "checkpoints, curves and samples go here"})
    resume: bool = field(default=False, metadata={"help": "continue from run_dir/ckpt.pt"})
    halt_after: int = field(default=0, metadata={"help": "checkpoint and exit after this many steps in this "
                                                         "invocation (0 = run to max_steps); for time-sliced machines",
                                                 "valid": at_least(0)})
    out: str = field(default="", metadata={"help": "also write the model directory here"})
    store: bool = field(default=True, metadata={"help": "save the model to the BentoML store"})
    name: str = field(default="gpt", metadata={"help": "model name in the store"})

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}")
        check_outputs(self.name, self.store, self.out, "gpt")
        check_model_folder(self.out)
        check_folder(self.run_dir, "--run_dir")
        check_device(self.device)


SHAPE = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "bias")  # what a resumed run must keep
DATA_KEYS = ("data", "max_chars")  # what chose the corpus, for a checkpoint older than its hash

PRESETS: dict[str, dict] = {
    "tiny": dict(max_chars=200_000, vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=8,
                 max_steps=40, warmup=5, eval_interval=20, eval_batches=2, ckpt_interval=10, run_dir="runs/gpt-tiny"),
    "small": dict(),
    "gpt2-124m": dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16,
                      grad_accum=8, max_steps=5000, lr=6e-4, warmup=200, eval_interval=250, ckpt_interval=250,
                      compile=True, device="cuda", run_dir="runs/gpt2-124m"),
}


def encode_documents(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each ended by the end-of-text token."""
    ids: list[int] = []
    for doc_ids in tok.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tok.eot_id)
    return torch.tensor(ids, dtype=torch.long)


def get_batch(data: torch.Tensor, block: int, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(data) - block - 1, (batch,), generator=g)
    x = torch.stack([data[s:s + block] for s in starts])  # (B, T)
    y = torch.stack([data[s + 1:s + 1 + block] for s in starts])  # (B, T) next tokens
    return x, y


def make_optimizer(model: torch.nn.Module, cfg: TrainGPTConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (dim >= 2) only: not on biases, LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, cfg: TrainGPTConfig, device: torch.device) -> float:
    """Mean loss over fixed validation batches (the same windows at every evaluation)."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    block = min(cfg.block_size, len(data) - 2)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = get_batch(data, block, cfg.batch_size, g)
        with autocast_for(device):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def save_curves(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["train_loss"], label="train loss", alpha=0.7)
    ax.plot(history["eval_step"], history["val_loss"], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFAULT_SAMPLE_PROMPTS = ["The ", "Return the ", "This module ", "If the "]  # how the default corpus's texts begin


def sample_prompts(data: str, train_docs: list[str]) -> list[str]:
    """The prompts of samples.txt: for the user's own text, the first two words of its first
    four training documents (how the model learned that a text begins; at most 40 characters: a
    "word" of text written without spaces may be the whole document), else the default's."""
    starts = [" ".join(doc.split()[:2])[:40] + " " for doc in train_docs if doc.split()][:4]
    return starts if data and starts else DEFAULT_SAMPLE_PROMPTS


def write_samples(model: GPT, tok: Tokenizer, path: Path, prompts: list[str]) -> None:
    """Completions of the prompts; with a short context (any --block_size >= 2) the completion
    takes at most half of it and the prompt keeps its last tokens."""
    engine = TextEngine(model, tok, device="cpu")
    reqs = [CompletionRequest(p, seed=i, max_tokens=min(48, model.config.block_size // 2), truncate=True,
                              sampling=SamplingParams(temperature=0.8, top_k=50)) for i, p in enumerate(prompts)]
    lines = [f"### {r.prompt!r} (seed {r.seed})\n{r.prompt}{c.choices[0].text}\n"
             for r, c in zip(reqs, engine.complete(reqs))]
    path.write_text("\n".join(lines))


def train(cfg: TrainGPTConfig) -> dict:
    d = setup_distributed(cfg.device)
    run = Path(cfg.run_dir)
    ckpt_path = run / "ckpt.pt"
    check_fresh_run(ckpt_path, cfg.resume)
    ckpt = load_checkpoint(ckpt_path, asdict(cfg), SHAPE, job="gpt") if cfg.resume else None

    corpus = load_corpus(cfg.data, max_chars=cfg.max_chars)
    if ckpt is not None:
        check_resume_data(ckpt, ckpt_path, asdict(cfg), corpus.hash, DATA_KEYS,
                          other_cause="how they are split into training and validation (the rule for a few or "
                                      "unequal documents changed on 2026-11-27)")
    tok = get_tokenizer(corpus.train, cfg.vocab_size, cfg.run_dir, d, ckpt)
    train_data, val_data = encode_documents(tok, corpus.train), encode_documents(tok, corpus.val)
    for part, ids in (("training", train_data), ("validation", val_data)):
        if len(ids) < cfg.block_size + 2:
            split = ("" if part != "validation" else " (the last 5 % of the text)" if corpus.by_characters
                     else " (about 5 % of the text: whole documents, chosen by their names)")
            raise ValueError(f"--data: the {part} text{split} is {len(ids)} tokens, fewer than --block_size + 2 = "
                             f"{cfg.block_size + 2}: give more text or a smaller --block_size")
    if d.is_main:  # only now that the data is accepted: a refused run leaves run_dir as it was
        cut = f"; --max_chars={cfg.max_chars:,} left out {corpus.left_out:,} characters" if corpus.left_out else ""
        fewer = (f"; the tokenizer has {tok.vocab_size:,} tokens (this text has no more merges for --vocab_size="
                 f"{cfg.vocab_size:,})" if ckpt is None and tok.vocab_size < cfg.vocab_size else "")
        documents = f"{len(corpus.train)} document{'s' * (len(corpus.train) != 1)}"
        held_out = (": the text's last 5 %, too few or too unequal documents to hold out whole ones"
                    if corpus.by_characters else "")
        print(f"data: {documents} for training ({len(train_data):,} tokens), "
              f"{len(corpus.val)} for validation ({len(val_data):,} tokens){held_out}{cut}{fewer}", file=sys.stderr)
        run.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            tok.save(run / "tokenizer.json")
    val_bytes = sum(len(t.encode("utf-8")) + len(EOT) for t in corpus.val)

    torch.manual_seed(cfg.seed)
    vocab = math.ceil(tok.vocab_size / 64) * 64  # a multiple of 64 is kinder to matmul kernels
    gcfg = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    model = GPT(gcfg).to(d.device)
    optimizer = make_optimizer(model, cfg, d.device)
    history = {"step": [], "train_loss": [], "eval_step": [], "val_loss": []}
    step = 0
    if ckpt is not None:
        step, history = restore(ckpt, ckpt_path, model=model, optimizer=optimizer)
        if d.is_main:
            report_resume(step, cfg.max_steps, ckpt_path)
        check_world_size(ckpt, d)
    train_model = torch.compile(model) if cfg.compile else model
    if d.world_size > 1:
        train_model = DDP(train_model)

    model.train()
    t0 = time.time()
    halt_at = min(cfg.max_steps, step + cfg.halt_after) if cfg.halt_after else cfg.max_steps
    bar = tqdm(total=cfg.max_steps, initial=step, desc="gpt", disable=not d.is_main, file=sys.stderr)
    while step < halt_at:
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * d.world_size + d.rank)
        torch.manual_seed(cfg.seed + step * d.world_size + d.rank)  # dropout
        # The step's loss stays on the device until the step ends: reading it after each micro-batch
        # (`.item()`) made the CPU wait for the GPU before it could queue the next one.
        total = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.block_size, cfg.batch_size, g)
            sync = micro == cfg.grad_accum - 1 or d.world_size == 1
            ctx = train_model.no_sync() if not sync else torch.enable_grad()
            with ctx, autocast_for(d.device):
                _, loss = train_model(x.to(d.device), y.to(d.device))
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["step"].append(step)
        history["train_loss"].append(all_reduce_mean(total.item(), d))
        if not math.isfinite(history["train_loss"][-1]):  # never checkpoint, let alone store, a diverged model
            raise FloatingPointError(diverged(step, f"the training loss is {history['train_loss'][-1]}", ckpt_path))
        bar.update(1)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", lr=f"{lr:.2e}")
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val = all_reduce_mean(evaluate(model, val_data, cfg, d.device), d)
            history["eval_step"].append(step)
            history["val_loss"].append(val)
            bar.write(f"step {step}: train {history['train_loss'][-1]:.4f}, val {val:.4f}")
        if d.is_main and (step % cfg.ckpt_interval == 0 or step == halt_at):
            require_finite(step, ckpt_path, model=model)
            atomic_save({"job": "gpt", "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "config": asdict(cfg), "tokenizer": tok.to_str(),
                         "dataset": corpus.hash, "world_size": d.world_size}, ckpt_path)
    bar.close()
    if d.is_main and step < cfg.max_steps:
        report_halt(step, cfg.max_steps, ckpt_path)
    if step >= cfg.max_steps and history["eval_step"][-1:] != [step]:  # resumed at or past max_steps
        history["eval_step"].append(step)
        history["val_loss"].append(all_reduce_mean(evaluate(model, val_data, cfg, d.device), d))

    result: dict = {}
    if d.is_main and step >= cfg.max_steps:
        require_finite(step, ckpt_path, model=model)
        result = finish(cfg, model, tok, corpus.hash, history, val_data, val_bytes, time.time() - t0,
                        sample_prompts(cfg.data, corpus.train))
    teardown_distributed()
    return result


def finish(cfg: TrainGPTConfig, model: GPT, tok: Tokenizer, dataset_hash: str, history: dict,
           val_data: torch.Tensor, val_bytes: int, seconds: float, prompts: list[str]) -> dict:
    """Write the report (curves, samples, metrics) and the model directory; save to the store."""
    run = Path(cfg.run_dir)
    model = model.to("cpu").float().eval()
    val_loss = history["val_loss"][-1]
    metrics = {
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss * len(val_data) / val_bytes / math.log(2),
        "train_loss": history["train_loss"][-1],
        "steps": history["step"][-1],
        "params": model.num_params(),
        "train_seconds_this_run": round(seconds, 1),
        "dataset_hash": dataset_hash,
        "tokenizer_vocab": tok.vocab_size,
    }
    print(f"validation: loss {val_loss:.4f}, {metrics['val_bits_per_byte']:.3f} bits per byte", file=sys.stderr)
    save_curves(history, run / "loss.png")
    write_samples(model, tok, run / "samples.txt", prompts)
    model_dir = save_model_dir(run / "model", model.config.to_dict(), model.state_dict(), tok, metrics)
    if cfg.out:
        save_model_dir(cfg.out, model.config.to_dict(), model.state_dict(), tok, metrics)
    if cfg.store:
        from training.store import save_to_store

        metrics["tag"] = save_to_store(cfg.name, model_dir, labels={"family": "gpt", "dataset": dataset_hash},
                                       metadata={"val_loss": val_loss})
        print(f"saved {metrics['tag']} to the BentoML store", file=sys.stderr)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(TrainGPTConfig, PRESETS, argv, description=__doc__)
    return train(cfg)


if __name__ == "__main__":
    run_cli(main, on_interrupt=resumable)
