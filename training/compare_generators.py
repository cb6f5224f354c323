"""Compare the generators on the same data with the same evaluator:
`python -m training.compare_generators --gan runs/gan/model --ar runs/ar_image/model
 --ae runs/ae/model --vae runs/vae/model`.

Every model is graded by one evaluator (cached in <run>/evaluator) on the same prompts and
seeds (training.evaluate): attribute accuracy on training pairs and on held-out pairs,
coverage, Fréchet distance in the evaluator's feature space, memorisation; beside them the
network evaluations per image, the share of images the pixel-statistics guard flags as
unnatural (training.classifier_ascent), and images/s at --speed_batch on this machine. Writes
<out>/compare.md (the table), <out>/compare.json and <out>/compare_grid.png (the same
prompts and seeds, one block per model). A model whose path is empty is left out.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.ar_image import ARImageEngine
from models.artifacts import CONFIG, ArtifactError, read_json
from models.autoencoder import LatentEngine
from models.image_engine import MAX_IMAGES, ImageEngine, ImageRequest
from training.classifier_ascent import unnatural_rate, unnatural_threshold
from training.common import SEED, at_least, check_folder, parse_config, run_cli
from training.data.shapes import ShapesConfig, make_shapes
from training.evaluate import evaluate_generator, load_or_train_evaluator
from training.train_gan import sample_prompts


@dataclass
class CompareConfig:
    gan: str = field(default="runs/gan/model", metadata={"help": "GAN model directory ('' to skip)"})
    ar: str = field(default="runs/ar_image/model", metadata={"help": "AR model directory ('' to skip)"})
    ae: str = field(default="runs/ae/model", metadata={"help": "plain autoencoder directory ('' to skip)"})
    vae: str = field(default="runs/vae/model", metadata={"help": "VAE directory ('' to skip)"})
    run: str = field(default="runs/compare", metadata={"help": "folder for the cached evaluator"})
    out: str = field(default="runs/compare",
                     metadata={"help": "where the table, JSON and grid go (--out=docs: the README's)"})
    per_pair: int = field(default=4, metadata={"help": "prompts per (colour, shape) pair, 4 images each",
                                               "valid": at_least(1)})
    speed_batch: int = field(default=64, metadata={"help": "images per timed generate() call"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)",
                                              "valid": at_least(0)})
    seed: int = field(default=1, metadata={"help": "seed of the evaluation prompts and images", "valid": SEED})

    def check(self) -> None:
        """What would fail only after the whole evaluation: the timed call's size, and a file
        where an output folder goes."""
        most = len(SPEED_PROMPTS) * MAX_IMAGES
        if self.speed_batch % len(SPEED_PROMPTS) or not 0 < self.speed_batch <= most:
            raise ValueError(f"--speed_batch={self.speed_batch}: must be a multiple of {len(SPEED_PROMPTS)} from "
                             f"{len(SPEED_PROMPTS)} to {most} ({len(SPEED_PROMPTS)} prompts of up to "
                             f"{MAX_IMAGES} images each)")
        check_folder(self.run, "--run")
        check_folder(self.out, "--out")


# The model options, each with the family its folder must hold.
FAMILIES = {"gan": "gan", "ar": "ar_image", "ae": "autoencoder", "vae": "autoencoder"}


def model_data(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    """The `data` section of each given model's config.json, by option. A missing folder
    (the defaults name the README's run folders) or one that holds no model of the option's
    family is refused naming the option, not with a FileNotFoundError or KeyError traceback."""
    datas = {}
    for option in FAMILIES:
        if not (path := getattr(cfg, option)):
            continue
        try:
            config = read_json(Path(path) / CONFIG)
        except ArtifactError as e:
            raise ValueError(f"--{option}={path}: {e} (--{option}='' leaves it out)") from None
        if config.get("family") != FAMILIES[option] or not isinstance(config.get("data"), dict):
            raise ValueError(f"--{option}={path}: holds a {config.get('family')!r} model; --{option} takes "
                             f"{'an' if FAMILIES[option][0] in 'aeiou' else 'a'} {FAMILIES[option]!r} model")
        if option in ("ae", "vae") and config.get("variational") != (option == "vae"):  # rows named wrongly
            other = "ae" if option == "vae" else "vae"
            raise ValueError(f"--{option}={path}: holds {'a plain autoencoder' if option == 'vae' else 'a VAE'}; "
                             f"give it as --{other}")
        datas[option] = config["data"]
    return datas


def engines(cfg: CompareConfig) -> dict[str, tuple[Any, int, str]]:
    """Row name → (engine, network evaluations per image, model directory)."""
    rows: dict[str, tuple[Any, int, str]] = {}
    if cfg.gan:
        rows["GAN"] = (ImageEngine.load(cfg.gan, device="cpu"), 1, cfg.gan)
    if cfg.ar:
        guided = ARImageEngine.load(cfg.ar, device="cpu")
        plain = ARImageEngine(guided.model, guided.tokenizer, "cpu", guidance_scale=1.0)
        rows[f"AR, guidance {guided.guidance_scale:g}"] = (guided, guided.evaluations_per_image(), cfg.ar)
        rows["AR, no guidance"] = (plain, plain.evaluations_per_image(), cfg.ar)
    for name, path in (("AE", cfg.ae), ("VAE", cfg.vae)):
        if path:
            for prior, label in (("standard", "z ~ N(0, I)"), ("fitted", "z ~ fitted Gaussian")):
                rows[f"{name}, {label}"] = (LatentEngine.load(path, prior, device="cpu"), 1, path)
    return rows


SPEED_PROMPTS = ("a red circle", "a large blue square at the top", "a yellow triangle on the left",
                 "a small purple cross, black background")


def images_per_second(engine: Any, batch: int) -> tuple[float, torch.Tensor]:
    """One warm-up call, then one timed call of `batch` images (SPEED_PROMPTS); returns the
    rate and the timed call's images (uint8 (B, 3, S, S))."""
    reqs = [ImageRequest(p, seed=100 * i, n=batch // len(SPEED_PROMPTS)) for i, p in enumerate(SPEED_PROMPTS)]
    engine.generate([ImageRequest(SPEED_PROMPTS[0], seed=0, n=1)])
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    images = torch.from_numpy(np.stack([x for imgs in out for x in imgs])).permute(0, 3, 1, 2)
    return len(images) / seconds, images


def save_grid(blocks: dict[str, np.ndarray], path: Path) -> None:
    """Blocks (prompts × seeds images each) side by side, each under its model's name."""
    from PIL import Image, ImageDraw

    scale, gap, title = 2, 8, 14
    h = max(b.shape[0] for b in blocks.values())
    w = sum(b.shape[1] for b in blocks.values()) + gap * (len(blocks) - 1)
    canvas = Image.new("RGB", (w * scale, h * scale + title), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, block in blocks.items():
        img = Image.fromarray(block).resize((block.shape[1] * scale, block.shape[0] * scale),
                                            Image.Resampling.NEAREST)
        canvas.paste(img, (x * scale, title))
        draw.text((x * scale + 2, 1), name, fill="black")
        x += block.shape[1] + gap
    canvas.save(path)


def block(engine: Any, prompts: list[str], n: int = 4) -> np.ndarray:
    """Rows = prompts, columns = seeds 0..n-1, 1 px white gutter."""
    rows = engine.generate([ImageRequest(p, seed=0, n=n) for p in prompts])
    s = engine.image_size
    grid = np.full((len(rows) * (s + 1), n * (s + 1), 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            grid[r * (s + 1):r * (s + 1) + s, c * (s + 1):c * (s + 1) + s] = img
    return grid


def markdown(results: dict[str, dict[str, Any]], note: str, speed_batch: int) -> str:
    head = ("| model | colour acc | shape acc | all 5 attrs | held-out colour / shape | coverage "
            "| FD (evaluator feats) ↓ | memorised | unnatural (guard) | net evals / image "
            f"| images/s (batch {speed_batch}, CPU) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, m in results.items():
        tr, ho = m["train_accuracy"], m.get("heldout_accuracy", {})
        lines.append(
            f"| {name} | {tr['colour']:.2f} | {tr['shape']:.2f} | {m['train_all_attributes']:.2f} "
            f"| {ho.get('colour', float('nan')):.2f} / {ho.get('shape', float('nan')):.2f} "
            f"| {m['coverage']:.2f} | {m['fd']:.1f} | {m['memorisation']:.3f} "
            f"| {m['unnatural_rate']:.2f} | {m['evaluations_per_image']} | {m['images_per_s']:.1f} |")
    return head + "\n".join(lines) + "\n\n" + note + "\n"


def run(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    datas = model_data(cfg)
    if not datas:
        raise ValueError("no model to compare: give at least one of --gan, --ar, --ae, --vae")
    if (own := next((d for d in datas.values() if d.get("shapes") is None), None)) is not None:
        raise ValueError(f"a model was trained on {own.get('source') or 'your own images'}: the comparison "
                         "grades models of the built-in shapes dataset, whose attributes it knows")
    # The same images: each is graded (memorisation) against the first one's training set.
    dataset = ("seed", "n_train", "shapes")
    if len({json.dumps([d.get(k) for k in dataset], sort_keys=True) for d in datas.values()}) != 1:
        raise ValueError("the models were trained on different datasets: " + "; ".join(
            f"--{option}: " + ", ".join(f"{k}={d.get(k)}" for k in dataset) for option, d in datas.items()))
    first = next(iter(datas.values()))
    shapes = ShapesConfig(**first["shapes"])
    rows = engines(cfg)
    # The settings the training jobs use, so an evaluator cached by any of their runs fits.
    evaluator, _ = load_or_train_evaluator(Path(cfg.run) / "evaluator", shapes, replace=False, n_train=12000,
                                           steps=800, seed=first["seed"])
    train = make_shapes(first["n_train"], first["seed"], shapes).images
    threshold = unnatural_threshold(make_shapes(2000, seed=first["seed"] + 1, cfg=shapes).images)
    prompts = sample_prompts(None, shapes)
    results, blocks = {}, {}
    for name, (engine, nfe, _) in rows.items():
        t0 = time.perf_counter()
        m = evaluate_generator(engine, evaluator, shapes, train, per_pair=cfg.per_pair, n=4,
                               seed=cfg.seed)
        rate, images = images_per_second(engine, cfg.speed_batch)
        m.update(evaluations_per_image=nfe, images_per_s=rate,
                 unnatural_rate=unnatural_rate(images, threshold))
        results[name] = m
        blocks[name] = block(engine, prompts)
        print(f"{name}: {time.perf_counter() - t0:.0f}s, colour {m['train_accuracy']['colour']:.2f} "
              f"shape {m['train_accuracy']['shape']:.2f} fd {m['fd']:.1f} {rate:.1f} img/s", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"{cfg.per_pair} prompts per (colour, shape) pair × 4 images, seed {cfg.seed}; "
            f"torch threads: {torch.get_num_threads()}. Grid: {', '.join(rows)} (left to right), "
            f"rows = prompts, columns = seeds 0-3.")
    (out / "compare.md").write_text(markdown(results, note, cfg.speed_batch))
    (out / "compare.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    save_grid(blocks, out / "compare_grid.png")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    cfg = parse_config(CompareConfig, {"default": {}}, argv, default_preset="default",
                       description=__doc__.splitlines()[0])
    return run(cfg)


if __name__ == "__main__":
    run_cli(main)
