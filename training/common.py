"""Conventions every training job shares: CLI config, checkpoints, distributed set-up, LR.

A job declares a config dataclass and a dict of presets; `parse_config` turns
`--preset small --lr=3e-4` into an instance (the preset first, then overrides), and refuses
at once, naming the option, a value outside its field's `valid` rule (`at_least(1)`, ...) or
one the config's own `check()` rejects: a bad setting must not fail deep inside torch, or
after the whole run, or not at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
import sys
import tempfile
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.tokenizer import Tokenizer

C = TypeVar("C")
Rule = tuple[Callable[[Any], bool], str]  # (is the value valid, what a valid value is)


def at_least(lo: float) -> Rule:
    return (lambda v: math.isfinite(v) and v >= lo), f"must be >= {lo} (a finite number)"


def above(lo: float) -> Rule:
    return (lambda v: math.isfinite(v) and v > lo), f"must be > {lo} (a finite number)"


def between(lo: float, hi: float) -> Rule:
    return (lambda v: lo <= v <= hi), f"must be in [{lo}, {hi}]"


SEED = between(0, 2**32 - 1)  # torch's CPU generator keeps 32 bits; larger seeds overflow its arithmetic here


def fraction() -> Rule:
    return (lambda v: 0 <= v < 1), "must be in [0, 1)"


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"must be one of {', '.join(choices)}"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if "bool" in kind:
        return _parse_bool
    if "int" in kind and "float" not in kind:
        return int
    if "float" in kind:
        return float
    return str


def parse_config(cls: type[C], presets: dict[str, dict[str, Any]], argv: list[str] | None = None,
                 default_preset: str = "small", description: str = "") -> C:
    """Build `cls` from `--preset NAME` plus `--field=value` overrides (help from field metadata;
    `--preset tiny --help` shows the tiny preset's values)."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--preset", default=default_preset)
    shown = early.parse_known_args(argv)[0].preset
    shown = shown if shown in presets else default_preset  # a bad name is refused below
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)  # --max_step is no --max_steps
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                        help=f"starting point for all settings (default {default_preset})")
    for f in dataclasses.fields(cls):
        flag = {"nargs": "?", "const": True} if _field_type(f) is _parse_bool else {}  # `--resume` alone: true
        parser.add_argument(
            f"--{f.name}", type=_field_type(f), default=None, **flag,
            help=f"{f.metadata.get('help', '')} (--preset {shown}: {presets[shown].get(f.name, f.default)!r})",
        )
    args = parser.parse_args(argv)
    values = dict(presets[args.preset])
    values.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        if (rule := f.metadata.get("valid")) and not rule[0](getattr(cfg, f.name)):
            parser.error(f"--{f.name}={getattr(cfg, f.name)!r}: {rule[1]}")
    try:
        getattr(cfg, "check", lambda: None)()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check_outputs(name: str, store: bool, out: str, family: str, out_option: str = "--out") -> None:
    """Refuse, before training, a store name or an output folder that would fail after it, and
    a store name that holds models of another family (the service would then refuse to start:
    GAN_MODEL=mygan naming a GPT)."""
    from training.store import check_name, store_folder

    if store:
        check_folder(store_folder(), "BENTOML_HOME (the model store)")
        check_name(name, family)
    check_folder(out, out_option)


def check_folder(path: str, option: str) -> None:
    """Refuse an output folder that exists as a file, that cannot be made because a file stands
    where one of its parents would be, or that cannot be written: the job would fail there
    after training."""
    if not path:
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option}={path}: exists and is not a folder")
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option}={path}: cannot be made, {ancestor} is a file")
    try:  # permissions, a read-only file system: found now, not when the trained model is saved
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as e:
        raise ValueError(f"{option}={path}: cannot be written in {ancestor} ({e.strerror})") from None


# What an image job writes into its run folder (tokenizer.json: older runs).
RUN_FILES = re.compile(r"ckpt\.pt(\.tmp)?|evaluator|model|samples_.+\.png|recon\.png|curves\.png|history\.json"
                       r"|tokenizer\.json")


def check_run_folder(path: str) -> None:
    """Refuse, for a fresh image run, a run folder holding anything but an image run's files:
    given as --out, someone's own folder got the run's files mixed in, and a history.json of
    theirs overwritten."""
    if path and Path(path).is_dir() and (other := sorted(
            p.name for p in Path(path).iterdir() if not RUN_FILES.fullmatch(p.name))):
        raise ValueError(f"--run_dir={path}: holds files that are not a training run's ({', '.join(other[:3])}): "
                         "give a new or empty folder (--out names the run folder in the image jobs)")


def check_model_given(path: str) -> None:
    """A tool's model folder argument exists. A store tag (`gan:latest`) is no folder: say how
    to find the store's folder for it (its config.json was called missing under gan:latest/)."""
    from training.store import NAME_RE

    if not Path(path).is_dir():
        name, colon, version = path.partition(":")
        tag_like = colon and NAME_RE.match(name) and version and "/" not in version
        hint = f": a store tag? give its folder, `bentoml models get {path} -o path` prints it" if tag_like else ""
        raise ValueError(f"{path}: no such model folder{hint}")


def check_model_folder(path: str, option: str = "--out") -> None:
    """Refuse a model folder that holds anything but a model's files (those are replaced): the
    job must not mix its files into, or overwrite, a folder of something else."""
    from models.artifacts import CONFIG, METRICS, TOKENIZER, WEIGHTS

    if path and Path(path).is_dir() and (other := sorted(
            p.name for p in Path(path).iterdir() if p.name not in (CONFIG, WEIGHTS, TOKENIZER, METRICS))):
        raise ValueError(f"{option}={path}: holds files that are not a model's ({', '.join(other[:3])}): "
                         "give a new or empty folder, or one holding only a model to replace")


def check_fresh_run(ckpt_path: Path, resume: bool) -> None:
    """A run that does not resume must not overwrite the checkpoint of an earlier one."""
    global _last_checkpoint, _stored
    _last_checkpoint = _stored = None  # a job starts: a Ctrl-C from here on is about its checkpoints
    if not resume and ckpt_path.is_file():
        raise ValueError(f"--run_dir={ckpt_path.parent}: holds the checkpoint of an earlier run: --resume=true "
                         "continues it; another --run_dir (or deleting the folder) starts afresh")


def require_finite(step: int, ckpt_path: Path, **modules: torch.nn.Module) -> None:
    """Never checkpoint, let alone store, weights that are no longer numbers: a step can diverge
    after its loss was computed (a too-high --lr), and the next loss would come too late."""
    for name, module in modules.items():
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise FloatingPointError(diverged(step, f"the {name} weights are not finite", ckpt_path))


def diverged(step: int, what: str, ckpt_path: Path) -> str:
    last = f"{ckpt_path} holds the last good state" if ckpt_path.is_file() else "no checkpoint was written"
    return f"step {step}: {what}; the run diverged (a lower --lr may help); nothing was saved, {last}"


def check_device(device: str) -> None:
    """Refuse --device=cuda where there is no CUDA before any work, not deep inside torch."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: no CUDA device is available here (use --device=cpu or auto)")


# What the project raises for a user's mistake: a bad --data, a --resume that cannot resume,
# a bad model directory (ArtifactError), a run that diverged. Bugs raise other types.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
PROJECT = Path(__file__).resolve().parents[1]


def _raised_by_project(e: BaseException) -> bool:
    """Whether the project's own code raised `e` (its innermost frame), not torch or another library."""
    frames = traceback.extract_tb(e.__traceback__)
    where = Path(frames[-1].filename).resolve() if frames else None
    return (where is not None and where.is_relative_to(PROJECT)
            and not where.is_relative_to(Path(sys.prefix).resolve()))


def report_resume(step: int, max_steps: int, ckpt_path: str | Path) -> None:
    """Say where a resumed run goes on from, or that its checkpoint is already at --max_steps
    (then the job saves the checkpoint's model: it was trained, and never saved)."""
    if step >= max_steps:
        print(f"{ckpt_path} is at step {step}, --max_steps={max_steps}: nothing to train, saving its model",
              file=sys.stderr)
    else:
        print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)


def check_world_size(ckpt: dict[str, Any], d: "Dist") -> None:
    """Warn when a checkpoint resumes under another number of processes than wrote it: each
    rank draws its own batches, so the batches, and the examples per step, are not an
    uninterrupted run's (train_gan says it from its saved random states)."""
    written = ckpt.get("world_size", d.world_size)  # not recorded before: no warning
    if d.is_main and written != d.world_size:
        print(f"warning: the checkpoint was written by {written} process(es), this run has {d.world_size}: "
              f"its batches, and the examples per step, differ from those of an uninterrupted run", file=sys.stderr)


def report_halt(step: int, max_steps: int, ckpt_path: str | Path) -> None:
    """Say where a `--halt_after` run stopped and how it goes on (it ended in silence, exit 0)."""
    print(f"halted at step {step} of {max_steps}; {ckpt_path} holds it: --resume=true continues",
          file=sys.stderr)


# The checkpoint the job running in this process last wrote or resumed from, (path, step), and
# the model it put into the store: what a Ctrl-C reports. Each job's check_fresh_run forgets
# those of the job before (make serve runs two).
_last_checkpoint: tuple[Path, int] | None = None
_stored: str | None = None


def note_stored(tag: str) -> None:
    """The job's model is in the store as `tag` (training.store.save_to_store says it)."""
    global _stored
    _stored = tag


def resumable() -> str:
    """What an interrupted training job can do next (its `run_cli` on_interrupt). Said by rank 0
    alone under torchrun: the others neither write checkpoints nor know the newest."""
    if int(os.environ.get("RANK", "0")) != 0:
        return ""
    if _stored is not None:  # a Ctrl-C held until the copy into the store was done
        return f"{_stored} is in the model store: the model is saved (the run folder's last reports may be missing)"
    if _last_checkpoint is None:
        return "before this run wrote or read a checkpoint: run the same command again"
    path, step = _last_checkpoint
    return f"{path} holds step {step}: --resume=true continues from it"


def run_cli(main: Callable[[], Any], on_interrupt: str | Callable[[], str] = "") -> None:
    """Run a job's `main()` as a command: a user error ends it as argparse does, one line on stderr
    and exit status 2, with no traceback to read past. The same types raised inside a library,
    and every other exception, keep their traceback: they are bugs. A Ctrl-C ends it with status
    130 and `on_interrupt`, what the user can do next (`resumable` for a training job), on a
    line of its own (as the error's: an open progress bar is closed first, the line was the bar's)."""
    try:
        main()
    except USER_ERRORS as e:
        if not _raised_by_project(e):
            raise
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole, so the last one stands
        close_progress_bars()
        hint = on_interrupt() if callable(on_interrupt) else on_interrupt
        print(f"interrupted{': ' + hint if hint else ''}", file=sys.stderr)
        sys.exit(130)


def close_progress_bars() -> None:
    """End every open tqdm bar's line, so that what is printed next has a line of its own."""
    for bar in list(tqdm._instances):  # tqdm's own registry of open bars
        bar.close()


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file, fsync, then rename: a checkpoint is never half-written."""
    global _last_checkpoint
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: no half-written file left beside the checkpoint
        tmp.unlink(missing_ok=True)
        raise
    if isinstance(obj, dict) and "step" in obj:  # a training checkpoint
        _last_checkpoint = (path, obj["step"])


def load_checkpoint(path: str | Path, config: dict[str, Any] | None = None, shape_keys: tuple[str, ...] = (),
                    job: str | None = None) -> dict[str, Any]:
    """Training checkpoints hold tensors, numbers and strings only: no unpickling of code.

    `--resume` without a checkpoint, an unreadable one, or one whose `shape_keys` settings differ
    from this run's `config`, is a ValueError naming the file and the setting."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path} (check --run_dir, or drop --resume to start afresh)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # (torch's own message for a file that is no checkpoint advises unpickling it as code; one
        # cut short, as by a full disk, says only "OSError: [Errno 22] Invalid argument")
        why = "corrupt, cut short, or another kind of file"
        if not isinstance(e, pickle.UnpicklingError):
            why += f": {type(e).__name__}: {e}"
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({why})") from None
    if job and isinstance(ckpt, dict) and ckpt.get("job", job) != job:  # (older checkpoints name none)
        raise ValueError(f"--resume: {path} is a checkpoint of the {ckpt['job']} job, not of {job} "
                         "(check --run_dir)")
    saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    for key in shape_keys:
        if config is not None and key in saved and saved[key] != config[key]:
            raise ValueError(f"--resume: {path} was trained with {key}={saved[key]!r}, this run asks for "
                             f"{key}={config[key]!r}")
    return ckpt


def get_tokenizer(texts: list[str], vocab_size: int, run_dir: str, d: Dist, ckpt: dict | None) -> Tokenizer:
    """The checkpoint's tokenizer when resuming (never another run's tokenizer.json left in the
    folder); else one trained on `texts` by rank 0 and sent to the others. Nothing is written
    here: a run refused after this step (a too short --context) left a tokenizer.json behind."""
    if ckpt is not None:
        if "tokenizer" in ckpt:
            return Tokenizer.from_str(ckpt["tokenizer"])
        return Tokenizer.load(Path(run_dir) / "tokenizer.json")  # an older checkpoint
    text = [Tokenizer.train(texts, vocab_size).to_str() if d.is_main else None]
    if d.world_size > 1:
        dist.broadcast_object_list(text, src=0)
    return Tokenizer.from_str(text[0])


def check_resume_data(ckpt: dict, path: Path, config: dict, dataset_hash: str, keys: tuple[str, ...],
                      other_cause: str = "") -> None:
    """A resumed run trains on its checkpoint's data: the checkpoint's tokenizer was fitted to that
    data, and the saved model's `dataset` label names one dataset. The checkpoint's hash decides
    (the same files under another spelling of the path are the same data); for a checkpoint
    without one, the `keys` settings that chose its data. `other_cause`: what else than the
    files may have changed the hash of the same --data."""
    saved = ckpt.get("config", {})
    advice = "resume with the same data, or start a new --run_dir"
    if "dataset" in ckpt:
        if ckpt["dataset"] != dataset_hash:  # say what changed: the same --data twice told nothing
            changed = [f"--{k}={saved[k]!r} then, {config[k]!r} now" for k in keys
                       if k != "data" and k in saved and saved[k] != config[k]]
            why = ("; " + ", ".join(changed) if changed else
                   "; the files changed since" + (f", or {other_cause}" if other_cause else "")
                   if saved.get("data") == config["data"] else "")
            raise ValueError(f"--resume: {path} was trained on dataset {ckpt['dataset']} "
                             f"(--data={saved.get('data')!r}), this run's is dataset {dataset_hash} "
                             f"(--data={config['data']!r}){why}: {advice}")
        return
    for key in keys:
        if key in saved and saved[key] != config[key]:
            raise ValueError(f"--resume: {path} was trained with {key}={saved[key]!r}, this run asks for "
                             f"{key}={config[key]!r}: {advice}")


def restore(ckpt: dict[str, Any], path: str | Path, **parts: Any) -> tuple[int, Any]:
    """Load each part (a module or optimizer) from ckpt[name]; return (step, history). A
    checkpoint of another job, or with other shapes, is a ValueError naming the file."""
    global _last_checkpoint
    try:
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])
        _last_checkpoint = (Path(path), ckpt["step"])
        return ckpt["step"], ckpt["history"]
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a checkpoint of this job and settings "
                         f"({type(e).__name__}: {e})") from None


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `min_ratio * base_lr` at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) run."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join a torchrun group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if want_cuda else "cpu"))


def teardown_distributed() -> None:
    """Leave the group together: rank 0 may still be evaluating and saving while the others
    are done, and a rank that destroys its gloo group and exits meanwhile could abort at exit
    ("terminate called without an active exception", about 1 run in 8 of the tiny DDP test)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; on CPU plain float32 (nullcontext), as nanoGPT does."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def all_reduce_mean(value: float, d: Dist) -> float:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return (t / d.world_size).item()
