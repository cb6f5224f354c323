"""Export generated images as an imagefolder, and score them by what they teach.

`python -m training.synthesize MODEL_DIR --n 2000 --out synth/` writes PNGs plus
metadata.jsonl (file_name, text, and the prompt's attributes when it was sampled from
the procedural distribution): the same format `train_gan --data` reads.

Classification accuracy score (CAS, Ravuri & Vinyals 2019): train the evaluator
architecture on the synthetic images only (labels = what the prompts asked for), test
it on real images. A generator that draws the wrong colour, or one colour for
everything, teaches a classifier the wrong thing, which accuracy on its own
samples cannot show. `--prompts FILE` (one prompt per line) exports given prompts;
those have no labels, so CAS is only reported for sampled prompts.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import InvalidParameter
from models.image_engine import ImageEngine, ImageRequest
from models.sampling import MAX_SEED
from training.common import check_device, check_folder, check_model_given, run_cli
from training.data.imagefolder import CaptionedImages, write_imagefolder
from training.data.shapes import (ShapesConfig, attribute_labels, caption, parse_holdout,
                                  sample_attributes)
from training.evaluate import Evaluator, EvaluatorConfig, accuracy, evaluator_data


# What an export holds; report.json, written before the images, marks a folder as an export
# ("finished": false until its end).
EXPORT_FILE = re.compile(r"\d{6}\.png|metadata\.jsonl|report\.json")


def check_out(out: str) -> None:
    """Refuse --out that is a file, or a folder holding anything but an earlier export (which
    is replaced, so re-running a command just works). A user's own imagefolder has the very
    layout synthesize writes (000000.png..., metadata.jsonl): writing into it would overwrite
    its captions and images, so a folder without report.json is never taken for an export."""
    check_folder(out, "--out")
    path = Path(out)
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    others = [n for n in names if not EXPORT_FILE.fullmatch(n)]
    if others or (names and "report.json" not in names):
        raise ValueError(f"--out={out}: holds files that are not an earlier export of synthesize "
                         f"({', '.join((others or names)[:3])}): give a new or empty folder")


def write_report(out: str, report: dict[str, Any]) -> None:
    """report.json, which marks the folder as this tool's export (see check_out)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))


def clear_export(out: str) -> None:
    """Remove an earlier export's files: a shorter export must not leave its images behind.
    report.json goes last: a run stopped meanwhile leaves a folder that is still an export."""
    if Path(out).is_dir():
        for p in sorted(Path(out).iterdir(), key=lambda p: p.name == "report.json"):
            if EXPORT_FILE.fullmatch(p.name) and p.is_file():
                p.unlink()


def sample_scenes(cfg: ShapesConfig, n: int, seed: int) -> list[dict[str, Any]]:
    """Single-object scenes from the training distribution (held-out pairs excluded)."""
    rng = np.random.default_rng(seed)
    one = ShapesConfig(cfg.image_size, cfg.holdout, two_object_prob=0.0)
    attrs = [sample_attributes(rng, one, parse_holdout(cfg.holdout)) for _ in range(n)]
    return [{"attrs": a, "prompt": caption(a, rng, full=True)} for a in attrs]


def read_prompts(path: str, engine: ImageEngine) -> list[str]:
    """The file's non-blank lines, each checked as a request (the seed apart: `check_seed`): a
    prompt the model cannot take is refused before any image is made, naming its line."""
    if not Path(path).is_file():
        raise ValueError(f"--prompts {path}: no such file")
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if prompt := line.strip():
            try:
                engine.validate(ImageRequest(prompt, seed=0))
            except InvalidParameter as e:
                raise ValueError(f"--prompts {path}, line {number} ({prompt[:60]!r}): {e}") from None
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def check_seed(seed: int, count: int) -> None:
    """Image i uses seed + i: each must be a seed the engine takes."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise ValueError(f"--seed={seed}: must be from 0 to {MAX_SEED - (count - 1)} for {count} image(s) "
                         f"(image i uses seed + i, at most {MAX_SEED})")


def synthesize(engine: ImageEngine, prompts: list[str], seed: int,
               batch: int = 64) -> list[np.ndarray]:
    """One image per prompt (seed + index), in batches of one forward pass each."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        reqs = [ImageRequest(p, seed=seed + i + j) for j, p in enumerate(prompts[i:i + batch])]
        out.extend(imgs[0] for imgs in engine.generate(reqs))
    return out


def classification_accuracy_score(synthetic: CaptionedImages, cfg: ShapesConfig,
                                  steps: int = 800, batch: int = 64, lr: float = 3e-3,
                                  seed: int = 0) -> dict[str, float]:
    """Evaluator architecture trained on synthetic data only, accuracy on fresh real data."""
    g = torch.Generator().manual_seed(seed)
    labels = attribute_labels(synthetic.attributes)
    model = Evaluator(EvaluatorConfig(image_size=cfg.image_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(len(synthetic), (batch,), generator=g)
        loss = F.cross_entropy(model(synthetic.images[idx]).flatten(0, 1), labels[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # Real test images from the training distribution's pairs and the held-out ones alike.
    real = evaluator_data(cfg, 2000, seed=30_000 + seed)
    return accuracy(model, real)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Export generated images (imagefolder) and report CAS.")
    p.add_argument("model_dir", help="a model directory written by training.train_gan (a store's: "
                                     "`bentoml models get TAG -o path`)")
    p.add_argument("--out", required=True, help="folder to write PNGs + metadata.jsonl into (new, empty, "
                                                "or an earlier export, which is replaced)")
    p.add_argument("--n", type=int, default=2000, help="images to generate (sampled prompts)")
    p.add_argument("--prompts", default="", help="file with one prompt per line (no CAS)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    p.add_argument("--cas_steps", type=int, default=800, help="CAS classifier steps (0 = skip)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n={args.n}: must be >= 1")
    if args.cas_steps < 0:
        p.error(f"--cas_steps={args.cas_steps}: must be >= 0 (0 skips CAS)")
    try:
        check_model_given(args.model_dir)
        check_seed(args.seed, 1 if args.prompts else args.n)
        check_device(args.device)
        check_out(args.out)
    except ValueError as e:
        p.error(str(e))

    engine = ImageEngine.load(args.model_dir, device=args.device)
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    report: dict[str, Any] = {}
    if args.prompts:
        try:
            prompts = read_prompts(args.prompts, engine)
            check_seed(args.seed, len(prompts))
        except ValueError as e:
            p.error(str(e))
        attrs = None
    else:
        shapes_cfg = (config.get("data") or {}).get("shapes")
        if not shapes_cfg:
            p.error(f"{args.model_dir}: this model was not trained on the procedural data, whose "
                    "prompts synthesize samples: pass --prompts")
        cfg = ShapesConfig(**shapes_cfg)
        scenes = sample_scenes(cfg, args.n, args.seed)
        prompts, attrs = [s["prompt"] for s in scenes], [s["attrs"] for s in scenes]
    images = synthesize(engine, prompts, args.seed)
    clear_export(args.out)  # only now: a run that fails before this leaves the earlier export whole
    report.update(n=len(images), out=str(args.out), finished=False)
    # Written first, then again at the end: a run stopped in between (CAS trains for a while)
    # leaves a folder that is still an export, which the same command replaces.
    write_report(args.out, report)
    write_imagefolder(args.out, images, prompts, attrs)
    if attrs is not None and args.cas_steps:
        synthetic = CaptionedImages(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), prompts, attrs)
        report["cas"] = classification_accuracy_score(synthetic, cfg, steps=args.cas_steps, seed=args.seed)
    report["finished"] = True
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_cli(main)
