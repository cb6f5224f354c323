"""The engine processes of one server worker: started beside the server, watched, and started
again when one dies, while the other models go on serving.

Each model runs in a process of its own (the text engine, `models.engine_process`; one worker
per image model, `service.image_worker`): in the server's process, its Python (HTTP, JSON)
would stall their work on the GIL. This process keeps only what checks requests before they
queue: the tokenizers and configs.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bentoml

from models.ar_image import ARImageEngine, ARImageRequests
from models.artifacts import ArtifactError
from models.continuous import SchedulerConfig
from models.engine import TextRequests
from models.engine_process import EngineProcess, EngineSpec
from models.image_engine import ImageEngine, ImageRequest, ImageRequests
from service.batching import MicroBatcher
from service.config import (BATCH_INVARIANT, CUDA_GRAPHS, DEVICE, ENGINE_STALL_S, IMAGE_MAX_BATCH, TEXT_MAX_RUNNING,
                            TEXT_MAX_WAITING, TEXT_TOKEN_BUDGET, engine_threads)
from service.image_worker import ImageWorker
from service.metrics import TEXT, Metrics, forget_dead_processes
from service.worker_health import WorkerHealth

logger = logging.getLogger("condgen.service")
STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGINT)  # an engine's exit code when the server's stop reached it


@dataclass
class ServedModel:
    """A store entry as the API describes it."""
    kind: str  # "text" | "image"
    tag: str
    labels: dict[str, str]
    created: float  # unix seconds
    metrics: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)  # known once loaded: image_size, ...
    is_latest: bool = True  # the store's `name:latest` at start-up (not so for a pinned older version)

    @classmethod
    def from_store(cls, kind: str, stored: Any) -> "ServedModel":
        metrics_path = os.path.join(stored.path, "metrics.json")
        metrics: dict[str, Any] = {}
        if os.path.isfile(metrics_path):  # optional, as for the engines; unreadable is an error
            try:
                with open(metrics_path) as fh:
                    metrics = json.load(fh)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ArtifactError(f"{metrics_path}: cannot read ({e})") from e
        latest = bentoml.models.get(f"{stored.tag.name}:latest").tag
        return cls(kind=kind, tag=str(stored.tag), labels=dict(stored.info.labels),
                   created=stored.info.creation_time.timestamp(), metrics=metrics, is_latest=latest == stored.tag)

    @property
    def name(self) -> str:
        return self.tag.split(":")[0]

    def answers_to(self, requested: str | None) -> bool:
        """None (the default), its name, its full tag, or `name:latest` when it is the latest."""
        return requested in (None, self.name, self.tag) or (self.is_latest and requested == f"{self.name}:latest")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.tag, "name": self.name, "kind": self.kind,
            "family": self.labels.get("family"), "dataset": self.labels.get("dataset"),
            "created": int(self.created),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "labels": self.labels, "metrics": self.metrics, **self.details,
        }

    def openai(self) -> dict[str, Any]:
        """OpenAI's model card; a text model's also has vLLM's `max_model_len` (its context, once
        loaded), which clients read to fit prompt and max_tokens."""
        card = {"id": self.tag, "object": "model", "created": int(self.created), "owned_by": "condgen"}
        if self.kind == "text" and "context_length" in self.details:
            card["max_model_len"] = self.details["context_length"]
        return card


@dataclass
class ImageBackend:
    """A served image model: its description, its request checker and worker process once
    loaded, and its own batcher (one forward pass holds one model's requests)."""
    served: ServedModel
    stored: Any  # bentoml.models.BentoModel
    engine_class: type[ImageEngine] | type[ARImageEngine]  # what the worker process loads
    checker_class: type[ImageRequests] | type[ARImageRequests]  # what this process loads
    batcher: MicroBatcher[ImageRequest] | None = None
    requests: ImageRequests | None = None  # checks requests (no weights), once loaded
    worker: ImageWorker | None = None

    @property
    def failed(self) -> bool:
        """Its worker process died after loading: not ready any more (a load error is
        `Engines.load_error` instead, which leaves the service alive)."""
        return self.requests is not None and not self.worker.alive


class Engines:
    """The engine processes of one server worker (the text model's, one per image model) and
    the request checkers they come with: loaded on a thread of their own, so that /readyz can
    answer 503 meanwhile, then watched."""

    def __init__(self, gpt: Any, text_model: ServedModel | None, images: dict[str, ImageBackend],
                 metrics: Metrics) -> None:
        self.gpt = gpt  # the text model's bentoml.models.BentoModel, or None
        self.text_model = text_model
        self.images = images  # tag -> backend; the first is the default
        self.metrics = metrics
        self.text: TextRequests | None = None  # checks and counts prompts; the model is in text_stream
        self.text_stream: EngineProcess | None = None  # continuous batching, in a process of its own
        self.load_error: str | None = None
        self.stopping = False  # set by the shutdown hook: the engines' ends are no deaths
        self._ready = threading.Event()
        self._threads = 1  # torch threads of each engine process, set when loading
        self._failed_starts: set[str] = set()  # engines that died and failed to start again
        self._stuck_at_last_look: set[tuple[str, int]] = set()  # (name, pid) found stuck by the last look
        self._shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # BentoML's, for all of the server's workers
        self.health = WorkerHealth(self._shared_dir)
        self.health.publish(ready=False, alive=True)  # loading

    def start(self) -> None:
        """Load every model on a thread of its own, then watch the engines there."""
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def ready(self) -> bool:
        """Models loaded and every engine process alive (/readyz), in every worker process
        (service/worker_health.py)."""
        return self._ready_here() and all(state["ready"] for state in self.health.others())

    def alive(self) -> bool:
        """False while an engine that died cannot be started again (/livez; see
        `_restart_dead_engines`), in any worker process: a liveness probe then lets the
        orchestrator replace the replica. A model that fails to load at start-up keeps the
        service alive but not ready, with the reason in its log and answers."""
        return not self._failed_starts and all(state["alive"] for state in self.health.others())

    def _ready_here(self) -> bool:
        return self._ready.is_set() and not self._engine_died()

    def _engine_died(self) -> bool:
        return ((self.text_stream is not None and not self.text_stream.alive)
                or any(b.failed for b in self.images.values()))

    def _load(self) -> None:
        try:
            started = time.perf_counter()
            # All engine processes start (and warm up) at once; this one reads the checkers.
            checkers, starting = {}, []
            self._threads = engine_threads((self.gpt is not None) + len(self.images))  # text engine, image models
            for tag, backend in self.images.items():
                checker = backend.checker_class.load(backend.stored.path)
                backend.served.details["image_size"] = checker.image_size
                backend.served.details["max_prompt_chars"] = checker.max_prompt_chars
                backend.served.details["context_length"] = checker.cfg.context
                if isinstance(checker, ARImageRequests):
                    backend.served.details["guidance_scale"] = checker.guidance_scale
                    backend.served.details["evaluations_per_image"] = checker.evaluations_per_image()
                checkers[tag] = checker
                backend.worker = self._image_worker(backend)
                starting.append(backend.worker)
            if self.gpt is not None:
                self.text_stream = self._text_engine()
            for worker in starting:
                worker.wait_started()  # raises the worker's error: an ArtifactError names the bad file
            if self.text_stream is not None:
                text = self.text_stream.requests
                self.text_model.details["max_prompt_chars"] = text.max_prompt_chars
                self.text_model.details["context_length"] = text.block_size
                self.text_model.details["batch_invariant"] = BATCH_INVARIANT
                self.text = text
            for tag, checker in checkers.items():
                self.images[tag].requests = checker
            served = [m.tag for m in (self.text_model, *(b.served for b in self.images.values())) if m]
            logger.info("loaded and warmed up %s in %.2fs (CPU threads of torch in each engine process: %d)",
                        ", ".join(served), time.perf_counter() - started, self._threads)
            # What exists now lives as long as the worker: out of the collector's sight, a JSON body
            # of 330,000 small lists no longer sets off full collections over it all (0.4 s of the
            # event loop's time, against 17 ms to parse it). Its garbage is collected first.
            gc.collect()
            gc.freeze()
            self._ready.set()
        except Exception as e:
            if self.stopping or getattr(e, "exitcode", None) in STOP_SIGNALS:
                # The server stops while this worker loads: its engines were stopped, not broken.
                logger.info("loading the models stopped: the server is stopping (%s)", e)
            else:
                # One line that names the bad file (ArtifactError messages start with its path),
                # then the traceback for whoever needs it; answers name the file by its model's
                # tag instead (the store's place on the server's disk is none of a client's business).
                logger.error("loading the models failed; the service stays not ready: %s: %s", type(e).__name__, e,
                             exc_info=True)
            self.load_error = f"{type(e).__name__}: {e}"
            for stored in (self.gpt, *(b.stored for b in self.images.values())):
                if stored is not None:
                    self.load_error = self.load_error.replace(str(stored.path), str(stored.tag))
            # The engines that did start would hold their memory on a replica that is never ready.
            for backend in self.images.values():
                if backend.worker is not None:
                    backend.worker.shutdown()
            if self.text_stream is not None:
                self.text_stream.shutdown()
            return
        self._restart_dead_engines()

    def _text_engine(self) -> EngineProcess:
        """The text model's engine process, started, loaded and warmed up (blocks meanwhile)."""
        engine = EngineProcess(EngineSpec(str(self.gpt.path), DEVICE, self._threads, SchedulerConfig(
            max_running=TEXT_MAX_RUNNING, max_tokens_per_step=TEXT_TOKEN_BUDGET, max_waiting=TEXT_MAX_WAITING,
            cuda_graphs=CUDA_GRAPHS, batch_invariant=BATCH_INVARIANT)))
        engine.on_step = self._on_text_step
        engine.on_admit = self._on_text_admit
        logger.info("the text engine of %s runs in process %d", self.text_model.tag, engine.pid)
        return engine

    def _image_worker(self, backend: ImageBackend) -> ImageWorker:
        """An image model's worker process, starting (`wait_started` waits for it)."""
        worker = ImageWorker(backend.engine_class, str(backend.stored.path), DEVICE, self._threads, IMAGE_MAX_BATCH)
        logger.info("the image engine of %s runs in process %d", backend.served.tag, worker.pid)
        return worker

    def _restart_dead_engines(self) -> None:
        """An engine process that dies after start-up (killed for memory, say) takes its model
        with it: it is started again here, in this worker, while the other models go on
        serving and the dead one's routes answer 503 at once (its requests in flight fail with
        a 503, or an error event in a stream). Shutting the whole worker down for BentoML to
        start a new one would leave a one-worker server answering nothing for the 10-15 s a new
        worker takes to load every model (connections queued unanswered, whatever model they
        wanted). Each engine's start that fails is tried again after 5, 10, ... up to
        60 s, and /livez answers 503 from its first failure until it is back, so that an
        orchestrator replaces a replica that does not recover (not while a start is under way:
        a large model's load may outlast a liveness probe's patience)."""
        backoff: dict[str, float] = {}  # engine -> seconds to wait after its latest failed start
        retry_at: dict[str, float] = {}
        down: set[str] = set()  # engines found dead and not back yet: a death is counted once
        while True:
            self.health.publish(self._ready_here(), not self._failed_starts)
            time.sleep(0.5)
            if self.stopping:  # the engines stop because this worker does: no deaths
                return
            try:
                forget_dead_processes(self._shared_dir)  # a worker killed: its gauges
                self._stop_stuck_engines()
                dead = self._dead_engines()
            except Exception:  # (a loop closing under a health check, say): the watch goes on
                logger.exception("checking the engine processes failed")
                continue
            if dead:  # not ready, for the other workers' probes too, before the restarts (seconds each)
                self.health.publish(self._ready_here(), not self._failed_starts)
            for name, revive in dead:
                if name not in down:
                    down.add(name)
                    served = self.text_model if name == "text" else self.images[name].served
                    self.metrics.engine_deaths.labels(model=served.name).inc()
                    logger.error("the %s has died: starting it again (the other models keep serving)",
                                 "text engine" if name == "text" else f"image engine of {name}")
                if time.monotonic() < retry_at.get(name, 0.0) or self.stopping:
                    continue
                try:
                    revive()
                    down.discard(name)
                    backoff.pop(name, None)
                    self._failed_starts.discard(name)
                except Exception as e:  # its own back-off: one engine failing does not hold the
                    # others back (starts run one after another on this thread, though: a slow
                    # start, up to the 300 s start timeouts, delays the next engine's by as long)
                    if self.stopping:  # ended by the worker's own stop, not a failure
                        return
                    backoff[name] = min(60.0, max(5.0, 2 * backoff.get(name, 0.0)))
                    retry_at[name] = time.monotonic() + backoff[name]
                    self._failed_starts.add(name)
                    logger.error("starting the %s engine again failed (%s: %s); next try in %.0f s",
                                 name, type(e).__name__, e, backoff[name])

    def _stop_stuck_engines(self) -> None:
        """Kill each engine process that has made no progress for ENGINE_STALL_S (`seconds_stuck`):
        with work in hand, no step or reply; idle, no answer to the probe each look sends
        (`probe`). At two looks in a row: after the whole container was paused (`docker pause`),
        this thread may look before the reader threads have read the steps waiting in their
        pipes. Alive to every other check, a hung engine held its requests until their deadlines
        (504) while /readyz said 200, and one that hung while idle was found only by the next
        request; stopped, it is a death like any other: its requests fail with a 503 that says
        why, and it is started again. (The watch runs on the thread that restarts engines: while
        one starts, the others wait for their next look.)"""
        if not ENGINE_STALL_S:
            return
        engines = [("text engine", self.text_stream)] if self.text_stream is not None else []
        engines += [(f"image engine of {tag}", backend.worker) for tag, backend in self.images.items()]
        looked, self._stuck_at_last_look = self._stuck_at_last_look, set()
        for name, engine in engines:
            if self.stopping:  # the shutdown closes the engines' pipes meanwhile
                return
            engine.probe()
            if (stuck := engine.seconds_stuck()) <= ENGINE_STALL_S:
                continue
            if (name, engine.pid) not in looked:  # by pid: not a process that an earlier one's restart replaced
                self._stuck_at_last_look.add((name, engine.pid))
                continue
            doing = "with work in hand" if engine.has_work else "while idle (no answer to a probe)"
            logger.error("the %s made no progress for %.0f s %s (CONDGEN_ENGINE_STALL_S=%g): killing its process "
                         "%d, to start it again", name, stuck, doing, ENGINE_STALL_S, engine.pid)
            engine.stop_stuck(f"the {name} made no progress for {stuck:.0f} s {doing} and was stopped")

    def _dead_engines(self) -> list[tuple[str, Callable[[], None]]]:
        """(name, how to start it again) of each engine process that has died."""
        dead = [] if self.text_stream is None or self.text_stream.alive else [("text", self._revive_text_engine)]
        return dead + [(tag, functools.partial(self._revive_image_worker, backend))
                       for tag, backend in self.images.items() if backend.failed]

    def _revive_text_engine(self) -> None:
        self.text_stream.shutdown()  # its pipe, and the process if a kill for hanging has not ended it yet
        started = time.perf_counter()
        fresh = self._text_engine()
        self.text_stream = fresh
        if self.stopping:  # the worker began stopping meanwhile, maybe before it saw this one
            fresh.shutdown()
            return
        logger.info("the text engine is back after %.1f s", time.perf_counter() - started)

    def _revive_image_worker(self, backend: ImageBackend) -> None:
        dead, tag = backend.worker, backend.served.tag
        while dead.failure is None:  # the event loop records the death first (and fails its batches in flight)
            if self.stopping:
                return
            time.sleep(0.05)
        dead.shutdown()  # off the loop, now that it is detached
        started = time.perf_counter()
        fresh = self._image_worker(backend)
        try:
            fresh.wait_started()
        except Exception:
            fresh.shutdown()
            raise
        backend.worker = fresh
        if self.stopping:
            fresh.shutdown()
            return
        logger.info("the image engine of %s is back after %.1f s", tag, time.perf_counter() - started)

    async def stop(self) -> None:
        """The server stops: the batchers refuse new work, then every engine process gets up to
        5 s to finish what it holds and exit."""
        self.stopping = True
        self.health.withdraw()
        for backend in self.images.values():
            await backend.batcher.close()
            if backend.worker is not None:
                backend.worker.detach()  # on the loop: its batches in flight fail
        # Each engine process gets up to 5 s to finish what it holds and exit: side by side, and
        # off the event loop (their joins block; one after the other, on the loop, a SIGTERM took
        # 3.0 s to exit with the tiny models instead of 2.0 s).
        stops = [backend.worker.shutdown for backend in self.images.values() if backend.worker is not None]
        if self.text_stream is not None:
            stops.append(self.text_stream.shutdown)
        await asyncio.gather(*(asyncio.to_thread(stop) for stop in stops))

    def _on_text_admit(self, waited: float, prompt_tokens: int) -> None:
        """Called (on the engine process's reader thread) for each request the engine admits:
        counted here, its client there or not (the route counted only those whose client was
        still there to see the first event, while the engine had prefilled them all)."""
        self.metrics.queue_time.labels(endpoint=TEXT, model=self.text_model.name).observe(waited)
        self.metrics.prompt_tokens.labels(model=self.text_model.name).inc(prompt_tokens)

    def _on_text_step(self, batch_size: int, running: int, waiting: int) -> None:
        """Called (on the engine process's reader thread) after every decode step."""
        if batch_size:  # one token per sequence sampled, whether or not its client is still there
            self.metrics.batch_size.labels(endpoint=TEXT, model=self.text_model.name).observe(batch_size)
            self.metrics.generated_tokens.labels(model=self.text_model.name).inc(batch_size)
        self.metrics.requests_running.labels(endpoint=TEXT, model=self.text_model.name).set(running)
        self.metrics.requests_waiting.labels(endpoint=TEXT, model=self.text_model.name).set(waiting)

