"""The default dataset: procedural, attribute-labelled captioned images (no downloads).

Every image is rendered from explicit attributes (shape, colour, size, position,
background; optionally a second object), so a generator can be graded by what it was
asked for. Continuous jitter (position, radius, rotation, shade, a faint background
gradient) keeps every image distinct, which is what makes a memorisation metric mean
something. Some (colour, shape) pairs can be held out of training entirely to measure
compositional generalisation. Everything is a pure function of a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.data.imagefolder import CaptionedImages

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
    "yellow": (240, 215, 40), "purple": (145, 60, 195), "cyan": (40, 200, 215),
}
BACKGROUNDS = {
    "black": (22, 22, 22), "white": (238, 238, 238), "grey": (128, 128, 128),
    "blue": (45, 85, 225), "yellow": (240, 215, 40),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
# The order of the label columns the evaluator predicts.
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES,
    "position": POSITIONS, "background": tuple(BACKGROUNDS),
}
DEFAULT_HOLDOUT = "green:triangle,blue:cross,yellow:square"

SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "cross": ("cross", "plus sign", "plus"),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "leafy green"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "plum"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "black": ("black", "dark", "jet black"),
    "white": ("white", "snowy", "pale"),
    "grey": ("grey", "gray", "ash"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "near the top", "up top"),
    "bottom": ("at the bottom", "near the bottom", "down low"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
# Full templates name every attribute; partial ones leave some to chance, which is where
# per-prompt diversity comes from.
FULL_TEMPLATES = (
    "a {size} {colour} {shape} {position}, {background} background",
    "{background} backdrop with a {size} {colour} {shape} {position}",
    "{position}, a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape}, {size}, {position} against {background}",
    "there is a {size} {shape} coloured {colour} {position} on {background}",
    "on a {background} background: {size} {colour} {shape} {position}",
)
PARTIAL_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {position}",
    "{colour} {shape} on {background}",
)
TWO_TEMPLATES = (
    "a {size} {colour} {shape} {position} and a {size2} {colour2} {shape2} {position2}, "
    "{background} background",
    "{background} backdrop with a {size} {colour} {shape} {position} and a {size2} "
    "{colour2} {shape2} {position2}",
)
# Pairs of positions that keep two objects apart.
TWO_POSITIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))


@dataclass
class ShapesConfig:
    image_size: int = 32
    holdout: str = DEFAULT_HOLDOUT      # "colour:shape,..." never rendered in training
    two_object_prob: float = 0.0
    partial_caption_prob: float = 0.2


def parse_holdout(spec: str) -> set[tuple[str, str]]:
    """'green:triangle,blue:cross' → {('green', 'triangle'), ('blue', 'cross')}."""
    pairs = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        colour, _, shape = item.partition(":")
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"holdout entry {item!r}: expected colour:shape with colour in "
                             f"{list(COLOURS)} and shape in {list(SHAPES)}")
        pairs.add((colour, shape))
    check_holdout(pairs)
    return pairs


def check_holdout(held: set[tuple[str, str]]) -> None:
    """Sampling redraws until it finds a training pair, and a hard negative redraws until it
    finds another colour for its shape (or another shape for its colour): a holdout that
    leaves none would loop forever, so it is refused."""
    train = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    if not train:
        raise ValueError("holds out every colour:shape pair: none is left for training")
    for shape in SHAPES:
        colours = [c for c, s in train if s == shape]
        if len(colours) == 1:
            raise ValueError(f"leaves {shape} with one colour ({colours[0]}): its hard negatives "
                             "need another")
    for colour in COLOURS:
        shapes = [s for c, s in train if c == colour]
        if len(shapes) == 1:
            raise ValueError(f"leaves {colour} with one shape ({shapes[0]}): its hard negatives "
                             "need another")


def word(value: str, rng: np.random.Generator) -> str:
    options = SYNONYMS.get(value, (value,))
    return options[rng.integers(len(options))]


def caption(attrs: dict[str, Any], rng: np.random.Generator, full: bool = True) -> str:
    """One of several templates, with synonyms drawn per attribute."""
    if attrs["n_objects"] == 2:
        templates = TWO_TEMPLATES
    else:
        templates = FULL_TEMPLATES if full else PARTIAL_TEMPLATES
    template = templates[rng.integers(len(templates))]
    keys = [k for k in attrs if k != "n_objects"]
    return template.format(**{k: word(attrs[k], rng) for k in keys})


def sample_attributes(rng: np.random.Generator, cfg: ShapesConfig,
                      exclude: set[tuple[str, str]]) -> dict[str, Any]:
    """One scene's attributes; objects whose (colour, shape) is in `exclude` are redrawn."""
    def obj() -> tuple[str, str]:
        while True:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            if (colour, shape) not in exclude:
                return colour, shape

    two = rng.random() < cfg.two_object_prob
    colour, shape = obj()
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    attrs: dict[str, Any] = {"shape": shape, "colour": colour, "size": str(rng.choice(SIZES)),
                             "background": background, "n_objects": 2 if two else 1}
    if two:
        attrs["position"], attrs["position2"] = TWO_POSITIONS[rng.integers(len(TWO_POSITIONS))]
        while True:
            colour2, shape2 = obj()
            if colour2 != background:
                break
        attrs.update(shape2=shape2, colour2=colour2, size2=str(rng.choice(SIZES)))
    else:
        attrs["position"] = str(rng.choice(POSITIONS))
    return attrs


def _sdf(shape: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of each pixel to each object's outline.

    x, y: (N, S, S) object-centred, rotated coordinates; shape, r: (N, 1, 1)."""
    circle = np.hypot(x, y) - r
    half = 0.85 * r
    square = np.maximum(np.abs(x), np.abs(y)) - half
    # Equilateral triangle, apex up (image y grows downwards), circumradius 1.2 r:
    # the max over its three edge half-planes.
    R = 1.2 * r
    tri = np.maximum.reduce([y, -0.866 * x - 0.5 * y, 0.866 * x - 0.5 * y]) - R / 2
    arm, bar = r, 0.35 * r
    cross = np.minimum(np.maximum(np.abs(x) - arm, np.abs(y) - bar),
                       np.maximum(np.abs(x) - bar, np.abs(y) - arm))
    return np.select([shape == 0, shape == 1, shape == 2], [circle, square, tri], cross)


def negative_attributes(attrs: dict[str, Any], rng: np.random.Generator,
                        exclude: set[tuple[str, str]]) -> dict[str, Any]:
    """The same scene with one attribute of the first object changed (the shape half the
    time: the attribute that is easiest to ignore). Held-out pairs are never produced."""
    key = "shape" if rng.random() < 0.5 else str(rng.choice(["colour", "size", "position",
                                                             "background"]))
    while True:
        neg = dict(attrs, **{key: str(rng.choice([v for v in VALUES[key] if v != attrs[key]]))})
        if (neg["colour"], neg["shape"]) not in exclude:
            return neg


def render(attrs: list[dict[str, Any]], image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Attributes → (N, 3, S, S) uint8, anti-aliased from signed distances."""
    n, s = len(attrs), image_size
    k = s / 32  # geometry is specified at 32 px and scaled
    bg = np.array([BACKGROUNDS[a["background"]] for a in attrs], dtype=np.float32)   # (N, 3)
    bg = bg + rng.uniform(-10, 10, size=(n, 3))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5                              # (S, S)
    grad = rng.uniform(-8, 8, size=(n, 2, 1, 1))
    shade = grad[:, 0] * (xx / s - 0.5) + grad[:, 1] * (yy / s - 0.5)                 # (N, S, S)
    img = bg[:, :, None, None] + shade[:, None]                                       # (N, 3, S, S)
    centre = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "centre": (0, 0)}
    for suffix in ("", "2"):
        has = np.array([f"shape{suffix}" in a for a in attrs])
        if not has.any():
            continue
        idx = np.flatnonzero(has)
        sub = [attrs[i] for i in idx]
        m = len(sub)
        shape = np.array([SHAPES.index(a[f"shape{suffix}"]) for a in sub])[:, None, None]
        large = np.array([a[f"size{suffix}"] == "large" for a in sub])
        r = np.where(large, rng.uniform(8.0, 9.5, m), rng.uniform(5.0, 6.0, m)) * k
        offs = np.array([centre[a[f"position{suffix}"]] for a in sub], dtype=np.float32)
        cx = s / 2 + offs[:, 0] * 9 * k + rng.uniform(-1.5, 1.5, m) * k
        cy = s / 2 + offs[:, 1] * 9 * k + rng.uniform(-1.5, 1.5, m) * k
        theta = rng.uniform(-0.17, 0.17, m)  # about ±10 degrees
        dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]          # (M, S, S)
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        x, y = cos * dx + sin * dy, -sin * dx + cos * dy
        alpha = np.clip(0.5 - _sdf(shape, x, y, r[:, None, None]), 0.0, 1.0)       # (M, S, S)
        rgb = np.array([COLOURS[a[f"colour{suffix}"]] for a in sub], dtype=np.float32)
        rgb = rgb + rng.uniform(-12, 12, size=(m, 3))
        img[idx] = img[idx] * (1 - alpha[:, None]) + rgb[:, :, None, None] * alpha[:, None]
    return torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def make_shapes(n: int, seed: int, cfg: ShapesConfig | None = None,
                exclude_holdout: bool = True) -> CaptionedImages:
    """n captioned images, a pure function of (n, seed, cfg).

    exclude_holdout=False renders the held-out pairs too (for the evaluator and the
    held-out test), never for generator training."""
    cfg = cfg or ShapesConfig()
    rng = np.random.default_rng(seed)
    exclude = parse_holdout(cfg.holdout) if exclude_holdout else set()
    attrs = [sample_attributes(rng, cfg, exclude) for _ in range(n)]
    full = rng.random(n) >= cfg.partial_caption_prob
    captions = [caption(a, rng, full=f) for a, f in zip(attrs, full)]
    # Negatives always name every attribute: a partial one could leave out the changed
    # attribute and so be true of the image.
    negatives = [caption(negative_attributes(a, rng, exclude), rng) for a in attrs]
    chunks = [render(attrs[i:i + 2048], cfg.image_size, rng) for i in range(0, n, 2048)]
    return CaptionedImages(torch.cat(chunks), captions, attrs, negatives)


def attribute_labels(attrs: list[dict[str, Any]]) -> torch.Tensor:
    """(N, 5) class indices in ATTRIBUTES order, for the first object of each scene."""
    return torch.tensor([[VALUES[k].index(a[k]) for k in ATTRIBUTES] for a in attrs],
                        dtype=torch.long)


def training_pairs(cfg: ShapesConfig) -> list[tuple[str, str]]:
    """The (colour, shape) pairs the generator sees in training."""
    held = parse_holdout(cfg.holdout)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
