"""Train an autoencoder baseline: `python -m training.train_autoencoder --variational=false`
(plain) or `--variational=true` (VAE), on the same data as the GAN and the AR model.

After training, the job encodes the training set, fits a Gaussian to the codes, and
grades the decoder with the independent evaluator (training.evaluate) twice: fed
z ~ N(0, I) ("standard") and fed z from the fitted Gaussian ("fitted"). The plain
autoencoder under the standard prior is the garbage the lecture predicts; the numbers
say how much each fix recovers.

Run folder (--run_dir, or --out): ckpt.pt, evaluator/, samples_<prior>.png,
recon.png, curves.png, history.json and model/ (config, weights with the fitted Gaussian,
tokenizer, metrics). A measured baseline, not served: no store entry, one process.
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
from tqdm import tqdm

from models.artifacts import save_model_dir
from models.autoencoder import PRIORS, AEConfig, AutoEncoder, LatentEngine
from models.engine import pick_device
from models.text_encoder import encode_prompts
from training.common import (SEED, Dist, above, at_least, atomic_save, check_fresh_run, check_outputs,
                             check_resume_data, cosine_lr, diverged, get_tokenizer, load_checkpoint, parse_config,
                             report_halt, report_resume, require_finite, restore, resumable, run_cli)
from training.evaluate import evaluate_generator, load_or_train_evaluator
from training.train_gan import (ImageJobConfig, check_captions_fit, check_prompts_fit,
                                check_validation_split, load_data, resume_data_keys, run_dir_argv,
                                sample_prompts, save_grid)

log = logging.getLogger("train_autoencoder")


@dataclass
class AETrainConfig(ImageJobConfig):
    run_dir: str = field(default="runs/autoencoder", metadata={
        "help": "run folder (checkpoint, evaluator, grids, model/); alias --out"})
    n_val: int = field(default=512, metadata={"help": "images kept apart for the reconstruction error",
                                              "valid": at_least(1)})
    variational: bool = field(default=False, metadata={"help": "train a VAE instead of a plain autoencoder"})
    conditional: bool = field(default=True, metadata={"help": "the decoder reads the prompt"})
    z_dim: int = field(default=32, metadata={"help": "latent size", "valid": at_least(1)})
    ch: int = field(default=32, metadata={"help": "channels at 16×16 (×2 per halving)",
                                          "valid": at_least(1)})
    text_dim: int = field(default=64, metadata={"help": "text encoder width", "valid": at_least(1)})
    sigma: float = field(default=0.1, metadata={"help": "likelihood std in [-1, 1] pixel units",
                                                "valid": above(0)})
    beta: float = field(default=1.0, metadata={"help": "KL weight (VAE only)", "valid": at_least(0)})
    batch_size: int = field(default=64, metadata={"help": "images per step", "valid": at_least(1)})
    max_steps: int = field(default=1500, metadata={"help": "optimizer steps", "valid": at_least(1)})
    lr: float = field(default=2e-3, metadata={"help": "peak Adam learning rate", "valid": above(0)})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps", "valid": at_least(0)})
    eval_interval: int = field(default=250, metadata={
        "help": "steps between loss reports, each with a checkpoint (see --ckpt_interval)", "valid": at_least(1)})
    final_per_pair: int = field(default=4, metadata={"help": "prompts per pair in the final eval",
                                                     "valid": at_least(1)})
    seed: int = field(default=1337, metadata={"help": "seed for init, batches and noise", "valid": SEED})
    halt_after: int = field(default=0, metadata={
        "help": "checkpoint and exit after this many steps in this invocation (0 = run to max_steps)",
        "valid": at_least(0)})

    def check(self) -> None:
        """Settings that are wrong together, or that would fail only after training."""
        super().check()
        if self.image_size != 32:
            raise ValueError(f"--image_size={self.image_size}: the autoencoder is built for 32")
        if self.data == "shapes" and self.n_val >= self.n_train:
            raise ValueError(f"--n_val={self.n_val} leaves no training images of --n_train={self.n_train}")
        if self.ch % 8:
            raise ValueError(f"--ch={self.ch}: must be a multiple of 8 (the group norms use 8 groups)")
        if self.text_dim % AEConfig.text_heads:
            raise ValueError(f"--text_dim={self.text_dim} is not divisible by the text encoder's "
                             f"{AEConfig.text_heads} heads")
        check_outputs("", False, self.run_dir, "autoencoder", out_option="--run_dir")  # no store entry


# The settings that change the model's tensors: a checkpoint resumes only with the same ones.
SHAPE_KEYS = ("image_size", "vocab_size", "context", "z_dim", "ch", "text_dim", "variational", "conditional")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_train=256, n_val=32, z_dim=8, ch=8, text_dim=32, batch_size=8, max_steps=6,
                 warmup=2, eval_interval=3, final_per_pair=1, evaluator_steps=20, evaluator_n=512),
    "small": dict(),
    "gpu": dict(n_train=100000, ch=64, z_dim=64, text_dim=128, batch_size=256, max_steps=10000,
                lr=1e-3, warmup=200, eval_interval=1000, final_per_pair=16),
}


def model_config(cfg: AETrainConfig) -> AEConfig:
    return AEConfig(image_size=cfg.image_size, z_dim=cfg.z_dim, ch=cfg.ch, variational=cfg.variational,
                    conditional=cfg.conditional, vocab_size=cfg.vocab_size, context=cfg.context,
                    text_dim=cfg.text_dim)


def save_recon(model: AutoEncoder, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               path: Path) -> None:
    """Top row real, bottom row reconstructed: the autoencoder itself works."""
    from PIL import Image

    with torch.no_grad():
        rec = model.decode(model.encode(images.float() / 127.5 - 1)[0], ids, mask)
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(rec), dim=2)], dim=1)  # (3, 2S, nS)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST).save(path)


def save_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "val_mse", "kl_per_pixel"):
        ax.plot([h["step"] for h in history], [h[key] for h in history], "o-", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train(cfg: AETrainConfig) -> Path:
    """Run the job; returns the model directory (written when max_steps is reached)."""
    run = Path(cfg.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.time()
    ckpt_path = run / "ckpt.pt"
    check_fresh_run(ckpt_path, cfg.resume)
    # Read before anything slow: a missing, broken or mismatched checkpoint fails at once (n_val
    # too: another split would measure on images the model trained on).
    ckpt = load_checkpoint(ckpt_path, asdict(cfg), SHAPE_KEYS + ("n_val",), job="autoencoder") if cfg.resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data, shapes = load_data(cfg)
    check_validation_split(cfg.n_val, data, cfg.data)
    digest = data.digest()
    if ckpt is not None:
        check_resume_data(ckpt, ckpt_path, asdict(cfg), digest, resume_data_keys(cfg))
    tokenizer = get_tokenizer(data.captions, cfg.vocab_size, cfg.run_dir, Dist(0, 1, device), ckpt)
    # The prompts finish grades (seed 1) and draws its grids from.
    check_prompts_fit(tokenizer, cfg.context, sample_prompts(data, shapes, tokenizer, cfg.context),
                      shapes, [(cfg.final_per_pair, 1)])
    check_captions_fit(tokenizer, data.captions, cfg.context, True)
    run.mkdir(parents=True, exist_ok=True)  # once the data and settings are known to fit
    ids_all, mask_all = encode_prompts(tokenizer, data.captions, cfg.context)   # (N, T)
    torch.manual_seed(cfg.seed)
    model = AutoEncoder(model_config(cfg)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, history = 0, []
    if ckpt is not None:
        step, history = restore(ckpt, ckpt_path, model=model, optimizer=optimizer)
        report_resume(step, cfg.max_steps, ckpt_path)
    n_train = len(data) - cfg.n_val
    halt_at = min(cfg.max_steps, step + cfg.halt_after) if cfg.halt_after else cfg.max_steps
    interval: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=step, desc="vae" if cfg.variational else "ae")
    model.train()
    while step < halt_at:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup, cfg.max_steps)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        torch.manual_seed(cfg.seed + step)  # the VAE's reparameterisation noise
        idx = torch.randint(n_train, (cfg.batch_size,), generator=g)
        x = data.images[idx].to(device).float() / 127.5 - 1                      # (B, 3, S, S)
        _, loss, parts = model(x, ids_all[idx].to(device), mask_all[idx].to(device), cfg.sigma, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        interval.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{parts['mse']:.4f}")
        evaluating = step % cfg.eval_interval == 0 or step == halt_at
        if evaluating:
            if not np.isfinite(interval[-1]):
                raise FloatingPointError(diverged(step, f"the training loss is {interval[-1]}", ckpt_path))
            model.eval()
            with torch.no_grad():
                xv = data.images[n_train:].to(device).float() / 127.5 - 1
                _, _, val = model(xv, ids_all[n_train:].to(device), mask_all[n_train:].to(device),
                                  cfg.sigma, cfg.beta)
            model.train()
            history.append({"step": step, "loss": float(np.mean(interval)), "val_mse": val["mse"],
                            "kl_per_pixel": max(val["kl"], 1e-8) / xv[0].numel()})
            interval = []
            log.info("step %d: %s", step, history[-1])
            (run / "history.json").write_text(json.dumps(history, indent=1))
            save_curves(history, run / "curves.png")
        if cfg.checkpoint_due(step, evaluating):
            require_finite(step, ckpt_path, model=model)
            atomic_save({"job": "autoencoder", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "history": history, "config": asdict(cfg),
                         "tokenizer": tokenizer.to_str(), "dataset": digest}, ckpt_path)
    bar.close()
    model_dir = run / "model"
    if step < cfg.max_steps:
        report_halt(step, cfg.max_steps, ckpt_path)
    else:
        require_finite(step, ckpt_path, model=model)
        model_dir = finish(cfg, model.eval(), tokenizer, data, digest, shapes, ids_all, mask_all, n_train,
                           history, time.time() - t0)
    return model_dir


def finish(cfg: AETrainConfig, model: AutoEncoder, tokenizer: Any, data: Any, digest: str, shapes: Any,
           ids_all: torch.Tensor, mask_all: torch.Tensor, n_train: int,
           history: list[dict[str, Any]], seconds: float) -> Path:
    """Fit the latent Gaussian, grade both priors, write the model directory."""
    run = Path(cfg.run_dir)
    model = model.cpu()
    model.fit_latent_gaussian(data.images[:n_train])
    save_recon(model, data.images[n_train:n_train + 8], ids_all[n_train:n_train + 8],
               mask_all[n_train:n_train + 8], run / "recon.png")
    metrics: dict[str, Any] = {"steps": history[-1]["step"],
                               "train_seconds_this_run": round(seconds, 1), "dataset": digest,
                               "val_mse": history[-1]["val_mse"], "evaluations_per_image": 1,
                               "variational": cfg.variational}
    evaluator = None
    if shapes is not None:
        evaluator, ev = load_or_train_evaluator(run / "evaluator", shapes, n_train=cfg.evaluator_n,
                                                steps=cfg.evaluator_steps, seed=cfg.data_seed)
        metrics["evaluator"] = ev
    for prior in PRIORS:
        engine = LatentEngine(model, tokenizer, prior, device="cpu")
        save_grid(engine, sample_prompts(data, shapes, tokenizer, cfg.context), run / f"samples_{prior}.png")
        if evaluator is not None:
            metrics[prior] = evaluate_generator(engine, evaluator, shapes, data.images[:n_train],
                                                per_pair=cfg.final_per_pair, n=4, seed=1)
    # n_train counts the images read (as in the AR job's config), the last n_val of them kept apart.
    data_info = {"source": cfg.data, "n_train": len(data), "n_val": cfg.n_val, "seed": cfg.data_seed,
                 "hash": digest, "shapes": asdict(shapes) if shapes is not None else None}
    config = {**model.cfg.to_dict(), "data": data_info, "train": asdict(cfg)}
    model_dir = save_model_dir(run / "model", config, model.state_dict(), tokenizer, metrics)
    log.info("final metrics: %s", json.dumps(metrics))
    return model_dir


def main(argv: list[str] | None = None) -> Path:
    argv = run_dir_argv(argv)
    cfg = parse_config(AETrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    return train(cfg)


if __name__ == "__main__":
    run_cli(main, on_interrupt=resumable)
