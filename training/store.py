"""The one place in training/ that touches BentoML: copying a model directory into the store.

As a command, it puts a model folder made elsewhere into the store, to be served: a job's
`--out` or `run_dir/model` (trained with `--store=false`, or on another machine), or a
Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json), imported with
`models.gpt.from_hf_gpt2`:
    python -m training.store DIR [--name NAME]
The folder is loaded first, as the service will load it, so a broken one is refused here.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.common import note_stored

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")  # BentoML's: ends as it starts
STORED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what every family's loader needs


def store_folder() -> str:
    """The model store's folder, as BentoML finds it."""
    return os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")


def save_to_store(name: str, model_dir: str | Path, labels: dict[str, str],
                  metadata: dict[str, Any] | None = None) -> str:
    """Create `name:<version>` in the BentoML model store from a saved model directory."""
    import bentoml  # imported here so the rest of training/ runs with torch alone

    check_name(name, labels.get("family"))
    # Leaving `create`, BentoML copies the files into the store's folder for the new version
    # and cleans up after an Exception only: a Ctrl-C there left a half-written version, which
    # `name:latest` could then name. So the copy, and all that follows it, is let finish first.
    with interrupts_held():
        with bentoml.models.create(name, labels=labels, metadata=metadata or {}) as model:
            for f in Path(model_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, Path(model.path) / f.name)
        tag = str(model.tag)
        # BentoML copies its temporary folder's 0700 into the store, and a file's own mode (0600
        # for weights saved by safetensors' save_file): a server running as another user could not
        # read the version. It gets the permissions of the folder holding it, its files the same less x.
        stored = Path(bentoml.models.get(tag).path)
        mode = stored.parent.stat().st_mode & 0o777
        stored.chmod(mode)
        for f in stored.iterdir():
            f.chmod(mode & 0o666)
        del model  # BentoML removes its temporary folder when the model object goes: here, held
        note_stored(tag)
    return tag


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver the first one received
    (signal handlers can only be set from the main thread; elsewhere the block runs as is). A
    signal the process ignores (SIGINT in a job started in the background, or under nohup) is
    left ignored: held, it was taken and then delivered to its restored SIG_IGN, which said
    "interrupted" and then went on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if not received:
            print("interrupted: stopping once the model is in the store", file=sys.stderr)
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) not in (signal.SIG_IGN, None)}  # None: a handler set from C, left to it
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def store_has(tag: str) -> bool:
    """Whether the store holds `tag` (a bare name: its latest version) whole; ValueError for a
    string that is no tag at all ("Bad Tag!", "gpt:"), and for a version the store holds in part:
    a copy into the store that was killed (SIGKILL, a power cut) leaves one, which the service
    would refuse only when it starts, after `make serve` had taken it for present."""
    stored = _stored(tag)
    if stored is None:
        return False
    missing = [f for f in STORED_FILES if not (Path(stored.path) / f).is_file()]
    if missing:
        raise ValueError(f"{stored.tag} in the model store lacks {', '.join(missing)} (a copy into the store cut "
                         f"short?): delete it with `bentoml models delete {stored.tag}`")
    return True


def _stored(tag: str) -> Any:
    """The store's bentoml Model for `tag` (a bare name: its latest version), or None; ValueError
    for no tag, or for a version BentoML cannot read (its model.yaml missing: `bentoml models
    list` fails on it too)."""
    import bentoml

    full = tag if ":" in tag else f"{tag}:latest"
    check_tag(full)
    try:
        return bentoml.models.get(full)
    except bentoml.exceptions.NotFound:
        return None
    except bentoml.exceptions.BentoMLException as e:
        raise ValueError(f"the model store cannot read {full} ({e}): a copy into the store cut short? remove "
                         f"that version's folder from {Path(store_folder()) / 'models' / full.split(':')[0]}") from None


def check_tag(tag: str) -> None:
    """ValueError for a string that is no model tag ("Bad Tag!", "gpt:")."""
    import bentoml

    try:
        bentoml.Tag.from_taglike(tag)
    except (ValueError, bentoml.exceptions.BentoMLException) as e:  # BentoML's "Invalid Tag ..."
        raise ValueError(f"{tag!r} is not a model tag (name or name:version): {e}") from None


def check_name(name: str, family: str | None) -> None:
    """Refuse a store name BentoML would refuse, or one that holds another family's models
    (the service would then refuse to start: GAN_MODEL=mygan naming a GPT)."""
    if not NAME_RE.match(name):
        raise ValueError(f"--name={name!r}: use lowercase letters, digits, '_', '-', '.', starting and ending "
                         f"with a letter or digit, at most 63 characters (a store name)")
    if family is not None and (held := store_family(name)) not in (None, family):
        raise ValueError(f"--name={name}: the store's {name} holds {held!r} models; give this {family!r} model "
                         "another name")


def store_family(tag: str) -> str | None:
    """The family label ("gpt", "gan", "ar_image") of the store's `tag` (a bare name: its latest
    version); None when the store has none, or when BentoML is not installed (a GPU machine
    that trains into --out)."""
    try:
        import bentoml  # noqa: F401
    except ImportError:
        return None
    stored = _stored(tag)
    return None if stored is None else stored.info.labels.get("family")


def loader(family: str) -> Any:
    """The `load(model_dir)` of the engine that serves a family, as the service loads it."""
    from models.ar_image import ARImageEngine
    from models.engine import TextEngine
    from models.image_engine import ImageEngine

    engines = {"gpt": TextEngine, "gan": ImageEngine, "ar_image": ARImageEngine}
    if family not in engines:
        raise ValueError(f"family {family!r} is not served here (gpt, gan or ar_image)")
    return engines[family].load


def import_hf_gpt2(folder: Path, out: Path) -> None:
    """Write a Hugging Face GPT-2 folder into `out` as a model folder of ours: its weights
    through `from_hf_gpt2` (which refuses what this GPT does not compute), its tokenizer.json."""
    from models.artifacts import save_model_dir
    from models.gpt import from_hf_gpt2

    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: a Hugging Face GPT-2 folder without tokenizer.json; transformers writes one: "
                         f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    model = from_hf_gpt2(folder)
    save_model_dir(out, model.config.to_dict(), model.state_dict())
    shutil.copy2(folder / "tokenizer.json", out / "tokenizer.json")  # checked with the rest by the load that follows


def main(argv: list[str] | None = None) -> str:
    from models.artifacts import read_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a model folder (config.json, model.safetensors, tokenizer.json), ours or a "
                                      "Hugging Face GPT-2 one")
    ap.add_argument("--name", help="store name (default: the family's, which the service serves by default)")
    args = ap.parse_args(argv)
    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (not a model folder)")
    if read_json(folder / "config.json").get("model_type") == "gpt2":  # straight from Hugging Face
        check_name(args.name or "gpt", "gpt")  # before the import, which may take a while
        Path(store_folder()).mkdir(parents=True, exist_ok=True)
        # Beside the store, where the model is going (a large checkpoint may not fit in /tmp)
        with tempfile.TemporaryDirectory(dir=store_folder(), prefix=".import-") as imported:
            import_hf_gpt2(folder, Path(imported))
            try:
                return store_folder_as(Path(imported), args.name)
            except ValueError as e:  # named after the user's folder: the files came from there
                raise ValueError(str(e).replace(imported, str(folder))) from None
    return store_folder_as(folder, args.name)


def store_folder_as(folder: Path, name: str | None) -> str:
    """Load the model folder as the service will, then copy it into the store as `name` (default:
    its family's name); the stored tag."""
    from models.artifacts import read_json

    family = read_json(folder / "config.json").get("family")
    load = loader(family)
    name = name or family
    check_name(name, family)
    load(folder, device="cpu")  # raises ArtifactError (a ValueError), naming the bad file
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    dataset = metrics.get("dataset_hash") or metrics.get("dataset")  # the GPT's job / the image jobs'
    tag = save_to_store(name, folder, labels={"family": family, "dataset": str(dataset or "unknown")})
    print(tag)
    return tag


if __name__ == "__main__":
    from training.common import run_cli

    run_cli(main)
