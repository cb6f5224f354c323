"""Image generation and PNG encoding in a worker process of their own.

The same reason as the text engine's process (models/engine_process.py): in the server's
process, the forward pass and the PNG encoding would share the GIL with the event loop that
parses and answers HTTP requests, and each would stall the other. A one-process
`ProcessPoolExecutor` (standard library) holds the engine, loaded once by its first task;
a batch of requests goes in, PNG bytes come out.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

from models.image_engine import ImageRequest

_engine = None  # the worker process's engine, set by `load`


def start() -> None:
    """Initializer of the worker process."""
    # The server shuts the pool down: a SIGTERM or Ctrl-C sent to the server's process tree
    # must not cut off the batches it is finishing during a graceful shutdown. A pool worker
    # does not notice its server dying, so it watches for that itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def load(engine_class: type, model_dir: str, device: str, threads: int) -> None:
    """The worker's first task: load the engine and warm it up (its errors, an ArtifactError
    naming a bad file say, come back to the server through the task's future)."""
    global _engine
    if threads > 0:
        torch.set_num_threads(threads)
    _engine = engine_class.load(model_dir, device=device)
    _engine.generate([ImageRequest(prompt="warm-up", seed=0, n=1)])


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def generate_pngs(requests: list[ImageRequest], parameters: list[list[dict[str, Any]]]) -> list[list[bytes]]:
    """One forward pass (or decode loop) for the batch; image i of request r is encoded with
    parameters[r][i] in its tEXt chunk."""
    from service.encode import encode_png

    arrays = _engine.generate(requests)
    return [[encode_png(img, params) for img, params in zip(images, request_params, strict=True)]
            for images, request_params in zip(arrays, parameters, strict=True)]
