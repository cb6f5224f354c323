"""How good is a generator? An independent classifier grades what it draws.

The evaluator is a small CNN trained on real, attribute-labelled images (all (colour,
shape) pairs, held-out ones included, single-object scenes), kept apart from the
discriminator so the generator cannot have learned to fool it. With it:

- attribute accuracy: does the image show the shape/colour/size/position/background the
  prompt asked for, on training-distribution prompts and on held-out pairs;
- mode coverage: the fraction of training (colour, shape) pairs the generator produces
  when asked, and per-prompt diversity (feature spread relative to real images of the
  same attributes; ~0 means one image per prompt: collapse);
- Fréchet distance between generated and real images in the evaluator's feature space;
- memorisation: the fraction of generated images whose nearest training image (pixel
  RMSE) is closer than a threshold calibrated on near-duplicates of training images.

`python -m training.evaluate MODEL_DIR [--run RUN_DIR]` re-measures a saved model.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.artifacts import load_model_dir, save_model_dir
from models.image_engine import ImageEngine, ImageRequest
from models.sampling import MAX_SEED
from training.common import check_model_given, run_cli
from training.data.imagefolder import CaptionedImages
from training.data.shapes import (ATTRIBUTES, BACKGROUNDS, POSITIONS, SIZES, VALUES, ShapesConfig,
                                  attribute_labels, caption, make_shapes, parse_holdout, render,
                                  training_pairs)


@dataclass
class EvaluatorConfig:
    image_size: int = 32
    width: int = 16
    feature_dim: int = 128


class Evaluator(nn.Module):
    """CNN with one head per attribute; the penultimate layer is the feature space for FD."""

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.trunk = nn.Sequential(
            # Two convolutions at full resolution: small shapes are only ~8 px across.
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),  # keeps a coarse map: position is an attribute
            nn.Flatten(), nn.Linear(64 * w, cfg.feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.feature_dim, len(VALUES[a])) for a in ATTRIBUTES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) → (B, F)."""
        return self.trunk(x.float() / 127.5 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, S, S) → stacked logits (B, A, Kmax), unused classes at -inf."""
        f = self.features(x)
        kmax = max(len(v) for v in VALUES.values())
        return torch.stack([F.pad(self.heads[a](f), (0, kmax - len(VALUES[a])), value=-torch.inf)
                            for a in ATTRIBUTES], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """→ predicted labels (B, A) and features (B, F)."""
        preds, feats = [], []
        for i in range(0, len(x), batch):
            f = self.features(x[i:i + batch])
            feats.append(f)
            preds.append(torch.stack([self.heads[a](f).argmax(1) for a in ATTRIBUTES], dim=1))
        return torch.cat(preds), torch.cat(feats)


def accuracy(evaluator: Evaluator, data: CaptionedImages) -> dict[str, float]:
    pred, _ = evaluator.eval().predict(data.images)
    labels = attribute_labels(data.attributes)
    return {a: float((pred[:, i] == labels[:, i]).float().mean()) for i, a in enumerate(ATTRIBUTES)}


def evaluator_data(cfg: ShapesConfig, n: int, seed: int) -> CaptionedImages:
    """Single-object scenes over every pair (held-out ones too): the evaluator must be able
    to recognise what the generator never saw."""
    one = ShapesConfig(cfg.image_size, cfg.holdout, two_object_prob=0.0)
    return make_shapes(n, seed, one, exclude_holdout=False)


def train_evaluator(cfg: ShapesConfig, n_train: int = 12000, steps: int = 800, batch: int = 64,
                    lr: float = 3e-3, seed: int = 0, n_test: int = 2000) -> tuple[Evaluator, dict[str, Any]]:
    """Fit on fresh real data, report per-attribute accuracy on another fresh set."""
    # Its own random stream: training it must not shift the GAN's draws.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _fit_evaluator(cfg, n_train, steps, batch, lr, seed, n_test)


def _fit_evaluator(cfg: ShapesConfig, n_train: int, steps: int, batch: int, lr: float,
                   seed: int, n_test: int) -> tuple[Evaluator, dict[str, Any]]:
    data = evaluator_data(cfg, n_train, seed=10_000 + seed)
    test = evaluator_data(cfg, n_test, seed=20_000 + seed)
    labels = attribute_labels(data.attributes)                                # (N, A)
    model = Evaluator(EvaluatorConfig(image_size=cfg.image_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        lr_now = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(len(data), (batch,))
        # Mirror left/right at random: more variety for free, labels follow.
        x, y = data.images[idx], labels[idx].clone()
        flip = torch.rand(batch) < 0.5
        x[flip] = x[flip].flip(-1)
        pos = ATTRIBUTES.index("position")
        left, right = POSITIONS.index("left"), POSITIONS.index("right")
        y_pos = y[:, pos].clone()
        y[flip & (y_pos == left), pos] = right
        y[flip & (y_pos == right), pos] = left
        logits = model(x)                                                     # (B, A, K)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    metrics = {"accuracy": accuracy(model, test), "n_train": n_train, "n_test": n_test, "steps": steps}
    return model.eval(), metrics


def load_evaluator(path: Path) -> tuple[Evaluator, dict[str, Any]]:
    art = load_model_dir(path, lambda c: Evaluator(EvaluatorConfig(c["image_size"])), family="evaluator",
                         needs_tokenizer=False)
    return art.model, art.metrics


def load_or_train_evaluator(path: Path, cfg: ShapesConfig, replace: bool = True,
                            **kw: Any) -> tuple[Evaluator, dict]:
    """The evaluator is cached in the run folder: trained once, reused on resume. One of other
    settings there is replaced, unless `replace` is false (the tools, pointed at a training
    run's folder, replaced its evaluator, and its later evaluations no longer compared with
    the earlier ones): then it is refused, before any training."""
    want = {"family": "evaluator", "shapes": asdict(cfg), "train": kw,
            **asdict(EvaluatorConfig(cfg.image_size))}
    if (path / "config.json").is_file():
        if json.loads((path / "config.json").read_text()) == want:
            return load_evaluator(path)
        if not replace:
            raise ValueError(f"--run={path.parent}: its evaluator/ was trained with other settings (a training "
                             "run's?), which this would replace: give another --run")
    model, metrics = train_evaluator(cfg, **kw)
    save_model_dir(path, want, model.state_dict(), metrics=metrics)
    return model, metrics


# ---------------------------------------------------------------- metrics for a generator

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) = sum sqrt(eig(sqrt(ca) cb sqrt(ca))), a symmetric PSD matrix.
    ev, vecs = torch.linalg.eigh(ca)
    sqrt_ca = vecs @ torch.diag(ev.clamp(min=0).sqrt()) @ vecs.T
    tr_sqrt = torch.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)


def _flat(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) → (N, 3·S·S) float in [0, 1]."""
    return images.flatten(1).float() / 255


def nearest_distance(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Pixel RMSE from each query image to its nearest reference image: (N,)."""
    ref = _flat(reference)                                                    # (M, P)
    ref_sq = ref.square().sum(1)
    out = []
    for i in range(0, len(queries), chunk):
        q = _flat(queries[i:i + chunk])                                       # (C, P)
        d2 = q.square().sum(1, keepdim=True) + ref_sq[None] - 2 * q @ ref.T   # (C, M)
        out.append((d2.min(1).values.clamp(min=0) / ref.shape[1]).sqrt())
    return torch.cat(out)


def near_duplicate_threshold(train: torch.Tensor, n: int = 512, seed: int = 0) -> float:
    """The distance below which two images count as copies: the 99th percentile of the
    distance between a training image and a near-duplicate of it (±1 % brightness,
    pixel noise σ = 1 % of the range), i.e. what a copy that was only re-encoded looks like."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:n]
    x = _flat(train[idx])
    scale = 1 + (torch.rand(len(idx), 1, generator=g) - 0.5) * 0.02
    dup = (x * scale + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    d = ((dup - x).square().mean(1)).sqrt()
    return float(torch.quantile(d, 0.99))


def memorisation_rate(generated: torch.Tensor, train: torch.Tensor, threshold: float) -> float:
    return float((nearest_distance(generated, train) < threshold).float().mean())


def eval_prompts(cfg: ShapesConfig, pairs: list[tuple[str, str]], per_pair: int,
                 seed: int) -> list[dict[str, Any]]:
    """Fully specified single-object scenes for each (colour, shape) pair, with captions."""
    rng = np.random.default_rng(seed)
    scenes = []
    for colour, shape in pairs:
        for _ in range(per_pair):
            attrs = {"shape": shape, "colour": colour, "size": str(rng.choice(SIZES)),
                     "position": str(rng.choice(POSITIONS)),
                     "background": str(rng.choice([b for b in BACKGROUNDS if b != colour])),
                     "n_objects": 1}
            scenes.append({"attrs": attrs, "prompt": caption(attrs, rng, full=True)})
    return scenes


def eval_splits(cfg: ShapesConfig) -> list[tuple[str, list[tuple[str, str]]]]:
    """The (split, pairs) evaluate_generator grades: training pairs and held-out ones, if any."""
    splits = [("train", training_pairs(cfg)), ("heldout", sorted(parse_holdout(cfg.holdout)))]
    return [(split, pairs) for split, pairs in splits if pairs]


def generator_prompts(cfg: ShapesConfig, per_pair: int, seed: int) -> list[str]:
    """Every prompt evaluate_generator(per_pair=, seed=) asks the generator for, so a job can
    check they fit its context before training rather than at the first evaluation."""
    return [s["prompt"] for _, pairs in eval_splits(cfg) for s in eval_prompts(cfg, pairs, per_pair, seed)]


def generate_for(engine: ImageEngine, prompts: list[str], n: int, seed: int,
                 batch: int = 64) -> torch.Tensor:
    """n images per prompt → uint8 (len(prompts)·n, 3, S, S), prompt-major. Prompt k takes seeds
    from seed + 1000·k, wrapped to stay a valid request seed (any --seed in [0, 2**32) works:
    near 2**32 the last prompts' requests were refused, after minutes of work)."""
    out = []
    per_call = max(1, batch // n)
    wrap = MAX_SEED + 1 - (n - 1)  # request seeds in [0, MAX_SEED - (n - 1)]: image i takes seed + i
    for i in range(0, len(prompts), per_call):
        reqs = [ImageRequest(p, seed=(seed + 1000 * (i + j)) % wrap, n=n)
                for j, p in enumerate(prompts[i:i + per_call])]
        for imgs in engine.generate(reqs):
            out.extend(imgs)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def evaluate_generator(engine: ImageEngine, evaluator: Evaluator, cfg: ShapesConfig,
                       train_images: torch.Tensor, per_pair: int = 4, n: int = 4,
                       seed: int = 0, memorisation: bool = True) -> dict[str, Any]:
    """All the metrics above, as one JSON-ready dict."""
    evaluator.eval()
    results: dict[str, Any] = {}
    for split, pairs in eval_splits(cfg):
        scenes = eval_prompts(cfg, pairs, per_pair, seed)
        images = generate_for(engine, [s["prompt"] for s in scenes], n, seed)  # (P·n, 3, S, S)
        wanted = attribute_labels([s["attrs"] for s in scenes]).repeat_interleave(n, 0)
        pred, feats = evaluator.predict(images)
        correct = pred == wanted                                               # (P·n, A)
        results[f"{split}_accuracy"] = {a: float(correct[:, i].float().mean())
                                        for i, a in enumerate(ATTRIBUTES)}
        results[f"{split}_all_attributes"] = float(correct.all(1).float().mean())
        if split != "train":
            continue
        # Coverage: a pair counts as produced if any image asked for it shows it.
        pair_ok = correct[:, :2].all(1).view(len(pairs), per_pair * n).any(1)
        results["coverage"] = float(pair_ok.float().mean())
        results["missing_pairs"] = [f"{c} {s}" for (c, s), ok in zip(pairs, pair_ok) if not ok]
        # Real images with the very same attributes: the reference for diversity and FD.
        rng = np.random.default_rng(seed + 1)
        real = render([s["attrs"] for s in scenes for _ in range(n)], cfg.image_size, rng)
        _, real_feats = evaluator.predict(real)
        results["diversity"] = _spread(feats, n) / max(_spread(real_feats, n), 1e-8)
        results["fd"] = frechet_distance(feats, real_feats)
        if memorisation:
            threshold = near_duplicate_threshold(train_images, seed=seed)
            results["memorisation"] = memorisation_rate(images, train_images, threshold)
            results["memorisation_threshold"] = threshold
    return results


def _spread(feats: torch.Tensor, n: int) -> float:
    """Mean pairwise feature distance within each group of n consecutive images."""
    g = feats.view(-1, n, feats.shape[1])                                      # (P, n, F)
    d = torch.cdist(g, g)                                                      # (P, n, n)
    return float(d.sum() / (g.shape[0] * n * (n - 1)))


def cached_evaluator(run: str, cfg: ShapesConfig) -> Evaluator:
    """The evaluator cached in a run folder, which must grade images of the model's size: one
    trained on other sizes gives a wrong FD that would go into the model's metrics.json (a
    typo in --run must not quietly train a new one either)."""
    path = Path(run) / "evaluator"
    if not path.is_dir():
        raise ValueError(f"--run={run}: no evaluator/ there (a run folder of the training job holds "
                         "one; leave --run out to train a new evaluator)")
    evaluator, _ = load_evaluator(path)
    if evaluator.cfg.image_size != cfg.image_size:
        raise ValueError(f"--run={run}: its evaluator grades {evaluator.cfg.image_size} px images, the model "
                         f"draws {cfg.image_size} px ones (give the model's own run folder, or leave --run out)")
    return evaluator


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Re-measure a saved generator; updates its metrics.json.")
    p.add_argument("model_dir", help="a model directory written by training.train_gan (a store's: "
                                     "`bentoml models get TAG -o path`)")
    p.add_argument("--run", default="", help="its run folder: reuse the evaluator cached there")
    p.add_argument("--per_pair", type=int, default=12, help="prompts per (colour, shape) pair")
    args = p.parse_args(argv)
    if args.per_pair < 1:
        p.error(f"--per_pair={args.per_pair}: must be >= 1")
    try:
        check_model_given(args.model_dir)
    except ValueError as e:
        p.error(str(e))
    engine = ImageEngine.load(args.model_dir, device="cpu")
    data_cfg = json.loads((Path(args.model_dir) / "config.json").read_text())["data"]
    if not data_cfg.get("shapes"):
        raise ValueError(f"{args.model_dir}: metrics need attribute labels, and this model was not "
                         "trained on the procedural data")
    cfg = ShapesConfig(**data_cfg["shapes"])
    evaluator = cached_evaluator(args.run, cfg) if args.run else train_evaluator(cfg)[0]
    train = make_shapes(data_cfg["n_train"], data_cfg["seed"], cfg)
    metrics = evaluate_generator(engine, evaluator, cfg, train.images, per_pair=args.per_pair)
    path = Path(args.model_dir) / "metrics.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **metrics}, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    run_cli(main)
