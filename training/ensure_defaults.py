"""Train the small default models into the BentoML store, but only those it lacks.

`make serve` runs this first, so a fresh machine goes from clone to serving in one command.
    python -m training.ensure_defaults
To train a default again, run its job (README, Training your own models): it becomes `name:latest`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.common import check_folder, run_cli
from training.store import check_tag, store_family, store_folder, store_has

# store name -> (the service's variable naming the model, training module, its run folder)
DEFAULTS = {
    "gpt": ("GPT_MODEL", "training.train_gpt", "runs/gpt-small"),
    "gan": ("GAN_MODEL", "training.train_gan", "runs/gan-small"),
}


def configured_tag(env_var: str, name: str) -> str | None:
    """The tag the service will load, as it reads it (unset: `name:latest`; a bare name is its
    latest version); None when the variable is empty, which turns that model off."""
    tag = os.environ.get(env_var, f"{name}:latest")
    if not tag:
        return None
    return tag if ":" in tag else f"{tag}:latest"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    home = store_folder()
    check_folder(home, "BENTOML_HOME (the model store)")
    for name, (env_var, _, _) in DEFAULTS.items():  # before minutes of training the others
        tag = configured_tag(env_var, name)
        if tag in (None, f"{name}:latest"):
            continue
        try:
            check_tag(tag)
        except ValueError:  # the value as the user typed it (the check above added ":latest")
            raise ValueError(f"{env_var}={os.environ[env_var]!r} is not a model tag (name or name:version)") from None
        if not store_has(tag):
            raise ValueError(f"{env_var}={tag} is not in the model store at {home}: train it there "
                             f"(BENTOML_HOME={home}), unset {env_var} to serve the small default, or set it "
                             "empty to serve without it")
        if (family := store_family(tag)) not in (None, name):  # the service would refuse it at start
            raise ValueError(f"{env_var}={tag} is a {family!r} model, not a {name!r} one")
    for name, (env_var, module, run_dir) in DEFAULTS.items():
        tag = configured_tag(env_var, name)
        if tag is None:
            print(f"{name}: {env_var} is empty, so the service will not serve one: not training it", file=sys.stderr)
            continue
        if tag != f"{name}:latest":  # the user's own model
            print(f"{name}: using the configured {env_var}={tag}, not training the default", file=sys.stderr)
            continue
        if store_has(name):
            print(f"{name}: found {name}:latest in the store, not training", file=sys.stderr)
            continue
        job_argv = ["--preset", "small", f"--run_dir={run_dir}"]
        if (Path(run_dir) / "ckpt.pt").is_file():  # an earlier start stopped half-way: go on
            job_argv.append("--resume=true")
        print(f"{name}: not in the store, training the small default ({module} {' '.join(job_argv)})",
              file=sys.stderr)
        __import__(module, fromlist=["main"]).main(job_argv)


if __name__ == "__main__":
    run_cli(main, on_interrupt="run it again (make serve does) to go on from the last checkpoint")
