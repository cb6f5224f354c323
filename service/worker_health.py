"""Health across a server's worker processes (CONDGEN_WORKERS > 1).

Each worker answers /readyz and /livez, and a probe reaches whichever worker the kernel hands
its connection: with one worker's engine down, a replica answered 200 and 503 in turn, so a
probe that needs three failures in a row kept a replica that failed half its requests in
rotation. So each worker writes its own state to a file in the folder the server's workers
share (BentoML's PROMETHEUS_MULTIPROC_DIR, emptied at every server start), and answers for
every worker that is still running: ready when all are, alive when all are.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from service.metrics import process_exists

STATE_FILE = re.compile(r"condgen_health_(\d+)\.json")
logger = logging.getLogger("condgen.service")


class WorkerHealth:
    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder and os.path.isdir(folder) else None
        self.path = self.folder / f"condgen_health_{os.getpid()}.json" if self.folder else None  # this worker's
        self._published: tuple[bool, bool] | None = None

    def publish(self, ready: bool, alive: bool) -> None:
        """This worker's state, for the others' answers (written when it changes)."""
        if self.path is None or self._published == (ready, alive):
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"ready": ready, "alive": alive}))
            os.replace(tmp, self.path)  # whole, for a reader
        except OSError as e:  # (a full disk): tried again at the next change or call
            logger.warning("could not write this worker's health for the others: %s", e)
            return
        self._published = (ready, alive)

    def others(self) -> list[dict[str, bool]]:
        """The states of the server's other workers that are running."""
        if self.folder is None:
            return []
        try:
            names = os.listdir(self.folder)
        except OSError:  # the folder gone (the server stopping): no other worker to answer for
            return []
        states = []
        for name in names:
            match = STATE_FILE.fullmatch(name)
            if not match or int(match.group(1)) == os.getpid():
                continue
            if not process_exists(int(match.group(1))):  # a worker killed: gone, before its pid is reused
                (self.folder / name).unlink(missing_ok=True)
                continue
            try:
                states.append(json.loads((self.folder / name).read_text()))
            except (OSError, ValueError):  # its worker gone meanwhile
                continue
        return states

    def withdraw(self) -> None:
        """This worker stops: its state no longer counts."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
