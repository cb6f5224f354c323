"""Model directories: config.json + model.safetensors (+ tokenizer.json) + metrics.json.

Loading never unpickles (safetensors and JSON only), checks every tensor's shape
against the model the config describes (from the file's header, before the real network is
built: a config that describes a huge model must not allocate it), and names the bad file
when it fails.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from models.errors import is_int
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
    # Written by Python, whose files take the umask's permissions as the others do: safetensors'
    # save_file makes them 0600, which a server running as another user cannot read.
    _atomic_write(path / WEIGHTS, lambda p: p.write_bytes(save(tensors)))
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


def positive_ints(config: dict[str, Any], names: Iterable[str]) -> None:
    """ValueError naming the first of `names` that is missing or not an integer >= 1: a missing
    size must not fall back to a default (head counts do not show in the weights' shapes)."""
    for name in names:
        value = config.get(name)
        if name not in config:
            raise ValueError(f"{name} is missing")
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def read_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header (the tensors are not read)."""
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path}: file is missing")
    try:
        with safe_open(str(weights_path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights_path}: not a readable safetensors file ({e})") from e


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], weights_path: Path) -> None:
    """The file must hold exactly the tensors the config implies, each of the implied shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{weights_path}: tensors do not match the config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, want in expected.items():
        if found[name] != want:
            raise ArtifactError(f"{weights_path}: tensor {name} has shape {found[name]}, the config implies {want}")


def load_weights_into(model: nn.Module, weights_path: Path) -> None:
    """Copy a safetensors file, whose header `check_shapes` has accepted, into `model`. Every
    value must be finite (training never saves others), and the names of one tied tensor (the
    GPT's lm_head and token embedding) must hold the same values: the last copied would win."""
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights_path}: not a readable safetensors file ({e})") from e
    for name, t in tensors.items():
        if t.is_floating_point() and (bad := int((~torch.isfinite(t)).sum())):
            raise ArtifactError(f"{weights_path}: {name} holds {bad} value{'s' * (bad > 1)} that "
                                f"{'are' if bad > 1 else 'is'} not finite (NaN or infinite)")
    first_name: dict[int, str] = {}  # a tied parameter's storage -> the first name it goes by
    for name, p in model.state_dict(keep_vars=True).items():
        other = first_name.setdefault(id(p), name)
        if other != name and not torch.equal(tensors[name], tensors[other]):
            raise ArtifactError(f"{weights_path}: {name} and {other} are one tensor in the model, and differ "
                                f"in the file")
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
    try:
        positive_ints(config, ["vocab_size"])
    except ValueError as e:
        raise ArtifactError(f"{Path(path) / CONFIG}: {e}") from None
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ArtifactError(f"{tok_path}: {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size {config['vocab_size']}")
    return tokenizer


def build_from_config(path: str | Path, build: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """`build(config)`, with an error that names the model directory's config.json.

    Any failure counts: bad values surface from deep inside torch as RuntimeError (a negative
    width, a size it cannot allocate), ZeroDivisionError (no heads), AssertionError, ..."""
    try:
        return build(config)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{Path(path) / CONFIG}: does not describe a valid model "
                            f"({type(e).__name__}: {e})") from e


def expected_shapes(path: Path, build: Callable[[dict[str, Any]], nn.Module], config: dict[str, Any],
                    n_tensors: int) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes `build(config)` would have, from a build on the meta device (no memory
    for tensors). The build stops once it has registered far more tensors than the file holds:
    even meta modules cost time and memory, and a config may ask for 10**12 layers."""
    limit, made, thread = 4 * n_tensors + 64, 0, threading.get_ident()

    def count(*_: Any) -> None:
        nonlocal made
        made += threading.get_ident() == thread
        if made > limit:
            raise ArtifactError(f"{path / WEIGHTS}: holds {n_tensors} tensors, far fewer than {path / CONFIG} "
                                f"implies (past {limit} while building the model it describes)")

    hooks = [nn.modules.module.register_module_parameter_registration_hook(count),
             nn.modules.module.register_module_buffer_registration_hook(count)]
    try:
        with torch.device("meta"):
            model = build_from_config(path, build, config)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_model_dir(
    path: str | Path,
    build: Callable[[dict[str, Any]], nn.Module],
    family: str,
    needs_tokenizer: bool = True,
) -> Artifact:
    """Read a model directory of the given family. `build(config)` makes the (randomly
    initialised) network, once the weights file's header agrees with the config; the tokenizer
    must fit the config's `vocab_size`."""
    path = Path(path)
    config = read_config(path, family)
    found = read_shapes(path / WEIGHTS)
    check_shapes(expected_shapes(path, build, config, len(found)), found, path / WEIGHTS)
    model = build_from_config(path, build, config)
    load_weights_into(model, path / WEIGHTS)
    tokenizer = load_tokenizer(path, config) if needs_tokenizer else None
    metrics = read_json(path / METRICS) if (path / METRICS).is_file() else {}
    model.eval()
    return Artifact(model=model, config=config, tokenizer=tokenizer, metrics=metrics)
