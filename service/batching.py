"""An async micro-batcher: requests that queue while the engine is busy run together next.

One consumer task per image engine takes everything waiting (up to a cost budget in images,
so requests with different `n` share a forward pass), may linger a few
milliseconds for requests sent at the same moment (see `_linger`), and hands the batch to `run`.
While `run` works (in a thread or another process, so the event loop keeps serving), new
requests queue and form the next batch; with `max_in_flight` 2 that batch is handed over at
once and waits in the worker's queue, so a worker process goes from one batch to the next
without waiting for the event loop to answer the first batch's clients; and a queue that
finds the worker idle may go in as two halves, so the clients keep arriving in two groups
that alternate instead of all waiting on one batch (`split_when_idle`). The rest is the
same policy as BentoML's adaptive batching, which does not reach these routes: they are a
Starlette app mounted into the service (OpenAI-shaped routes and errors, see service/app.py),
and BentoML batches only its own `@bentoml.api` methods. BentoML's batching also lacks the
bounded queue that answers 429 at once and the withdrawal of jobs whose client has left.
(Completions do not come here: they go through continuous batching, models/continuous.py.)
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.metrics import Metrics
from service.schemas import ApiError

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Overloaded(ApiError):
    """The server is at capacity (a batcher's queue at its cost limit, the text engine's
    waiting queue full): a 429 with Retry-After, nothing queued."""

    def __init__(self, what: str, retry_after_s: int):
        super().__init__(429, f"the server is at capacity ({what}); retry after {retry_after_s}s", type="server_error",
                         code="overloaded", headers={"Retry-After": str(retry_after_s)})


@dataclass(eq=False)
class Job(Generic[T]):
    """One HTTP request's work; `run` reports through `future`."""
    payload: T
    cost: int  # images this job adds to a batch
    arrived: float = field(default_factory=time.perf_counter)
    future: asyncio.Future | None = None


class MicroBatcher(Generic[T]):
    def __init__(self, endpoint: str, run: Callable[[list[Job[T]]], Awaitable[None]],
                 metrics: Metrics, max_batch_cost: int = 64, max_wait_s: float = 0.0,
                 max_queue_cost: int | None = None, retry_after_s: int = 1, max_in_flight: int = 1,
                 split_when_idle: bool = False, model: str = ""):
        if split_when_idle and max_in_flight < 2:
            raise ValueError("split_when_idle needs max_in_flight >= 2: the second half waits in the worker")
        self.endpoint = endpoint
        self.labels = {"endpoint": endpoint, "model": model}  # of its metrics
        # Beyond this much queued cost (images), `submit` refuses: a bounded queue answers
        # "not now" at once instead of making everyone wait longer.
        self.max_queue_cost = max_queue_cost
        self._queued_cost = 0
        self._running_cost = 0  # of the batches handed to `run`, not yet done
        self.retry_after_s = retry_after_s
        self.run = run
        self.metrics = metrics
        self.max_batch_cost = max_batch_cost
        self.max_wait_s = max_wait_s
        self._pending: deque[Job[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._expected = 1  # size of the previous batch: how many to linger for
        self.split_when_idle = split_when_idle
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._batches: set[asyncio.Task] = set()
        self._forming: list[Job[T]] = []

    @property
    def outstanding_cost(self) -> int:
        """Cost (images) queued, forming a batch or being run now."""
        return self._queued_cost + sum(job.cost for job in self._forming) + self._running_cost

    def submit(self, job: Job[T]) -> None:
        """Queue a job (from the event loop thread). The consumer starts on first use.

        Raises Overloaded (nothing queued) when the job would take the queue past max_queue_cost;
        a job alone is always admitted into an empty queue, whatever its cost."""
        if (self.max_queue_cost is not None and self._pending
                and self._queued_cost + job.cost > self.max_queue_cost):
            raise Overloaded(f"{self._queued_cost} {self.endpoint} queued and {job.cost} more asked, limit "
                             f"{self.max_queue_cost}", self.retry_after_s)
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._consume(), name=f"batcher-{self.endpoint}")
        self._pending.append(job)
        self._queued_cost += job.cost
        self.metrics.requests_waiting.labels(**self.labels).inc()
        self._wakeup.set()

    def withdraw(self, job: Job[T]) -> None:
        """The job's client has gone (or has its answer): a job still queued leaves the queue now,
        with its cost, so that dead work does not hold places of CONDGEN_MAX_QUEUE while the
        worker is busy (with a long AR batch, say) and refuse live requests with 429s."""
        try:
            self._pending.remove(job)
        except ValueError:  # taken into a batch already, or never queued
            return
        self._queued_cost -= job.cost
        self.metrics.requests_waiting.labels(**self.labels).dec()

    async def close(self) -> None:
        """Stop taking jobs: those still queued, or taken into a batch not yet handed over,
        fail with a 503 (the engine is going away); batches handed over end with their engine.
        A caller cancelled meanwhile stays cancelled (awaiting the consumer and catching its
        CancelledError would swallow the caller's own)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        gone = ApiError(503, f"the server is shutting down before this {self.endpoint} request ran; retry on "
                             "another replica", type="server_error", code="shutting_down")
        for job in self._forming:
            fail(job, gone)
        self._forming = []
        while self._pending:
            job = self._pending.popleft()
            self._queued_cost -= job.cost
            self.metrics.requests_waiting.labels(**self.labels).dec()
            fail(job, gone)

    def _take(self, batch: list[Job[T]], cost: int) -> int:
        """Move pending jobs into `batch` while the budget allows (always at least one)."""
        while self._pending:
            job = self._pending[0]
            if batch and cost + job.cost > self.max_batch_cost:
                break
            self._pending.popleft()
            self._queued_cost -= job.cost
            self.metrics.requests_waiting.labels(**self.labels).dec()
            batch.append(job)
            cost += job.cost
        return cost

    async def _consume(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                # A slot first, then the batch: it takes everything that queued meanwhile.
                await self._in_flight.acquire()
                batch: list[Job[T]] = []
                self._forming = batch  # out of the queue, not yet handed over: close() fails them
                cost = self._take(batch, 0)
                if batch and self.max_wait_s > 0:
                    try:
                        cost = await self._linger(batch, cost)
                    except asyncio.CancelledError:  # close(): the slot is not taken after all
                        self._in_flight.release()
                        raise
                self._forming = []
                if not batch:
                    self._in_flight.release()
                    continue
                if self.split_when_idle and not self._batches:
                    cost = self._split(batch, cost)
                self._expected = len(batch)
                task = asyncio.get_running_loop().create_task(self._run_batch(batch, cost))
                self._batches.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(self._batch_done)

    def _split(self, batch: list[Job[T]], cost: int) -> int:
        """The worker is idle: keep about half of the batch's cost and put the rest back at
        the head of the queue, to go next, at once, into the worker's queue. The first half's
        clients then come back while the second half runs, so the worker does not wait for
        the event loop to answer everyone; with one batch of everything it would (a batch of
        8 single images ran 12 ms, then the worker waited 8 ms for the next). It pays where a
        batch takes about as long as the event loop's turnaround, not where a batch is long
        and its rows nearly free (an autoregressive image model's decode loop on a GPU)."""
        kept, kept_cost = 1, batch[0].cost
        while kept < len(batch) and 2 * (kept_cost + batch[kept].cost) <= cost:
            kept_cost += batch[kept].cost
            kept += 1
        rest = batch[kept:]
        del batch[kept:]
        self._pending.extendleft(reversed(rest))
        self._queued_cost += cost - kept_cost
        self.metrics.requests_waiting.labels(**self.labels).inc(len(rest))
        return kept_cost

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        self._in_flight.release()

    async def _linger(self, batch: list[Job[T]], cost: int) -> int:
        """Wait up to max_wait_s for requests sent together with the first, but only while
        fewer have come than made up the previous batch: clients that send one request each
        as soon as their answer arrives are all back without waiting out the window, and a
        lone client (previous batch of one) does not wait at all. Nor does a batch that the
        job at the head of the queue does not fit: nothing behind it may pass it."""
        assert self._wakeup is not None
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self._expected and cost < self.max_batch_cost and not self._pending:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                pass
            cost = self._take(batch, cost)
        return cost

    async def _run_batch(self, batch: list[Job[T]], cost: int) -> None:
        m, now = self.metrics, time.perf_counter()
        # Queue time ends at the hand-over: with max_in_flight 2, a batch may still wait in the
        # worker for the one before it (README, Metrics).
        for job in batch:
            m.queue_time.labels(**self.labels).observe(now - job.arrived)
        m.batch_size.labels(**self.labels).observe(len(batch))
        m.batch_items.labels(**self.labels).observe(cost)
        running = m.requests_running.labels(**self.labels)
        running.inc(len(batch))
        self._running_cost += cost
        try:
            await self.run(batch)
        except Exception as e:  # `run` should resolve its jobs itself; this is the safety net
            logger.exception("%s batch failed", self.endpoint)
            for job in batch:
                fail(job, e)
        finally:
            running.dec(len(batch))
            self._running_cost -= cost


def fail(job: Job[Any], exc: BaseException) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(exc)
