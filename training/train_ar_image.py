"""Train the raster-scan autoregressive image model: `python -m training.train_ar_image --preset small`.

Steps: fit the k-means code book to the training images, turn every image into its
token sequence once, then train the Transformer with teacher forcing (next-token
cross-entropy), the caption replaced by the empty caption in `p_uncond` of the examples
so the same network also learns the unconditional distribution that classifier-free
guidance needs. Every `eval_interval` steps: validation loss, and the independent
evaluator (training.evaluate) grades samples drawn exactly as the service draws them.

Run folder (--run_dir, or --out): ckpt.pt, evaluator/, samples_*.png,
curves.png, history.json and model/ (the served model directory, also copied to the
BentoML store as `ar_image` unless --store=false). `--resume` continues from ckpt.pt;
`--halt_after N` checkpoints and stops after N steps; under torchrun every rank draws its
own batches (seeded by seed, step and rank, so a resumed run continues exactly) and DDP
averages the gradients.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.ar_image import (MAX_GUIDANCE, ARImageConfig, ARImageEngine, ARImageModel, encode_images,
                             fit_codebook)
from models.artifacts import save_model_dir
from models.text_encoder import encode_prompts
from training.common import (SEED, above, all_reduce_mean, at_least, atomic_save, autocast_for, between,
                             check_fresh_run, check_outputs, check_resume_data, check_world_size, cosine_lr, diverged,
                             fraction, get_tokenizer, load_checkpoint, parse_config, report_halt, report_resume,
                             require_finite, restore, resumable, run_cli, setup_distributed, teardown_distributed)
from training.evaluate import evaluate_generator, load_or_train_evaluator
from training.store import save_to_store
from training.train_gan import (ImageJobConfig, check_captions_fit, check_prompts_fit,
                                check_validation_split, load_data, resume_data_keys, run_dir_argv,
                                sample_prompts, save_grid)
from training.train_gpt import make_optimizer

log = logging.getLogger("train_ar_image")


@dataclass
class ARTrainConfig(ImageJobConfig):
    run_dir: str = field(default="runs/ar_image", metadata={
        "help": "run folder (checkpoint, evaluator, sample grids, curves, model/); alias --out"})
    n_val: int = field(default=512, metadata={"help": "images kept apart for the validation loss",
                                              "valid": at_least(1)})
    patch: int = field(default=2, metadata={"help": "token side in pixels (1 = colour palette)",
                                            "valid": at_least(1)})
    codebook: int = field(default=64, metadata={"help": "k-means code-book entries", "valid": between(16, 256)})
    n_layer: int = field(default=3, metadata={"help": "Transformer blocks", "valid": at_least(1)})
    n_head: int = field(default=4, metadata={"help": "attention heads", "valid": at_least(1)})
    n_embd: int = field(default=96, metadata={"help": "Transformer width", "valid": at_least(1)})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability", "valid": fraction()})
    text_dim: int = field(default=64, metadata={"help": "text encoder width", "valid": at_least(1)})
    text_layers: int = field(default=1, metadata={"help": "text encoder Transformer layers",
                                                  "valid": at_least(0)})
    p_uncond: float = field(default=0.15, metadata={
        "help": "share of examples trained with the empty caption (for guidance)",
        "valid": fraction()})
    guidance_scale: float = field(default=3.0, metadata={
        "help": "the served default guidance scale (1 = none); measured with and without",
        "valid": ((lambda v: 0 <= v <= MAX_GUIDANCE), f"must be in [0, {MAX_GUIDANCE:g}]")})
    batch_size: int = field(default=32, metadata={"help": "images per step per process",
                                                  "valid": at_least(1)})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps", "valid": at_least(1)})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate", "valid": above(0)})
    warmup: int = field(default=30, metadata={"help": "linear warm-up steps", "valid": at_least(0)})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)",
                                                        "valid": at_least(0)})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)",
                                                    "valid": at_least(0)})
    eval_interval: int = field(default=150, metadata={
        "help": "steps between evaluations, each with a checkpoint (see --ckpt_interval)", "valid": at_least(1)})
    eval_per_pair: int = field(default=1, metadata={"help": "prompts per pair in periodic evals",
                                                    "valid": at_least(1)})
    final_per_pair: int = field(default=4, metadata={"help": "prompts per pair in the final eval",
                                                     "valid": at_least(1)})
    seed: int = field(default=1337, metadata={"help": "seed for init, batches and caption dropping", "valid": SEED})
    halt_after: int = field(default=0, metadata={
        "help": "checkpoint and exit after this many steps in this invocation (0 = run to max_steps)",
        "valid": at_least(0)})
    store: bool = field(default=True, metadata={"help": "save the model to the BentoML store"})
    name: str = field(default="ar_image", metadata={"help": "model name in the store"})

    def check(self) -> None:
        """Settings that are wrong together, or that would fail only after training."""
        super().check()
        if self.data == "shapes" and self.n_val >= self.n_train:
            raise ValueError(f"--n_val={self.n_val} leaves no training images of --n_train={self.n_train}")
        if self.image_size % self.patch:
            raise ValueError(f"--image_size={self.image_size} is not a multiple of --patch={self.patch}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}")
        if self.text_dim % ARImageConfig.text_heads:
            raise ValueError(f"--text_dim={self.text_dim} is not divisible by the text encoder's "
                             f"{ARImageConfig.text_heads} heads")
        check_outputs(self.name, self.store, self.run_dir, "ar_image", out_option="--run_dir")


# The settings that change the model's tensors: a checkpoint resumes only with the same ones.
SHAPE_KEYS = ("image_size", "vocab_size", "context", "patch", "codebook", "n_layer", "n_head", "n_embd",
              "text_dim", "text_layers")

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: for tests. 8×8 images keep the sequence at 16 tokens.
    "tiny": dict(image_size=32, n_train=256, n_val=32, patch=8, codebook=16, n_layer=1, n_head=2,
                 n_embd=32, text_dim=32, batch_size=8, max_steps=6, warmup=2, eval_interval=3,
                 final_per_pair=1, evaluator_steps=20, evaluator_n=512),
    # The measured default: about 20 minutes on 2 busy CPU cores.
    "small": dict(),
    # A real GPU run.
    "gpu": dict(n_train=100000, codebook=128, n_layer=8, n_head=8, n_embd=256, text_dim=128,
                text_layers=2, batch_size=128, max_steps=20000, lr=1e-3, warmup=500,
                eval_interval=1000, final_per_pair=16),
}


def model_config(cfg: ARTrainConfig) -> ARImageConfig:
    return ARImageConfig(image_size=cfg.image_size, patch=cfg.patch, codebook=cfg.codebook,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                         dropout=cfg.dropout, vocab_size=cfg.vocab_size, context=cfg.context,
                         text_dim=cfg.text_dim, text_layers=cfg.text_layers,
                         guidance_scale=cfg.guidance_scale)


def save_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax1.plot([h["step"] for h in history], [h[key] for h in history], "o-", label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.legend()
    for key in ("colour", "shape", "coverage", "heldout_colour", "heldout_shape"):
        if any(key in h for h in history):
            ax2.plot([h["step"] for h in history if key in h], [h[key] for h in history if key in h],
                     label=key.replace("_", " "))
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("step")
    if ax2.lines:
        ax2.legend(fontsize=8)
    ax2.set_title("evaluator on guided samples" if ax2.lines else "no labels: not evaluated")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def validation_loss(model: ARImageModel, tokens: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor, batch: int, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(tokens), batch):
        with autocast_for(device):
            _, loss = model(tokens[i:i + batch].to(device), ids[i:i + batch].to(device),
                            mask[i:i + batch].to(device))
        total += loss.item() * len(tokens[i:i + batch])
    model.train()
    return total / len(tokens)


def train(cfg: ARTrainConfig) -> Path:
    """Run the job; returns the model directory (written on rank 0 when max_steps is reached)."""
    d = setup_distributed(cfg.device)
    run = Path(cfg.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.time()
    ckpt_path = run / "ckpt.pt"
    check_fresh_run(ckpt_path, cfg.resume)
    # Read before anything slow: a missing, broken or mismatched checkpoint fails at once (n_val
    # too: another split would validate on images the model trained on).
    ckpt = load_checkpoint(ckpt_path, asdict(cfg), SHAPE_KEYS + ("n_val",), job="ar_image") if cfg.resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, shapes = load_data(cfg)
    check_validation_split(cfg.n_val, data, cfg.data)
    digest = data.digest()
    if ckpt is not None:
        check_resume_data(ckpt, ckpt_path, asdict(cfg), digest, resume_data_keys(cfg))
    tokenizer = get_tokenizer(data.captions, cfg.vocab_size, cfg.run_dir, d, ckpt)
    grid_prompts = sample_prompts(data, shapes, tokenizer, cfg.context)
    # The prompts of the periodic evaluations (seed 0) and of finish (seed 1).
    check_prompts_fit(tokenizer, cfg.context, grid_prompts, shapes,
                      [(cfg.eval_per_pair, 0), (cfg.final_per_pair, 1)])
    check_captions_fit(tokenizer, data.captions, cfg.context, d.is_main)
    run.mkdir(parents=True, exist_ok=True)  # once the data and settings are known to fit
    mcfg = model_config(cfg)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens > vocab_size {mcfg.vocab_size}")
    torch.manual_seed(cfg.seed)
    model = ARImageModel(mcfg).to(d.device)
    optimizer = make_optimizer(model, cfg, d.device)
    step, history = 0, []
    if ckpt is not None:
        step, history = restore(ckpt, ckpt_path, model=model, optimizer=optimizer)
        if d.is_main:
            report_resume(step, cfg.max_steps, ckpt_path)
        check_world_size(ckpt, d)
    else:
        # The same seed on every rank: each fits the identical code book, no broadcast needed.
        codebook = fit_codebook(data.images[:-cfg.n_val], cfg.codebook, cfg.patch, seed=cfg.seed)
        model.codebook.copy_(codebook)
    tokens = encode_images(data.images, model.codebook.cpu(), cfg.patch)       # (N, L)
    ids_all, mask_all = encode_prompts(tokenizer, data.captions, cfg.context)  # (N, T)
    null_ids, null_mask = encode_prompts(tokenizer, [""], cfg.context)         # (1, T)
    n_train = len(data) - cfg.n_val
    val = (tokens[n_train:], ids_all[n_train:], mask_all[n_train:])

    evaluator = None
    if d.is_main and shapes is not None:
        evaluator, ev_metrics = load_or_train_evaluator(
            run / "evaluator", shapes, n_train=cfg.evaluator_n, steps=cfg.evaluator_steps,
            seed=cfg.data_seed)
        log.info("evaluator accuracy on real data: %s", ev_metrics["accuracy"])
    engine = ARImageEngine(model, tokenizer, str(d.device))

    # The text encoder's pooled-vector head gets no gradient (the model reads only its token
    # features), so DDP must be told that some parameters sit out.
    train_model = DDP(model, find_unused_parameters=True) if d.world_size > 1 else model
    model.train()
    halt_at = min(cfg.max_steps, step + cfg.halt_after) if cfg.halt_after else cfg.max_steps
    interval: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, desc="ar_image")
    while step < halt_at:
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * d.world_size + d.rank)
        torch.manual_seed(cfg.seed + step * d.world_size + d.rank)  # dropout
        idx = torch.randint(n_train, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond          # (B,)
        ids = torch.where(drop[:, None], null_ids, ids_all[idx])                 # (B, T)
        mask = torch.where(drop[:, None], null_mask, mask_all[idx])
        with autocast_for(d.device):
            _, loss = train_model(tokens[idx].to(d.device), ids.to(d.device), mask.to(d.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        interval.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        evaluating = step % cfg.eval_interval == 0 or step == halt_at
        if evaluating:
            row: dict[str, Any] = {"step": step, "time_s": round(time.time() - t0, 1),
                                   "train_loss": all_reduce_mean(float(np.mean(interval)), d),
                                   "val_loss": all_reduce_mean(validation_loss(
                                       model, *val, cfg.batch_size, d.device), d)}
            interval = []
            if not np.isfinite(row["train_loss"]):
                raise FloatingPointError(diverged(step, f"the training loss is {row['train_loss']}", ckpt_path))
            if d.is_main:
                if evaluator is not None:
                    m = evaluate_generator(engine, evaluator, shapes, data.images,
                                           per_pair=cfg.eval_per_pair, n=4, seed=0,
                                           memorisation=False)
                    row.update(colour=m["train_accuracy"]["colour"],
                               shape=m["train_accuracy"]["shape"], coverage=m["coverage"])
                    if "heldout_accuracy" in m:  # none with --holdout=''
                        row.update(heldout_colour=m["heldout_accuracy"]["colour"],
                                   heldout_shape=m["heldout_accuracy"]["shape"])
                history.append(row)
                log.info("step %d: %s", step, {k: round(v, 3) for k, v in row.items()})
                save_grid(engine, grid_prompts, run / f"samples_{step:06d}.png")
                save_curves(history, run / "curves.png")
                (run / "history.json").write_text(json.dumps(history, indent=1))
            model.train()
        if d.is_main and cfg.checkpoint_due(step, evaluating):
            require_finite(step, ckpt_path, model=model)
            atomic_save({"job": "ar_image", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "history": history, "config": asdict(cfg),
                         "tokenizer": tokenizer.to_str(), "dataset": digest, "world_size": d.world_size}, ckpt_path)
    bar.close()
    model_dir = run / "model"
    if d.is_main and step < cfg.max_steps:
        report_halt(step, cfg.max_steps, ckpt_path)
    elif d.is_main:
        require_finite(step, ckpt_path, model=model)
        model_dir = finish(cfg, engine, evaluator, shapes, data, digest, tokenizer, time.time() - t0,
                           step, history)
    teardown_distributed()
    return model_dir


def finish(cfg: ARTrainConfig, engine: ARImageEngine, evaluator: Any, shapes: Any, data: Any, digest: str,
           tokenizer: Any, seconds: float, step: int, history: list[dict[str, Any]]) -> Path:
    """Final evaluation with and without guidance, the model directory, the store entry."""
    run = Path(cfg.run_dir)
    model = engine.model.eval()
    metrics: dict[str, Any] = {"steps": step, "train_seconds_this_run": round(seconds, 1),
                               "dataset": digest, "n_train": len(data) - cfg.n_val,
                               "params": model.num_params(), "val_loss": history[-1]["val_loss"],
                               "guidance_scale": cfg.guidance_scale,
                               "evaluations_per_image": engine.evaluations_per_image()}
    if evaluator is not None:
        metrics["evaluator"] = json.loads((run / "evaluator" / "metrics.json").read_text())
        metrics.update(evaluate_generator(engine, evaluator, shapes, data.images,
                                          per_pair=cfg.final_per_pair, n=4, seed=1))
        # The same prompts and seeds without guidance: what guidance buys, measured.
        unguided = ARImageEngine(model, tokenizer, str(engine.device), guidance_scale=1.0)
        metrics["unguided"] = evaluate_generator(unguided, evaluator, shapes, data.images,
                                                 per_pair=cfg.final_per_pair, n=4, seed=1)
        metrics["unguided"]["evaluations_per_image"] = unguided.evaluations_per_image()
    # n_train counts the images read (make_shapes' count for the procedural data, which
    # training.evaluate regenerates from it), the last n_val of them kept apart.
    data_info = {"source": cfg.data, "n_train": len(data), "n_val": cfg.n_val,
                 "seed": cfg.data_seed, "hash": digest,
                 "shapes": asdict(shapes) if shapes is not None else None}
    config = {**model.cfg.to_dict(), "data": data_info, "train": asdict(cfg)}
    model_dir = save_model_dir(run / "model", config, model.state_dict(), tokenizer, metrics)
    log.info("final metrics: %s", json.dumps(metrics))
    if cfg.store:
        tag = save_to_store(cfg.name, model_dir,
                            labels={"family": "ar_image", "dataset": digest},
                            metadata={"steps": step, "image_size": cfg.image_size})
        log.info("saved to the BentoML store as %s", tag)
    return model_dir


def main(argv: list[str] | None = None) -> Path:
    argv = run_dir_argv(argv)
    cfg = parse_config(ARTrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    return train(cfg)


if __name__ == "__main__":
    run_cli(main, on_interrupt=resumable)
