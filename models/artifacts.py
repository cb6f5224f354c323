"""Model directories: config.json + model.safetensors (+ tokenizer.json) + metrics.json.

Loading never unpickles (safetensors and JSON only), checks every tensor's shape
against the model the config describes, and names the bad file when it fails.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.tokenizer import Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.json"


class ArtifactError(ValueError):
    """A model directory is missing a file or holds a bad one; the message names the file."""


@dataclass
class Artifact:
    model: nn.Module
    config: dict[str, Any]
    tokenizer: Tokenizer | None
    metrics: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model_dir(
    path: str | Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory; every file is written to a temp name and renamed into place."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage (tied embeddings): save contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(path / WEIGHTS, lambda p: save_file(tensors, str(p)))
    _atomic_write(path / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    _atomic_write(path / METRICS, lambda p: p.write_text(json.dumps(metrics or {}, indent=2)))
    if tokenizer is not None:
        _atomic_write(path / TOKENIZER, tokenizer.save)
    return path


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: file is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def load_weights_into(model: nn.Module, weights_path: Path) -> None:
    """Copy a safetensors file into `model`, insisting on the same keys and shapes."""
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path}: file is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights_path}: not a readable safetensors file ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{weights_path}: tensors do not match the config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, want in expected.items():
        if tensors[name].shape != want.shape:
            raise ArtifactError(
                f"{weights_path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"the config implies {tuple(want.shape)}"
            )
    model.load_state_dict(tensors, strict=True)


def read_config(path: str | Path, family: str) -> dict[str, Any]:
    """A model directory's config.json, which must describe a model of `family`."""
    config_path = Path(path) / CONFIG
    config = read_json(config_path)
    if config.get("family") != family:
        raise ArtifactError(f"{config_path}: family is {config.get('family')!r}, expected {family!r}")
    return config


def load_tokenizer(path: str | Path, config: dict[str, Any]) -> Tokenizer:
    """A model directory's tokenizer.json, which must fit the config's `vocab_size`."""
    tok_path = Path(path) / TOKENIZER
    if not tok_path.is_file():
        raise ArtifactError(f"{tok_path}: file is missing")
    try:
        tokenizer = Tokenizer.load(tok_path)
    except Exception as e:  # the tokenizers library raises plain Exception on bad JSON
        raise ArtifactError(f"{tok_path}: not a readable tokenizer ({e})") from e
    if tokenizer.vocab_size > config.get("vocab_size", tokenizer.vocab_size):
        raise ArtifactError(f"{tok_path}: {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size {config['vocab_size']}")
    return tokenizer


def build_from_config(path: str | Path, build: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """`build(config)`, with an error that names the model directory's config.json.

    Any failure counts: bad values surface from deep inside torch as RuntimeError (a negative
    width, a size it cannot allocate), ZeroDivisionError (no heads), AssertionError, ..."""
    try:
        return build(config)
    except Exception as e:
        raise ArtifactError(f"{Path(path) / CONFIG}: does not describe a valid model "
                            f"({type(e).__name__}: {e})") from e


def load_model_dir(
    path: str | Path,
    build: Callable[[dict[str, Any]], nn.Module],
    family: str,
    needs_tokenizer: bool = True,
) -> Artifact:
    """Read a model directory of the given family. `build(config)` makes the (randomly
    initialised) network; the tokenizer must fit the config's `vocab_size`."""
    path = Path(path)
    config = read_config(path, family)
    model = build_from_config(path, build, config)
    load_weights_into(model, path / WEIGHTS)
    tokenizer = load_tokenizer(path, config) if needs_tokenizer else None
    metrics = read_json(path / METRICS) if (path / METRICS).is_file() else {}
    model.eval()
    return Artifact(model=model, config=config, tokenizer=tokenizer, metrics=metrics)
