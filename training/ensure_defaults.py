"""Train the small default models into the BentoML store, but only those it lacks.

`make serve` runs this first, so a fresh machine goes from clone to serving in one command.
    python -m training.ensure_defaults [--force]
"""
from __future__ import annotations

import argparse
import sys

from training.store import store_has

# store name -> (training module, its argv for the default model)
DEFAULTS = {
    "gpt": ("training.train_gpt", ["--preset", "small", "--run_dir=runs/gpt-small"]),
    "gan": ("training.train_gan", ["--preset", "small", "--run_dir=runs/gan-small"]),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="train again even if the store has the model")
    args = ap.parse_args(argv)
    for name, (module, job_argv) in DEFAULTS.items():
        if store_has(name) and not args.force:
            print(f"{name}: found {name}:latest in the store, not training", file=sys.stderr)
            continue
        print(f"{name}: not in the store, training the small default ({module} {' '.join(job_argv)})",
              file=sys.stderr)
        __import__(module, fromlist=["main"]).main(job_argv)


if __name__ == "__main__":
    main()
