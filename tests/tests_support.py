"""Small helpers shared by the tests (not a test module)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil


async def wait_until_idle(engine, timeout_s: float = 2.0) -> tuple[int, int]:
    """Poll a streaming engine's stats() until nothing runs or waits (or time runs out); return them."""
    for _ in range(int(timeout_s / 0.01)):
        if engine.stats() == (0, 0):
            break
        await asyncio.sleep(0.01)
    return engine.stats()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """`wait_for` inside an event loop: poll without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose name matches and whose labels contain `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample = head.split("{")[0]
        if sample != name or (labels and labels not in head):
            continue
        total += float(value)
    return total


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextlib.contextmanager
def engines_paused(server_pid: int) -> Iterator[None]:
    """A running server's engine processes stopped (SIGSTOP): what reaches them waits, certainly,
    until the block ends."""
    engines = [p for p in psutil.Process(server_pid).children(recursive=True)
               if "multiprocessing.spawn" in " ".join(p.cmdline())]
    assert engines
    for p in engines:
        p.suspend()
    try:
        yield
    finally:
        for p in engines:
            p.resume()


class NoiseImageEngine:
    """An image engine for service.image_worker tests: incompressible 128×128 images, so a
    batch's PNGs outgrow a pipe's buffer; the prompt "fail" fails the batch, and the prompt
    "count" makes images whose first pixel is the number of images in their forward pass, and
    "slow" takes 1.5 s; the model folder "missing" fails to load, "hang" never loads."""

    @classmethod
    def load(cls, model_dir: str, device: str = "cpu") -> "NoiseImageEngine":
        if model_dir == "missing":
            from models.artifacts import ArtifactError
            raise ArtifactError("missing/model.safetensors: no such file")
        if model_dir == "hang":  # a load that never returns (a stuck mount)
            import time
            time.sleep(3600)
        return cls()

    def generate(self, requests: list) -> list[list]:
        import numpy as np
        if any(r.prompt == "fail" for r in requests):
            raise ValueError("this batch fails")
        if any(r.prompt == "slow" for r in requests):
            time.sleep(1.5)
        rng = np.random.default_rng(0)
        out = [[rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(r.n)] for r in requests]
        for r, images in zip(requests, out):
            if r.prompt == "count":
                for image in images:
                    image[0, 0] = sum(q.n for q in requests)
        return out


def deny_reading(monkeypatch, file_name: str) -> None:
    """Make Path.read_text raise PermissionError for files named `file_name`, as for a file this
    user may not read (chmod does not stop root, who runs CI here)."""
    real_read = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == file_name:
            raise PermissionError(13, "Permission denied")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)


def record_checkpoints(monkeypatch, job, stop_after: int | None = None) -> list[int]:
    """The steps a training job module checkpoints at (its `atomic_save`, recorded as it
    writes), raising KeyboardInterrupt (a Ctrl-C) right after the checkpoint of step `stop_after`."""
    saved, save = [], job.atomic_save

    def save_and_record(state, path):
        save(state, path)
        saved.append(state["step"])
        if state["step"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "atomic_save", save_and_record)
    return saved
