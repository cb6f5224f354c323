"""Train the text-conditioned GAN: `python -m training.train_gan --preset small`.

Hinge loss, a matching-aware discriminator (a real image with the wrong caption is
fake), a contrastive image-caption term over the batch (XMC-GAN), an R1 penalty on real
images (lazy, every few steps), DiffAugment on everything D sees, an EMA of the generator
(what is evaluated and served). Every `eval_interval` steps the EMA generator is graded by the independent
evaluator (training.evaluate) and the run folder gets a sample grid (fixed prompts,
fixed seeds) and a curves plot, so mode collapse shows up while it happens.

Run folder (--run_dir, or --out): ckpt.pt, evaluator/, samples_*.png, curves.png,
history.json and model/ (the served model directory, also copied to the BentoML store
as `gan` unless --store=false). `--resume` continues from ckpt.pt; under torchrun every
rank trains on its own batches and gradients are averaged by DDP.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.artifacts import save_model_dir
from models.gan import (Discriminator, GANConfig, Generator, contrastive_loss, d_hinge_loss,
                        diff_augment, g_hinge_loss, mode_seeking_loss, r1_penalty)
from models.image_engine import ImageEngine, ImageRequest
from models.text_encoder import encode_prompts
from models.tokenizer import MIN_VOCAB, Tokenizer
from training.common import (SEED, Dist, Rule, above, all_reduce_mean, at_least, atomic_save, check_device,
                             check_fresh_run, check_outputs, check_resume_data, check_run_folder, diverged, fraction,
                             get_tokenizer, load_checkpoint, one_of, parse_config, report_halt, report_resume,
                             require_finite, restore, resumable, run_cli, setup_distributed, teardown_distributed)
from training.data.imagefolder import CaptionedImages, load_imagefolder
from training.data.shapes import DEFAULT_HOLDOUT, ShapesConfig, make_shapes, parse_holdout
from training.evaluate import evaluate_generator, eval_prompts, generator_prompts, load_or_train_evaluator
from training.store import save_to_store

log = logging.getLogger("train_gan")

PROBABILITY: Rule = ((lambda v: 0 <= v <= 1), "must be in [0, 1]")


@dataclass
class CaptionedDataConfig:
    """Data and tokenizer settings every image job shares (GAN, AR model, autoencoders)."""
    data: str = field(default="shapes", metadata={
        "help": "'shapes' (procedural, labelled) or a folder with images + metadata.jsonl or metadata.csv"})
    image_size: int = field(default=32, metadata={"help": "image side in pixels (32 or 64)"})
    n_train: int = field(default=20000, metadata={"help": "procedural training images", "valid": at_least(1)})
    data_seed: int = field(default=0, metadata={"help": "seed of the procedural dataset", "valid": SEED})
    holdout: str = field(default=DEFAULT_HOLDOUT, metadata={
        "help": "colour:shape pairs never shown in training, comma-separated ('' for none)"})
    two_object_prob: float = field(default=0.0, metadata={"help": "share of two-object scenes",
                                                          "valid": PROBABILITY})
    # The tokenizer always holds the 256 bytes and the end-of-text token.
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary (upper bound)",
                                                   "valid": at_least(MIN_VOCAB)})
    context: int = field(default=32, metadata={"help": "longest prompt in tokens", "valid": at_least(1)})

    def check(self) -> None:
        """What every image job checks before loading data."""
        if self.image_size not in (32, 64):
            raise ValueError(f"--image_size={self.image_size}: must be 32 or 64")
        if self.data == "shapes":
            try:
                parse_holdout(self.holdout)
            except ValueError as e:
                raise ValueError(f"--holdout={self.holdout!r}: {e}") from None


@dataclass
class ImageJobConfig(CaptionedDataConfig):
    """Beyond the data, what every image job shares: the evaluator that scores its samples,
    where it runs, and resuming."""
    evaluator_steps: int = field(default=800, metadata={"help": "evaluator classifier steps",
                                                        "valid": at_least(1)})
    evaluator_n: int = field(default=12000, metadata={"help": "evaluator training images",
                                                      "valid": at_least(1)})
    threads: int = field(default=0, metadata={
        "help": "CPU threads for torch (0 = torch's default); 1 is faster on a busy machine",
        "valid": at_least(0)})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda",
                                                  "valid": one_of("auto", "cpu", "cuda")})
    resume: bool = field(default=False, metadata={"help": "continue from <run_dir>/ckpt.pt"})
    ckpt_interval: int = field(default=0, metadata={
        "help": "steps between checkpoints besides the one at each evaluation (0 = at evaluations only)",
        "valid": at_least(0)})

    def check(self) -> None:
        super().check()
        check_device(self.device)
        if not self.resume:
            check_run_folder(self.run_dir)  # (each job names its own run_dir)

    def checkpoint_due(self, step: int, evaluated: bool) -> bool:
        """Whether the run checkpoints after `step`: with each evaluation, and every
        --ckpt_interval steps (a long --eval_interval need not risk that many steps)."""
        return evaluated or (self.ckpt_interval > 0 and step % self.ckpt_interval == 0)


@dataclass
class GANTrainConfig(ImageJobConfig):
    run_dir: str = field(default="runs/gan", metadata={
        "help": "run folder (checkpoint, evaluator, sample grids, curves, model/); alias --out"})
    z_dim: int = field(default=64, metadata={"help": "latent size", "valid": at_least(1)})
    g_ch: int = field(default=16, metadata={"help": "generator width at full resolution",
                                            "valid": at_least(1)})
    d_ch: int = field(default=16, metadata={"help": "discriminator width at full resolution",
                                            "valid": at_least(1)})
    text_dim: int = field(default=128, metadata={"help": "text encoder width", "valid": at_least(1)})
    text_layers: int = field(default=1, metadata={"help": "text encoder Transformer layers",
                                                  "valid": at_least(0)})
    batch_size: int = field(default=32, metadata={"help": "images per step per process",
                                                  "valid": at_least(1)})
    max_steps: int = field(default=1200, metadata={"help": "training steps (one D + one G update)",
                                                   "valid": at_least(1)})
    halt_after: int = field(default=0, metadata={
        "help": "checkpoint and exit after this many steps in this invocation (0 = run to max_steps)",
        "valid": at_least(0)})
    lr_g: float = field(default=4e-4, metadata={"help": "generator Adam learning rate",
                                                "valid": above(0)})
    lr_d: float = field(default=4e-4, metadata={"help": "discriminator Adam learning rate",
                                                "valid": above(0)})
    beta1: float = field(default=0.0, metadata={"help": "Adam beta1 (0 is usual for GANs)",
                                                "valid": fraction()})
    beta2: float = field(default=0.99, metadata={"help": "Adam beta2", "valid": fraction()})
    d_spectral_norm: bool = field(default=False, metadata={
        "help": "spectral norm on every D layer (then r1_gamma=0 is usual)"})
    r1_gamma: float = field(default=0.1, metadata={
        "help": "R1 gradient penalty on real images (StyleGAN2), 0 = off", "valid": at_least(0)})
    r1_interval: int = field(default=4, metadata={"help": "steps between (lazy) R1 penalties",
                                                  "valid": at_least(1)})
    mode_seeking: float = field(default=0.0, metadata={
        "help": "weight of the mode-seeking term (a quarter of the batch drawn twice), 0 = off",
        "valid": at_least(0)})
    contrastive: float = field(default=1.0, metadata={
        "help": "weight of the image-caption contrastive term in both losses (0 = off)",
        "valid": at_least(0)})
    augment: str = field(default="translation", metadata={
        "help": "DiffAugment policy: comma-separated from translation, cutout"})
    ema_kimg: float = field(default=10.0, metadata={"help": "EMA half-life in thousands of images",
                                                    "valid": at_least(0)})
    ema_rampup: float = field(default=0.05, metadata={
        "help": "EMA half-life at most this fraction of the images seen so far (0 = off)",
        "valid": at_least(0)})
    eval_interval: int = field(default=200, metadata={
        "help": "steps between evaluations, each with a checkpoint (see --ckpt_interval)", "valid": at_least(1)})
    eval_per_pair: int = field(default=2, metadata={"help": "prompts per pair in periodic evals",
                                                    "valid": at_least(1)})
    final_per_pair: int = field(default=12, metadata={"help": "prompts per pair in the final eval",
                                                      "valid": at_least(1)})
    seed: int = field(default=1337, metadata={"help": "training randomness (offset by rank)", "valid": SEED})
    store: bool = field(default=True, metadata={"help": "save the model to the BentoML store"})
    name: str = field(default="gan", metadata={"help": "model name in the store"})

    def check(self) -> None:
        """Settings that are wrong together, or that would fail only after training."""
        super().check()
        if self.g_ch != 4 and self.g_ch % 8:
            raise ValueError(f"--g_ch={self.g_ch}: must be 4 or a multiple of 8 (the generator's "
                             "group norms split its channels into groups of up to 8)")
        if self.text_dim % GANConfig.text_heads:
            raise ValueError(f"--text_dim={self.text_dim} is not divisible by the text encoder's "
                             f"{GANConfig.text_heads} heads")
        unknown = set(filter(None, self.augment.split(","))) - {"translation", "cutout"}
        if unknown:
            raise ValueError(f"--augment={self.augment!r}: unknown {sorted(unknown)} "
                             "(use translation, cutout)")
        if self.mode_seeking and self.batch_size < 4:
            raise ValueError(f"--mode_seeking={self.mode_seeking} needs --batch_size >= 4 "
                             f"(a quarter of the batch is drawn twice), got {self.batch_size}")
        check_outputs(self.name, self.store, self.run_dir, "gan", out_option="--run_dir")


# The settings that change the networks' tensors: a checkpoint resumes only with the same ones.
SHAPE_KEYS = ("image_size", "vocab_size", "context", "z_dim", "g_ch", "d_ch", "text_dim", "text_layers",
              "d_spectral_norm")

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop: for tests.
    "tiny": dict(n_train=512, z_dim=16, g_ch=8, d_ch=8, text_dim=32,
                 batch_size=8, max_steps=6, eval_interval=3, eval_per_pair=1, final_per_pair=1,
                 evaluator_steps=20, evaluator_n=512),
    # The served default: about 9.5 minutes on 2 idle CPU cores (torch uses both).
    "small": dict(max_steps=1750, lr_d=8e-4),
    # A real GPU run.
    "gpu": dict(n_train=100000, g_ch=64, d_ch=64, text_dim=256, text_layers=2, batch_size=128,
                max_steps=20000, eval_interval=1000, final_per_pair=32, ema_kimg=50.0),
}


def load_data(cfg: GANTrainConfig) -> tuple[CaptionedImages, ShapesConfig | None]:
    if cfg.data == "shapes":
        shapes = ShapesConfig(cfg.image_size, cfg.holdout, cfg.two_object_prob)
        parse_holdout(shapes.holdout)  # fail early on a typo
        return make_shapes(cfg.n_train, cfg.data_seed, shapes), shapes
    return load_imagefolder(cfg.data, cfg.image_size), None


def gan_config(cfg: GANTrainConfig) -> GANConfig:
    return GANConfig(image_size=cfg.image_size, z_dim=cfg.z_dim, g_ch=cfg.g_ch, d_ch=cfg.d_ch,
                     vocab_size=cfg.vocab_size, context=cfg.context, text_dim=cfg.text_dim,
                     text_layers=cfg.text_layers, d_spectral_norm=cfg.d_spectral_norm)


def check_prompts_fit(tokenizer: Tokenizer, context: int, grid: list[str], shapes: ShapesConfig | None,
                      evals: list[tuple[int, int]]) -> None:
    """The engine refuses a prompt longer than --context, and the job generates from the grid's
    prompts and each evaluation's ((per_pair, seed)): refuse the run before training, not at
    the first evaluation, after the training it would lose."""
    prompts = list(grid)
    if shapes is not None:
        prompts += [p for per_pair, seed in evals for p in generator_prompts(shapes, per_pair, seed)]
    n, longest = max(((len(tokenizer.encode(p)), p) for p in prompts), default=(0, ""))
    if n > context:
        raise ValueError(f"--context={context}: the longest evaluation prompt is {n} tokens with this "
                         f"tokenizer ({longest!r}); use a larger --context, or a larger --vocab_size or more "
                         f"training images (the tokenizer learns its words from their captions)")


def resume_data_keys(cfg: CaptionedDataConfig) -> tuple[str, ...]:
    """What chose a run's data, for a checkpoint older than its dataset hash: a folder is named by
    --data alone, the procedural data also by its settings."""
    procedural = ("n_train", "data_seed", "holdout", "two_object_prob") if cfg.data == "shapes" else ()
    return ("data", *procedural)


def check_captions_fit(tokenizer: Tokenizer, captions: list[str], context: int, is_main: bool) -> None:
    """Training cuts a caption to --context tokens, but the served model refuses a longer prompt, the
    user's own captions included: refuse a run whose captions are all too long (it would learn from
    cut captions only, with empty sample grids), and warn once, with the count, when some are."""
    lengths = [len(ids) for ids in tokenizer.encode_batch(captions)]
    longer = sum(n > context for n in lengths)
    if longer == len(lengths):
        raise ValueError(f"--context={context}: every caption is longer than that (the longest is "
                         f"{max(lengths)} tokens with this tokenizer); use a larger --context")
    if longer and is_main:
        log.warning("--context=%d: %d of %d captions are longer and are cut in training, and the "
                    "trained model refuses them as prompts; raise --context (the longest is %d tokens)",
                    context, longer, len(lengths), max(lengths))


def check_validation_split(n_val: int, data: CaptionedImages, source: str) -> None:
    """A folder's image count is known only once it is read: refuse an --n_val that leaves no
    training images then, before anything is trained (procedural data is checked at parse time)."""
    if n_val >= len(data):
        raise ValueError(f"--n_val={n_val} leaves no training images of the {len(data)} in {source} "
                         "(use a smaller --n_val)")


@torch.no_grad()
def update_ema(ema: Generator, model: Generator, images_seen: int, cfg: GANTrainConfig,
               batch_images: int) -> None:
    """EMA with a half-life in images, shortened early on (StyleGAN2-ADA's ramp-up) so the
    average does not drag in the random initialisation."""
    half_life = cfg.ema_kimg * 1000
    if cfg.ema_rampup > 0:
        half_life = min(half_life, images_seen * cfg.ema_rampup)
    beta = 0.5 ** (batch_images / max(half_life, 1e-8))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - beta)


def sample_prompts(data: CaptionedImages, shapes: ShapesConfig | None,
                   tokenizer: Tokenizer | None = None, context: int = 0) -> list[str]:
    """The grid's fixed rows: six training pairs and up to two held-out ones (or the first
    eight distinct captions of the user's data, those that fit `context` tokens when it is
    given: a folder's images often share a caption, and a grid of one prompt shows little)."""
    if shapes is None:
        prompts: list[str] = []
        for c in data.captions:
            if c not in prompts and (tokenizer is None or 0 < len(tokenizer.encode(c)) <= context):
                prompts.append(c)
                if len(prompts) == 8:
                    break
        return prompts
    train = eval_prompts(shapes, [("red", "circle"), ("blue", "square"), ("yellow", "triangle"),
                                  ("purple", "cross"), ("cyan", "circle"), ("green", "square")],
                         1, seed=7)
    held = eval_prompts(shapes, sorted(parse_holdout(shapes.holdout))[:2], 1, seed=7)
    return [s["prompt"] for s in train + held]


def save_grid(engine: ImageEngine, prompts: list[str], path: Path, n: int = 8) -> None:
    """Rows = prompts, columns = seeds 0..n-1, upscaled ×2 with a 2 px gutter."""
    from PIL import Image

    rows = engine.generate([ImageRequest(p, seed=0, n=n) for p in prompts])
    s, pad = engine.image_size, 2
    grid = np.full((len(rows) * (s + pad) + pad, n * (s + pad) + pad, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            y, x = pad + r * (s + pad), pad + c * (s + pad)
            grid[y:y + s, x:x + s] = img
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                 Image.Resampling.NEAREST).save(path)


def save_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [h["d_loss"] for h in history], label="D loss")
    ax1.plot(steps, [h["g_loss"] for h in history], label="G loss")
    ax1.set_xlabel("step")
    ax1.legend()
    ax1.set_title("losses (mean over the interval)")
    for key, label in (("colour", "colour acc"), ("shape", "shape acc"), ("coverage", "coverage"),
                       ("diversity", "diversity (gen/real)"), ("heldout_colour", "held-out colour"),
                       ("heldout_shape", "held-out shape")):
        if any(key in h for h in history):
            ax2.plot([h["step"] for h in history if key in h],
                     [h[key] for h in history if key in h], label=label)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("step")
    if ax2.lines:
        ax2.legend(fontsize=8)
    ax2.set_title("evaluator on the EMA generator" if ax2.lines else "no labels: not evaluated")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summarise(metrics: dict[str, Any]) -> dict[str, float]:
    """The few numbers that go on the curves."""
    out = {"colour": metrics["train_accuracy"]["colour"], "shape": metrics["train_accuracy"]["shape"],
           "coverage": metrics["coverage"], "diversity": min(1.0, metrics["diversity"])}
    if "heldout_accuracy" in metrics:
        out["heldout_colour"] = metrics["heldout_accuracy"]["colour"]
        out["heldout_shape"] = metrics["heldout_accuracy"]["shape"]
    return out


def train(cfg: GANTrainConfig) -> Path:
    """Run the job; returns the saved model directory (on rank 0)."""
    d = setup_distributed(cfg.device)
    run = Path(cfg.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.time()
    ckpt_path = run / "ckpt.pt"
    check_fresh_run(ckpt_path, cfg.resume)
    # Read before anything slow: a missing, broken or mismatched checkpoint fails at once.
    ckpt = load_checkpoint(ckpt_path, asdict(cfg), SHAPE_KEYS, job="gan") if cfg.resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + d.rank)
    data, shapes = load_data(cfg)
    digest = data.digest()
    if ckpt is not None:
        check_resume_data(ckpt, ckpt_path, asdict(cfg), digest, resume_data_keys(cfg))
    tokenizer = get_tokenizer(data.captions, cfg.vocab_size, cfg.run_dir, d, ckpt)
    grid_prompts = sample_prompts(data, shapes, tokenizer, cfg.context)
    # The prompts of periodic_eval (seed 0) and finish (seed 1).
    check_prompts_fit(tokenizer, cfg.context, grid_prompts, shapes,
                      [(cfg.eval_per_pair, 0), (cfg.final_per_pair, 1)])
    check_captions_fit(tokenizer, data.captions, cfg.context, d.is_main)
    run.mkdir(parents=True, exist_ok=True)  # once the data and settings are known to fit
    ids_all, mask_all = encode_prompts(tokenizer, data.captions, cfg.context)     # (N, T)
    neg_all = encode_prompts(tokenizer, data.negatives, cfg.context) if data.negatives else None
    gcfg = gan_config(cfg)
    if tokenizer.vocab_size > gcfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens > vocab_size {gcfg.vocab_size}")
    G, D = Generator(gcfg), Discriminator(gcfg)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G, D, G_ema = G.to(d.device), D.to(d.device), G_ema.to(d.device)
    if d.device.type == "cpu":  # oneDNN's convolutions are faster channels-last: 1.04-1.23x a step here
        G, D, G_ema = (m.to(memory_format=torch.channels_last) for m in (G, D, G_ema))
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=betas)
    step, history = 0, []
    if ckpt is not None:
        step, history = restore(ckpt, ckpt_path, G=G, D=D, G_ema=G_ema, opt_g=opt_g, opt_d=opt_d)
        if d.is_main:
            report_resume(step, cfg.max_steps, ckpt_path)

    evaluator = None
    if d.is_main and shapes is not None:
        evaluator, ev_metrics = load_or_train_evaluator(
            run / "evaluator", shapes, n_train=cfg.evaluator_n, steps=cfg.evaluator_steps,
            seed=cfg.data_seed)
        log.info("evaluator accuracy on real data: %s", ev_metrics["accuracy"])
    engine = ImageEngine(G_ema, tokenizer, str(d.device))

    # DDP averages gradients across ranks; D's spectral-norm vectors (--d_spectral_norm) start as
    # rank 0's and are not synced at each forward (torch 2.13's name for it).
    G_train = DDP(G) if d.world_size > 1 else G
    D_train = DDP(D, forward_sync_buffers=False) if d.world_size > 1 else D
    B = cfg.batch_size
    ib = torch.arange(B, device=d.device)
    # Captions per step: the batch's own (B), then one negative per image (B): a hard
    # negative (one attribute changed) when the data has them, else another image's caption.
    # Every real image is scored with all 2B captions (row-major: image i, caption j), each
    # fake with its own: one D pass gives the matched, mismatched and contrastive scores.
    all_pairs = torch.stack([ib.repeat_interleave(2 * B),
                             torch.arange(2 * B, device=d.device).repeat(B)], 1)     # (2B², 2)
    d_pairs = torch.cat([all_pairs, torch.stack([ib + B, ib], 1)])               # (2B² + B, 2)
    interval = {"d_loss": 0.0, "g_loss": 0.0, "n": 0}
    if ckpt is not None:
        # Last, after everything that draws random numbers while being built.
        restore_rng(ckpt, d, cfg.seed)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, desc="gan")
    halt_at = min(cfg.max_steps, step + cfg.halt_after) if cfg.halt_after else cfg.max_steps
    while step < halt_at:
        idx = torch.randint(len(data), (B,))
        real = data.images[idx].to(d.device).float() / 127.5 - 1                  # (B, 3, S, S)
        ids, mask = ids_all[idx], mask_all[idx]                                   # (B, T)
        if neg_all is not None:
            neg_ids, neg_mask = neg_all[0][idx], neg_all[1][idx]
        else:
            neg_ids, neg_mask = ids.roll(1, 0), mask.roll(1, 0)
        ids, mask = ids.to(d.device), mask.to(d.device)
        ids2 = torch.cat([ids, neg_ids.to(d.device)])                              # (2B, T)
        mask2 = torch.cat([mask, neg_mask.to(d.device)])

        # Discriminator step: real·own caption up, fake and real·wrong caption down.
        with torch.no_grad():
            fake = G(torch.randn(B, cfg.z_dim, device=d.device), ids, mask)
        logits = D_train(diff_augment(torch.cat([real, fake]), cfg.augment), ids2, mask2, d_pairs)
        real_scores = logits[:2 * B * B].view(B, 2 * B)                            # (B, 2B)
        d_loss = d_hinge_loss(real_scores[:, :B].diagonal(), logits[2 * B * B:],
                              real_scores[:, B:].diagonal())
        if cfg.contrastive:
            d_loss = d_loss + cfg.contrastive * contrastive_loss(real_scores)
        if cfg.r1_gamma and step % cfg.r1_interval == 0:
            # Lazy regularisation (StyleGAN2): every r1_interval steps, weighted to match.
            d_loss = d_loss + r1_loss(D_train, real, ids, mask, cfg) * cfg.r1_interval
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        # Generator step: D is frozen and called unwrapped, so DDP syncs only G.
        D.requires_grad_(False)
        twins = B // 4 if cfg.mode_seeking else 0  # the first `twins` prompts drawn a second time
        z = torch.randn(B + twins, cfg.z_dim, device=d.device)
        fake = G_train(z, torch.cat([ids, ids[:twins]]), torch.cat([mask, mask[:twins]]))
        fake, twin = fake[:B], fake[B:]
        fake_scores = D(diff_augment(fake, cfg.augment), ids2, mask2, all_pairs).view(B, 2 * B)
        g_loss = g_hinge_loss(fake_scores[:, :B].diagonal())
        if cfg.contrastive:
            g_loss = g_loss + cfg.contrastive * contrastive_loss(fake_scores)
        if twins:
            g_loss = g_loss + cfg.mode_seeking * mode_seeking_loss(fake[:twins], twin, z[:twins], z[B:])
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)

        step += 1
        update_ema(G_ema, G, step * B * d.world_size, cfg, B * d.world_size)
        interval["d_loss"] += d_loss.item()
        interval["g_loss"] += g_loss.item()
        interval["n"] += 1
        bar.update(1)
        bar.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_loss.item():.3f}")
        evaluating = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if evaluating:
            row: dict[str, Any] = {"step": step, "time_s": round(time.time() - t0, 1)}
            for k in ("d_loss", "g_loss"):
                row[k] = all_reduce_mean(interval[k] / interval["n"], d)
                if not np.isfinite(row[k]):
                    raise FloatingPointError(diverged(step, f"{k} is {row[k]}", ckpt_path))
            interval = {"d_loss": 0.0, "g_loss": 0.0, "n": 0}
            if d.is_main:
                row.update(periodic_eval(engine, evaluator, shapes, data, cfg, history))
                history.append(row)
                save_grid(engine, grid_prompts, run / f"samples_{step:06d}.png")
                save_curves(history, run / "curves.png")
                (run / "history.json").write_text(json.dumps(history, indent=1))
        # A halt between evaluations checkpoints without one: the random numbers an evaluation
        # draws would make the resumed run differ from an uninterrupted one.
        if cfg.checkpoint_due(step, evaluating) or step == halt_at:
            if d.is_main:
                require_finite(step, ckpt_path, generator=G, discriminator=D, averaged_generator=G_ema)
                atomic_save({"job": "gan", "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
                             "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                             "step": step, "history": history, "rng": gather_rng(d),
                             "config": asdict(cfg), "tokenizer": tokenizer.to_str(), "dataset": digest},
                            ckpt_path)
            elif d.world_size > 1:
                gather_rng(d)
    bar.close()
    model_dir = run / "model"
    if d.is_main and step < cfg.max_steps:
        report_halt(step, cfg.max_steps, ckpt_path)
    elif d.is_main:
        require_finite(step, ckpt_path, averaged_generator=G_ema)
        model_dir = finish(cfg, engine, evaluator, shapes, data, digest, G_ema, tokenizer, time.time() - t0,
                           step, history)
    teardown_distributed()
    return model_dir


def r1_loss(D: torch.nn.Module, real: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            cfg: GANTrainConfig) -> torch.Tensor:
    """The R1 penalty on the batch's real images with their own captions, as D sees them
    (augmented)."""
    real = real.detach().requires_grad_(True)
    return r1_penalty(D(diff_augment(real, cfg.augment), ids, mask), real, cfg.r1_gamma)


def gather_rng(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (rank order), so a resumed run draws the same batches."""
    state = torch.get_rng_state()
    if d.world_size == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(d.world_size)]
    dist.all_gather_object(states, state)
    return states


def restore_rng(ckpt: dict[str, Any], d: Dist, seed: int) -> None:
    """This rank's RNG state from the checkpoint. Resumed with more processes than wrote it, a
    rank it has no state for is seeded as a fresh run seeds it (seed + rank)."""
    states = ckpt["rng"]
    if d.is_main and len(states) != d.world_size:
        log.warning("the checkpoint was written by %d processes, this run has %d: the batches "
                    "differ from those of an uninterrupted run", len(states), d.world_size)
    if d.rank < len(states):
        torch.set_rng_state(states[d.rank])
    else:
        torch.manual_seed(seed + d.rank)


def periodic_eval(engine: ImageEngine, evaluator: Any, shapes: ShapesConfig | None,
                  data: CaptionedImages, cfg: GANTrainConfig,
                  history: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, coverage and diversity of the EMA generator; warns when coverage falls."""
    if evaluator is None or shapes is None:
        return {}
    m = evaluate_generator(engine, evaluator, shapes, data.images, per_pair=cfg.eval_per_pair,
                           n=4, seed=0, memorisation=False)
    row = summarise(m)
    best = max((h["coverage"] for h in history if "coverage" in h), default=0.0)
    if row["coverage"] < best - 0.15 or row["diversity"] < 0.2:
        log.warning("possible mode collapse after %d evals: coverage %.2f (best %.2f), "
                    "diversity %.2f; missing %s", len(history), row["coverage"], best,
                    row["diversity"], m["missing_pairs"])
    log.info("eval: %s", {k: round(v, 3) for k, v in row.items()})
    return row


def finish(cfg: GANTrainConfig, engine: ImageEngine, evaluator: Any, shapes: ShapesConfig | None,
           data: CaptionedImages, digest: str, G_ema: Generator, tokenizer: Tokenizer, seconds: float,
           step: int, history: list[dict[str, Any]]) -> Path:
    """Final evaluation, the served model directory, and the store entry."""
    run = Path(cfg.run_dir)
    metrics: dict[str, Any] = {"steps": step, "train_seconds": round(seconds, 1),
                               "dataset": digest, "n_train": len(data)}
    if evaluator is not None and shapes is not None:
        metrics["evaluator"] = json.loads((run / "evaluator" / "metrics.json").read_text())
        metrics.update(evaluate_generator(engine, evaluator, shapes, data.images,
                                          per_pair=cfg.final_per_pair, n=4, seed=1))
    data_info = {"source": cfg.data, "n_train": len(data), "seed": cfg.data_seed, "hash": digest,
                 "shapes": asdict(shapes) if shapes else None}
    config = {"family": "gan", **gan_config(cfg).to_dict(), "data": data_info, "train": asdict(cfg)}
    model_dir = save_model_dir(run / "model", config, G_ema.state_dict(), tokenizer, metrics)
    log.info("final metrics: %s", json.dumps(metrics))
    if cfg.store:
        tag = save_to_store(cfg.name, model_dir, labels={"family": "gan", "dataset": digest},
                            metadata={"steps": step, "image_size": cfg.image_size})
        log.info("saved to the BentoML store as %s", tag)
    return model_dir


def run_dir_argv(argv: list[str] | None) -> list[str]:
    """The command line with `--out DIR` as `--run_dir DIR`, its other name. Both, naming two
    folders, are refused: argparse kept the last one in silence."""
    argv = ["--run_dir" + a[len("--out"):] if a == "--out" or a.startswith("--out=") else a
            for a in (sys.argv[1:] if argv is None else argv)]
    given = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    given.add_argument("--run_dir", action="append", default=[])
    if len(folders := set(given.parse_known_args(argv)[0].run_dir)) > 1:
        raise ValueError(f"--run_dir and --out name one folder, the run's: got {', '.join(sorted(folders))}")
    return argv


def main(argv: list[str] | None = None) -> Path:
    argv = run_dir_argv(argv)
    cfg = parse_config(GANTrainConfig, PRESETS, argv, description=__doc__.splitlines()[0])
    return train(cfg)


if __name__ == "__main__":
    run_cli(main, on_interrupt=resumable)
