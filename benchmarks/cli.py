"""Argument types of the benchmark and load-test scripts: a count of zero, a device the machine
lacks or a missing model folder is one line from argparse, not a traceback at the end of a
model's set-up (nor a negative figure: `--batch -1` printed -127,860 images/s)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "whole number"  # what argparse calls a value it cannot read
    return parse


def not_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, got {text}")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, of this machine."""
    from models.engine import resolve_device  # torch, only where a script takes a device

    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_dir(text: str) -> str:
    """A saved model's folder; empty: random weights."""
    if text and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder (a saved model's folder, e.g. `bentoml models "
                                         "get gpt:latest -o path`)")
    return text
