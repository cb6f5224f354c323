"""Continuous batching in a process of its own, so the server's Python does not slow decoding.

Python runs one thread at a time (the GIL). In a server, the HTTP event loop and the decode
loop share one interpreter: every time a decode step returns from a torch kernel to Python,
it waits while the event loop parses, validates and encodes other requests. Measured here: a
pure-Python thread busy 20 % of the time cut the in-process engine's tokens/s by 22 %; under
HTTP load the engine thread was off the CPU 21 % of the time. vLLM moved its engine core
into a separate process for the same reason. Here the scheduler (`ContinuousEngine`) runs
in a child process that owns the model; the server keeps only the tokenizer, to check
requests and count tokens, and talks to the child over a pipe: requests and cancellations
in, each step's events out (one message per step).

`EngineProcess` has the interface of `continuous.AsyncEngine`: `generate(req)` is an async
iterator of the request's events, leaving it early cancels the request. The child starts
with the `spawn` method (forking a server with threads is unsafe), so a script that creates
one guards its entry point with `if __name__ == "__main__":`, as any multiprocessing program.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from models.continuous import ContinuousEngine, EventStreams, QueueFull, SchedulerConfig, check_request
from models.engine import CompletionRequest, StreamEvent, TextEngine, TextRequests
from models.errors import InvalidParameter

logger = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine process could not start or has died; the service answers 503. `exitcode`:
    the process's, when it exited while starting (negative: killed by that signal)."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode


@dataclass
class EngineSpec:
    """What the child needs to build its engine (picklable: it crosses the process boundary)."""
    model_dir: str
    device: str = "auto"
    threads: int = 0  # torch CPU threads in the child (0 = torch's default)
    scheduler: SchedulerConfig | None = None


@dataclass
class StepReport:
    """One scheduler step, sent from the child: its events and the scheduler's state after it."""
    events: list[StreamEvent]
    batch_size: int  # sequences sampled in this step
    running: int
    waiting: int
    received: int  # requests the child has taken from the pipe, since it started
    admitted: list[tuple[float, int]]  # each request admitted in this step: seconds it waited, prompt tokens


class EngineProcess(EventStreams):
    """Runs a ContinuousEngine in a child process; each request gets an async iterator of events."""

    def __init__(self, spec: EngineSpec, start_timeout_s: float = 300.0):
        super().__init__()
        self.spec = spec
        self.cfg = spec.scheduler or SchedulerConfig()
        self.requests = TextRequests.load(spec.model_dir)  # tokenizer and context length, no weights
        self.on_step = None  # optional callback(batch_size, running, waiting), for metrics
        self.on_admit = None  # optional callback(seconds waited, prompt tokens) per request admitted, for metrics
        self._send_lock = threading.Lock()
        self._running = self._waiting = self._sent = self._received = 0
        self._failure: str | None = None
        self._stopping = False
        self._stopped_because: str | None = None  # why `stop_stuck` killed the child
        self._progress_at = time.monotonic()  # the latest step report, or the start of work on an idle engine
        self._probed_at: float | None = None  # a probe of the idle child not answered yet (`probe`)
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and locks
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, spec), name="condgen-text-engine",
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(start_timeout_s):
            self._abandon()
            raise EngineFailed(f"the text engine process did not start within {start_timeout_s:.0f} s")
        status, detail = self._recv_start()
        if status != "ready":
            self._abandon()
            raise EngineFailed(f"the text engine process failed to start: {detail}",
                               self._proc.exitcode if status == "exited" else None)
        self._reader = threading.Thread(target=self._read, name="text-engine-reader", daemon=True)
        self._reader.start()
        # Before multiprocessing's own exit handler, which would wait on a child that ignores SIGTERM.
        atexit.register(self.shutdown)

    def _abandon(self) -> None:
        """A start that failed leaves no process or pipe behind (the server tries again later)."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=5)
        self._conn.close()

    def _recv_start(self) -> tuple[str, str]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)  # its pipe closes before it is reaped: no exit code until then
            return "exited", f"it exited with code {self._proc.exitcode}"

    # --- the server's side ------------------------------------------------------------------
    def check(self, req: CompletionRequest, ahead: int = 0) -> list[int]:
        """The prompt's ids; InvalidParameter for a bad request, QueueFull when the queue is at its
        limit (counting `ahead` requests about to queue before this one), EngineFailed when the
        engine is gone: before any work, so the service can answer 4xx/503."""
        if (gone := self._gone()) is not None:
            raise gone
        running, waiting = self.stats()
        return check_request(self.requests, self.cfg, req, waiting + ahead, running)

    def _gone(self) -> Exception | None:
        failure = self._failure or self._stopped_because
        return EngineFailed(failure) if failure is not None else None

    def _submit(self, gid: int, req: CompletionRequest) -> None:
        if self.stats() == (0, 0):  # an idle engine: its time to make progress starts now, or at
            # the probe it has not answered (a child hung while idle is not given a fresh start)
            probed_at = self._probed_at  # read once: the reader thread clears it
            self._progress_at = time.monotonic() if probed_at is None else probed_at
        self._sent += 1
        self._post(("add", gid, req))

    def _cancel(self, gid: int) -> None:
        if self.alive:  # nothing to a child stopped for hanging: it reads no more, and its pipe may be full
            self._post(("cancel", gid, None))

    @property
    def alive(self) -> bool:
        return self._failure is None and self._stopped_because is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stats(self) -> tuple[int, int]:
        """(sequences running, requests waiting), as of the latest step."""
        return self._running, self._waiting + self._sent - self._received

    @property
    def has_work(self) -> bool:
        """Requests running or waiting, by the engine's state, not by the streams still open: a
        slow client reading its last events keeps a stream open long after its engine is done."""
        return any(self.stats())

    def probe(self) -> None:
        """Ask an idle child to answer (a report of no step), unless a probe is out already: a
        child that hangs while idle then shows in `seconds_stuck` before a request finds it.
        Busy, its steps answer. One small message at a time: a hung child's pipe never fills."""
        if self.alive and not self.has_work and self._probed_at is None:
            self._probed_at = time.monotonic()
            self._post(("ping", None, None))

    def seconds_stuck(self) -> float:
        """How long the child has had requests to serve without reporting a step, or, idle, has
        not answered a `probe` (0 when neither). The child reports every step it takes while it
        has work, and answers a probe at once while idle, so a long silence means it hangs (a
        deadlock, a GPU that stopped answering) while looking alive."""
        if not self.alive:
            return 0.0
        if self.has_work:
            return time.monotonic() - self._progress_at
        probed_at = self._probed_at  # read once: the reader thread clears it
        return 0.0 if probed_at is None else time.monotonic() - probed_at

    def stop_stuck(self, reason: str) -> None:
        """Kill a child that hangs; from now on it counts as dead (the server starts a fresh
        engine) and its requests fail with EngineFailed(`reason`). At once, not when its pipe
        closes: a process stuck in a GPU driver's call may take its time to act on the kill."""
        self._stopped_because = reason
        self._proc.kill()
        self._fail_in_flight(reason)
        # Its gauges are not zeroed again by its reader when the pipe closes: by then a fresh
        # engine may be running under the same gauges.
        self.on_step = self.on_admit = None

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        if self._proc.is_alive() and self._stopped_because is None:  # a hung child would not read "stop"
            self._post(("stop", None, None))
            self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()

    def _post(self, msg: tuple) -> None:
        with self._send_lock:  # a Connection is not safe for concurrent senders
            try:
                self._conn.send(msg)
            except (OSError, ValueError) as e:  # the child is gone: the reader reports it
                logger.warning("could not reach the text engine process: %s", e)

    def _read(self) -> None:
        """The reader thread: one message per step from the child, delivered to the event loops."""
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                if kind == "step":
                    self._on_report(payload)
                elif kind == "error":  # raced past check() (a full queue), or a failed step
                    gid, error = payload
                    self._send(gid, error)
            except Exception:  # a failing metrics callback must not stop the deliveries
                logger.exception("handling a message of the text engine process failed")
        if self._proc.is_alive():
            self._proc.join(timeout=1)
        if self._stopping:
            self._failure = "the text engine has shut down"
        else:
            self._failure = self._stopped_because or f"the text engine process exited (code {self._proc.exitcode})"
            logger.error("%s; failing %d requests in flight", self._failure, len(self._outboxes))
        self._fail_in_flight(self._failure)

    def _fail_in_flight(self, failure: str) -> None:
        """Nothing runs or waits any more: the gauges fed by on_step go to 0 (they must not keep
        their last values), and the requests in flight fail, at a shutdown too: nothing would
        feed them any more (as AsyncEngine)."""
        self._running, self._waiting, self._received = 0, 0, self._sent
        try:
            if self.on_step is not None:
                self.on_step(0, *self.stats())
        except Exception:  # the requests in flight must still hear of it below
            logger.exception("the on_step callback of the text engine failed")
        for gid in list(self._outboxes):
            self._send(gid, EngineFailed(failure))

    def _on_report(self, report: StepReport) -> None:
        self._progress_at, self._probed_at = time.monotonic(), None
        self._running, self._waiting, self._received = report.running, report.waiting, report.received
        # The step's metrics first, then its events (whatever the callbacks do): a client that
        # has its last event finds the step counted (the other order let a test's next
        # callbacks see the previous test's step).
        try:
            if self.on_admit is not None:
                for waited, prompt_tokens in report.admitted:
                    self.on_admit(waited, prompt_tokens)
            if self.on_step is not None:
                self.on_step(report.batch_size, *self.stats())
        finally:
            self._send_events(report.events)


# --- the child's side -----------------------------------------------------------------------
def _child_main(conn: Connection, spec: EngineSpec) -> None:
    # The server decides when the engine stops (a "stop" message, or its end of the pipe
    # closing): a SIGTERM or Ctrl-C sent to the server's whole process tree (BentoML's process
    # manager signals children too) must not cut off the requests the server is still
    # finishing during a graceful shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        engine = ContinuousEngine(TextEngine.load(spec.model_dir, device=spec.device), spec.scheduler)
        engine.add(CompletionRequest(prompt="Hello", seed=0, max_tokens=2))  # warm-up
        while engine.has_work():
            engine.step()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    try:
        _serve(conn, engine)
    except (EOFError, OSError):  # the server is gone (its end of the pipe closed)
        pass


def _serve(conn: Connection, engine: ContinuousEngine) -> None:
    """Apply the server's messages between steps; step while there is work; report each step
    (and each batch of messages without one: cancellations, probes)."""
    admitted: list[tuple[float, int]] = []
    engine.on_admit = lambda waited, prompt_tokens: admitted.append((waited, prompt_tokens))
    received = 0  # requests taken from the pipe so far: the server counts the ones still in it
    while True:
        if not engine.has_work():
            conn.poll(None)  # sleep until the server sends something
        while conn.poll():
            try:
                op, gid, req = conn.recv()
            except EOFError:  # the server is gone
                return
            if op == "stop":
                return
            if op == "ping":  # answered by the report below
                continue
            if op == "cancel":
                engine.cancel(gid)
                continue
            received += 1
            try:
                engine.add(req, gid)
            except (InvalidParameter, QueueFull) as e:  # raced past the server's check
                conn.send(("error", (gid, e)))
        events, batch_size = [], 0  # no step (cancellations only): still a report, for the gauges
        in_flight = list(engine.groups)  # a failed step drops the final events of those it finished
        try:
            if engine.has_work():
                events, batch_size = engine.step(), engine.last_batch_size
        except Exception as e:  # a bug must fail the requests in flight, not the engine
            logger.exception("a step of the text engine failed")
            for gid in in_flight:
                conn.send(("error", (gid, RuntimeError(f"the text engine failed: {type(e).__name__}: {e}"))))
                engine.cancel(gid)
        conn.send(("step", StepReport(events, batch_size, engine.num_running, engine.num_waiting,
                                      received, admitted[:])))
        admitted.clear()
