"""The one place in training/ that touches BentoML: copying a model directory into the store."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def save_to_store(name: str, model_dir: str | Path, labels: dict[str, str],
                  metadata: dict[str, Any] | None = None) -> str:
    """Create `name:<version>` in the BentoML model store from a saved model directory."""
    import bentoml  # imported here so the rest of training/ runs with torch alone

    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use lowercase letters, digits, '_', '-', '.'")
    with bentoml.models.create(name, labels=labels, metadata=metadata or {}) as model:
        for f in Path(model_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, Path(model.path) / f.name)
    return str(model.tag)


def store_has(tag: str) -> bool:
    """Whether the store holds `tag` (a bare name: any version of it)."""
    import bentoml

    try:
        bentoml.models.get(tag if ":" in tag else f"{tag}:latest")
        return True
    except bentoml.exceptions.NotFound:
        return False


def store_family(name: str) -> str | None:
    """The family label ("gpt", "gan", "ar_image") of the store's latest `name`; None when the
    store has none, or when BentoML is not installed (a GPU machine that trains into --out)."""
    try:
        import bentoml
    except ImportError:
        return None
    try:
        return bentoml.models.get(f"{name}:latest").info.labels.get("family")
    except bentoml.exceptions.NotFound:
        return None
