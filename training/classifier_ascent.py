"""Classifier gradient ascent: why "the classifier is confident" is not "the image is good".

Start from noise, or from a real image of another class (shape), and climb the evaluator's score
for the attributes a prompt asks for (iterative signed-gradient steps, PGD, in whole
pixel levels so the result is still a uint8 image). The evaluator soon agrees with the
prompt, while the image barely changes: an adversarial example, not a generator.

The evaluation must not count such images as good, so the comparison relies on checks
the ascent did not optimise:
- Fréchet distance to real images of the same attributes, in the evaluator's feature
  space (training.evaluate): matching the heads' argmax does not match the features'
  distribution;
- pixel statistics: `unnatural_rate` flags images whose median absolute Laplacian is far
  above any real image's. Real scenes are flat colour with smooth shading, so the median
  pixel has almost no curvature; the ascent's ±1-level steps everywhere have lots.

`python -m training.classifier_ascent --run runs/compare` writes docs/classifier_ascent.png
and docs/classifier_ascent.json (confidence before/after, pixel change, the evaluator's
accuracy, Fréchet distance and the unnatural rate, beside the same numbers for real images).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.image_engine import ImageRequest
from training.common import SEED, above, at_least, check_folder, parse_config, run_cli
from training.data.shapes import (ATTRIBUTES, SHAPES, ShapesConfig, attribute_labels,
                                  parse_holdout, render, training_pairs)
from training.evaluate import Evaluator, eval_prompts, evaluate_generator, load_or_train_evaluator

STARTS = ("noise", "other")


@dataclass
class AscentConfig:
    run: str = field(default="runs/compare", metadata={"help": "folder holding (or to hold) evaluator/"})
    out: str = field(default="docs", metadata={"help": "where the figure and the numbers go"})
    steps: int = field(default=60, metadata={"help": "ascent steps", "valid": at_least(1)})
    step_size: float = field(default=2.0, metadata={"help": "pixel levels (0-255) per signed step",
                                                    "valid": above(0)})
    eps: float = field(default=24.0, metadata={
        "help": "largest change of any pixel, in levels, when starting from a real image", "valid": above(0)})
    per_pair: int = field(default=2, metadata={"help": "prompts per (colour, shape) pair in the eval",
                                               "valid": at_least(1)})
    seed: int = field(default=0, metadata={"help": "seed of the starting images", "valid": SEED})

    def check(self) -> None:
        """Refuse a file where a folder goes now, not after training the evaluator."""
        check_folder(self.run, "--run")
        check_folder(self.out, "--out")


def ascend(evaluator: Evaluator, start: torch.Tensor, targets: torch.Tensor, steps: int,
           step_size: float, eps: float | None) -> torch.Tensor:
    """PGD on the summed log-probability of the target classes.

    start uint8 (B, 3, S, S), targets (B, A) class per attribute → uint8 (B, 3, S, S), each
    pixel within eps levels of the start (no bound when eps is None)."""
    evaluator.eval().requires_grad_(False)
    x0 = start.float()
    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        logp = evaluator(x).log_softmax(-1)                                   # (B, A, K)
        score = logp.gather(2, targets.unsqueeze(2)).sum()
        (grad,) = torch.autograd.grad(score, x)
        with torch.no_grad():
            x = x + step_size * grad.sign()
            if eps is not None:
                x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
            x = x.clamp(0, 255).round()  # whole levels: the uint8 image is exactly what was scored
    return x.detach().to(torch.uint8)


@torch.no_grad()
def target_confidence(evaluator: Evaluator, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per attribute, the mean probability the evaluator gives the target class."""
    probs = F.softmax(evaluator(images), dim=-1)                              # (B, A, K)
    mean = probs.gather(2, targets.unsqueeze(2)).squeeze(2).mean(0)           # (A,)
    return {a: float(p) for a, p in zip(ATTRIBUTES, mean)}


def laplacian_score(images: torch.Tensor) -> torch.Tensor:
    """Median absolute 4-neighbour Laplacian per image, in pixel levels: (B,)."""
    x = images.float()
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]
           - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])                            # (B, 3, S-2, S-2)
    return lap.abs().flatten(1).median(1).values


def unnatural_threshold(real: torch.Tensor) -> float:
    """Twice the largest score of real images, and at least 2 levels: a wide margin, so only
    images with noise across most of their pixels are flagged."""
    return max(2.0, 2 * float(laplacian_score(real).max()))


def unnatural_rate(images: torch.Tensor, threshold: float) -> float:
    return float((laplacian_score(images) > threshold).float().mean())


def other_class(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The same scene with another shape. (Colour covers many pixels and resists a small
    perturbation; shape lives in a few edge pixels, where adversarial examples are cheap.)"""
    return {**attrs, "shape": str(rng.choice([s for s in SHAPES if s != attrs["shape"]]))}


def _render_one(attrs: dict[str, Any], image_size: int, seed: int) -> torch.Tensor:
    """(1, 3, S, S): a scene's jitter seeded per image, so batching never changes it."""
    return render([attrs], image_size, np.random.default_rng([seed, 1]))


class AscentEngine:
    """Duck-types an image engine for `evaluate_generator`: for a prompt it knows (from the
    same `eval_prompts` scenes the evaluation uses), it returns ascent images aimed at
    that prompt's attributes. It exists to show the evaluation is not fooled."""

    def __init__(self, evaluator: Evaluator, scenes: list[dict[str, Any]], start: str,
                 cfg: AscentConfig, image_size: int = 32):
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        self.evaluator = evaluator
        self.attrs = {s["prompt"]: s["attrs"] for s in scenes}
        self.start, self.cfg, self.image_size = start, cfg, image_size
        self.last_start: torch.Tensor | None = None

    def starts(self, attrs: list[dict[str, Any]], seeds: list[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S): seeded uniform noise, or a real render of another class."""
        if self.start == "noise":
            return torch.stack([torch.randint(0, 256, (3, self.image_size, self.image_size),
                                              generator=torch.Generator().manual_seed(s),
                                              dtype=torch.uint8) for s in seeds])
        return torch.cat([_render_one(other_class(a, np.random.default_rng(s)), self.image_size, s)
                          for a, s in zip(attrs, seeds)])

    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        attrs = [self.attrs[r.prompt] for r in requests for _ in range(r.n)]
        seeds = [r.seed + i for r in requests for i in range(r.n)]
        start = self.starts(attrs, seeds)
        eps = self.cfg.eps if self.start == "other" else None
        images = ascend(self.evaluator, start, attribute_labels(attrs), self.cfg.steps,
                        self.cfg.step_size, eps)
        self.last_start = start
        flat = images.permute(0, 2, 3, 1).numpy()
        out, i = [], 0
        for r in requests:
            out.append(list(flat[i:i + r.n]))
            i += r.n
        return out


class RealEngine(AscentEngine):
    """The reference: fresh real renders of exactly what each prompt asks for."""

    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        return [[_render_one(self.attrs[r.prompt], self.image_size, r.seed + i)[0].permute(1, 2, 0).numpy()
                 for i in range(r.n)] for r in requests]


def all_scenes(shapes: ShapesConfig, per_pair: int, seed: int) -> list[dict[str, Any]]:
    """The scenes `evaluate_generator(..., per_pair, seed)` will prompt for, both splits."""
    held = sorted(parse_holdout(shapes.holdout))
    return eval_prompts(shapes, training_pairs(shapes), per_pair, seed) + \
        eval_prompts(shapes, held, per_pair, seed)


def guarded_evaluation(engine: Any, evaluator: Evaluator, shapes: ShapesConfig, train: torch.Tensor,
                       per_pair: int, seed: int, threshold: float) -> dict[str, Any]:
    """The evaluation pipeline (training.evaluate) plus the pixel-statistics flag on the
    very same images (regenerated with the same seeds)."""
    m = evaluate_generator(engine, evaluator, shapes, train, per_pair=per_pair, n=2, seed=seed)
    scenes = eval_prompts(shapes, training_pairs(shapes), per_pair, seed)
    reqs = [ImageRequest(s["prompt"], seed=seed + 1000 * i, n=2) for i, s in enumerate(scenes)]
    images = torch.from_numpy(np.stack([x for imgs in engine.generate(reqs) for x in imgs]))
    m["unnatural_rate"] = unnatural_rate(images.permute(0, 3, 1, 2), threshold)
    return m


def save_figure(rows: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """Per start: start images, ascent results, and their difference amplified ×8."""
    from PIL import Image

    strips = []
    for _, start, result in rows:
        diff = ((result.float() - start.float()) * 8 + 128).clamp(0, 255).to(torch.uint8)
        for images in (start, result, diff):
            strips.append(torch.cat(list(images[:8]), dim=2))                # (3, S, 8S)
    grid = torch.cat(strips, dim=1).permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    img.resize((img.width * 3, img.height * 3), Image.Resampling.NEAREST).save(path)


def run(cfg: AscentConfig) -> dict[str, Any]:
    from training.data.shapes import make_shapes

    shapes = ShapesConfig()
    evaluator, _ = load_or_train_evaluator(Path(cfg.run) / "evaluator", shapes, replace=False, n_train=12000,
                                           steps=800, seed=0)
    train = make_shapes(4000, seed=0, cfg=shapes).images
    threshold = unnatural_threshold(make_shapes(2000, seed=1, cfg=shapes).images)
    scenes = all_scenes(shapes, cfg.per_pair, cfg.seed)
    report: dict[str, Any] = {"config": asdict(cfg), "unnatural_threshold": threshold}
    figure = []
    engines = {"real": RealEngine(evaluator, scenes, "noise", cfg),
               **{s: AscentEngine(evaluator, scenes, s, cfg) for s in STARTS}}
    for name, engine in engines.items():
        report[name] = guarded_evaluation(engine, evaluator, shapes, train, cfg.per_pair, cfg.seed,
                                          threshold)
        if name in STARTS:
            sample = scenes[:16:2]
            targets = attribute_labels([s["attrs"] for s in sample])
            result = torch.from_numpy(np.stack([x[0] for x in engine.generate(
                [ImageRequest(s["prompt"], seed=cfg.seed + i) for i, s in enumerate(sample)])]))
            result = result.permute(0, 3, 1, 2)
            start = engine.last_start
            change = result.float() - start.float()
            report[name].update(
                confidence_before=target_confidence(evaluator, start, targets),
                confidence_after=target_confidence(evaluator, result, targets),
                pixel_rmse_levels=float(change.square().mean().sqrt()),
                pixel_max_levels=float(change.abs().max()))
            figure.append((name, start, result))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(figure, out / "classifier_ascent.png")
    (out / "classifier_ascent.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(AscentConfig, {"default": {}}, argv, default_preset="default",
                       description=__doc__.splitlines()[0])
    report = run(cfg)
    for name in ("real", *STARTS):
        m = report[name]
        print(f"{name:6s} colour {m['train_accuracy']['colour']:.2f} shape {m['train_accuracy']['shape']:.2f} "
              f"fd {m['fd']:.1f} unnatural {m['unnatural_rate']:.2f} "
              f"confidence before {m.get('confidence_before')} after {m.get('confidence_after')}")
    return report


if __name__ == "__main__":
    run_cli(main)
