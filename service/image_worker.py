"""Image generation and PNG encoding in a worker process of their own.

The same reason as the text engine's process (models/engine_process.py): in the server's
process, the forward pass and the PNG encoding would share the GIL with the event loop that
parses and answers HTTP requests, and each would stall the other. The event loop talks to
the worker over one pipe: a batch of requests goes in as one message, its PNGs come back as
one, read when the pipe becomes readable (`loop.add_reader`). A `ProcessPoolExecutor` does
the same with two helper threads in the server (a manager and a queue feeder) and four
thread hand-offs per batch: measured here, 123 µs of the server's CPU and a 163 µs round
trip per batch, against 32 µs and 54 µs over the bare pipe.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from models.image_engine import ImageRequest, generate_in_passes

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """The worker process is gone (killed, out of memory); the service answers 503. `exitcode`:
    the process's, when it exited while starting (negative: killed by that signal)."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode


class WorkerError(RuntimeError):
    """An error raised in the worker, as "Type: message": errors cross the pipe as text, since
    an arbitrary exception object may not survive pickling."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop
        return None


class ImageWorker:
    """One image engine in a child process, loaded at start-up, one batch at a time."""

    def __init__(self, engine_class: type, model_dir: str, device: str, threads: int, max_images: int):
        """max_images: the most images in one forward pass (a batch, or a request, asking for more
        runs in several)."""
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and locks
        self._conn, child_conn = ctx.Pipe()
        # The watchdog's own pipe for probes: the batches' pipe is read on the event loop, which
        # an idle worker may not have met yet.
        self._probes, child_probes = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main,
                                 args=(child_conn, child_probes, engine_class, model_dir, device, threads, max_images),
                                 name="condgen-image-worker", daemon=True)
        self._proc.start()
        child_conn.close()
        child_probes.close()
        # Before multiprocessing's own exit handler, which would wait forever on a child that
        # ignores SIGTERM and waits on a pipe this process still holds (as EngineProcess does).
        atexit.register(self.shutdown)
        self._pending: dict[int, asyncio.Future] = {}
        self._sent = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: str | None = None
        self._stopped_because: str | None = None  # why `stop_stuck` killed the child
        self._progress_at = time.monotonic()  # the latest reply, or the first batch sent to an idle worker
        self._probed_at: float | None = None  # a probe of the idle worker not answered yet (`probe`)

    def wait_started(self, timeout_s: float = 300.0) -> None:
        """Block until the engine is loaded and warmed up; a WorkerError carries the child's
        error if it failed ("ArtifactError: <the bad file>: ...", say). A worker not ready
        within timeout_s (a hung load: a stuck mount or driver) is killed, as the text engine's
        process is, so the server records the failure and its back-off tries again."""
        if not self._conn.poll(timeout_s):
            self._proc.kill()
            self._proc.join(timeout=5)
            self.failure = f"the image worker did not start within {timeout_s:.0f} s"
            raise WorkerDied(self.failure)
        try:
            status, detail = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            self.failure = f"the image worker exited with code {self._proc.exitcode}"
            raise WorkerDied(self.failure, self._proc.exitcode) from None
        if status != "ready":
            self.failure = detail
            raise WorkerError(detail)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Loaded and still running. A death is seen at once, not only by the next batch, and
        logged with its exit code however it is noticed (an idle worker has no reader). Read
        from other threads too (the health checks, the engine watchdog): the loop's reader and
        futures are only ever touched on the loop's own thread."""
        if self.failure is None and not self._proc.is_alive():
            if self._loop is None or _running_loop() is self._loop:
                self._died()
            else:
                self._loop.call_soon_threadsafe(self._died)
                return False
        return self.down_because is None

    async def generate_pngs(self, requests: list[ImageRequest], parameters: list[list[dict[str, Any]]]
                            ) -> list[list[bytes]]:
        """One forward pass (or decode loop) for the batch; image i of request r is encoded with
        parameters[r][i] in its tEXt chunk. Raises WorkerDied when the process is gone."""
        if self.failure is not None:
            raise WorkerDied(self.failure)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._on_readable)
            # uvloop (the server's loop) makes the descriptor non-blocking; a reply larger
            # than what has arrived would then fail mid-message. Readiness is all we need
            # from the loop: once a reply starts, reading it to its end takes microseconds.
            os.set_blocking(self._conn.fileno(), True)
        if not self._pending:  # an idle worker: its time to answer starts now, or at the probe it
            # has not answered (a worker hung while idle is not given a fresh start)
            self._progress_at = self._unanswered_probe() or time.monotonic()
        self._sent += 1
        future = self._loop.create_future()
        self._pending[self._sent] = future
        try:
            self._conn.send(("generate", self._sent, (requests, parameters)))
        except OSError:  # the child is gone: the reader reports it, failing this batch too
            pass
        return await future

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                ok, batch, result = self._conn.recv()
                self._progress_at = time.monotonic()
                future = self._pending.pop(batch)
                if not future.done():
                    future.set_result(result) if ok else future.set_exception(WorkerError(result))
        except (EOFError, OSError):
            self._died()

    @property
    def down_because(self) -> str | None:
        """Why the worker serves no more (None while it serves): its failure, or the hang it
        was stopped for, before the loop has failed its batches."""
        return self.failure or self._stopped_because

    @property
    def has_work(self) -> bool:
        """Batches sent and not answered yet."""
        return bool(self._pending)

    def probe(self) -> None:
        """Ask an idle worker to answer, over the probes' pipe, unless a probe is out already (an
        answer that came is read first): a worker that hangs while idle then shows in
        `seconds_stuck` before a batch finds it. Busy, its replies answer. Only the engine
        watchdog's thread calls this, the probes' pipe's only user on this side."""
        if self.down_because is not None:
            return
        try:
            if self._probed_at is not None and self._probes.poll():  # one probe out, one answer
                self._probes.recv()
                self._probed_at = None
            if self._probed_at is None and not self.has_work:
                self._probes.send(("ping", 0, None))
                self._probed_at = time.monotonic()
        # The child is gone (`alive` sees it), or a shutdown on another thread closed the pipe
        # meanwhile (a write then finds no handle: TypeError).
        except (EOFError, OSError, TypeError):
            pass

    def _unanswered_probe(self) -> float | None:
        """When the probe out was sent, if no answer to it has come (read or not: the watchdog
        reads them at its next look, which a long restart of another engine may hold up)."""
        probed_at = self._probed_at
        try:
            return None if probed_at is None or self._probes.poll() else probed_at
        except (EOFError, OSError):
            return None

    def seconds_stuck(self) -> float:
        """How long the worker has held batches without answering any, or, idle, has not
        answered a `probe` (0 when neither): a worker that hangs (a deadlock, a GPU that
        stopped answering) looks alive. Read from the engine watchdog's thread; `_pending` only
        changes on the loop's."""
        if self.down_because is not None:
            return 0.0
        if self.has_work:
            return time.monotonic() - self._progress_at
        probed_at = self._unanswered_probe()
        return 0.0 if probed_at is None else time.monotonic() - probed_at

    def stop_stuck(self, reason: str) -> None:
        """Kill a worker that hangs; from now on it counts as dead (the server starts a fresh
        worker) and its batches fail with WorkerDied(`reason`). At once, not when its pipe
        closes: a process stuck in a GPU driver's call may take its time to act on the kill.
        Called from the watchdog's thread: the batches are failed on the loop's."""
        self._stopped_because = reason
        self._proc.kill()
        if self._loop is None or self._loop.is_closed():
            self.detach(reason)
        else:
            self._loop.call_soon_threadsafe(self.detach, reason)

    def _died(self) -> None:
        if self.failure is not None:  # seen already (by the reader, or a health check's call), or detached
            return
        self._proc.join(timeout=1)
        in_flight = len(self._pending)
        self.detach(self._stopped_because or f"the image worker exited (code {self._proc.exitcode})")
        logger.error("%s; failed %d batches in flight", self.failure, in_flight)

    def detach(self, failure: str = "the image worker has shut down") -> None:
        """Stop reading replies and fail the batches in flight, which nothing would answer
        any more: on the loop's thread (or once no loop runs), before `shutdown`, which may
        then run in another thread. Once: a worker found dead keeps its reason."""
        if self.failure is not None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self.failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerDied(failure))
        self._pending.clear()

    def shutdown(self) -> None:
        """Stop the worker once it has finished the batch it holds (once: at exit too); the
        callers of batches in flight fail at once, since their replies would no longer be read.
        Blocks up to 5 s: the server runs it in a thread, beside the other engines' shutdowns,
        after `detach` on the loop."""
        if self._conn.closed:
            return
        atexit.unregister(self.shutdown)
        self.detach()  # unless done already (on the loop, or by a death)
        if self._proc.is_alive() and self._stopped_because is None:  # a hung worker would not read "stop"
            try:
                self._conn.send(("stop", 0, None))
            except OSError:
                pass
            self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()
        self._probes.close()


# --- the child's side -----------------------------------------------------------------------
def _child_main(conn: Connection, probes: Connection, engine_class: type, model_dir: str, device: str,
                threads: int, max_images: int) -> None:
    # The server decides when the worker stops (a "stop" message, or its end of the pipe
    # closing): a SIGTERM or Ctrl-C sent to the server's whole process tree must not cut off
    # the batches it is finishing during a graceful shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        engine = engine_class.load(model_dir, device=device)
        engine.generate([ImageRequest(prompt="warm-up", seed=0, n=1)])
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    # A thread keeps reading the pipe while a batch runs, so the server's send never waits on
    # a full pipe (while this process waits on the server to read its PNGs: a deadlock). The
    # probes join the same queue: this thread answers them, between batches, as it would a batch.
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    for source in (conn, probes):
        threading.Thread(target=_read_into, args=(source, inbox), daemon=True).start()
    from service.encode import encode_png

    while True:
        op, batch, payload = inbox.get()
        if op == "stop":
            return
        if op == "ping":
            try:
                probes.send(("pong", 0, None))
            except OSError:  # the server is gone
                return
            continue
        requests, parameters = payload
        try:
            arrays = generate_in_passes(engine.generate, requests, max_images)
            result = [[encode_png(img, params) for img, params in zip(images, request_params, strict=True)]
                      for images, request_params in zip(arrays, parameters, strict=True)]
            reply = (True, batch, result)
        except Exception as e:  # fails this batch's requests, not the worker
            logger.exception("an image batch failed")
            reply = (False, batch, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except OSError:  # the server is gone
            return


def _read_into(conn: Connection, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            inbox.put(conn.recv())
        except (EOFError, OSError):  # the server is gone (its end of the pipe closed)
            inbox.put(("stop", 0, None))
            return

