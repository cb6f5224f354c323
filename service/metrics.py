"""The service's own Prometheus metrics, all named `condgen_*`, served at /metrics beside BentoML's.

BentoML runs prometheus_client in multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR in
the worker before it builds the service; prometheus_client reads that variable when it is
first imported, so it is imported inside `get_metrics()` (called from the service's
`__init__`), never at module import time. Gauges use `livesum` so that several workers add up.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PREFIX = "condgen"

# From a GPU's sub-millisecond token gaps to the longest a request may take (CONDGEN_TIMEOUT's 300 s).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")  # prometheus_client's, for a process's live gauges

SERVER_ERRORS = ("500", "503", "504")  # the statuses of `request_errors` an alert watches, from the start

# The two batched endpoint families; label values of `endpoint`.
TEXT = "completions"
IMAGE = "images"


@dataclass(frozen=True)
class Metrics:
    time_to_first_token: Any  # Histogram: request accepted (checked, tokenized) -> first token of a choice
    inter_token_latency: Any  # Histogram: between consecutive tokens of one choice
    queue_time: Any  # Histogram{endpoint, model}: arrival -> taken into an engine batch (images: handed to the worker)
    batch_size: Any  # Histogram{endpoint, model}: completions: sequences per decode step; images: requests per batch
    batch_items: Any  # Histogram{endpoint, model}: images per batch
    requests_running: Any  # Gauge{endpoint, model}: completions: sequences decoding; images: requests handed to the worker
    requests_waiting: Any  # Gauge{endpoint, model}: requests queued for the engine now
    generated_tokens: Any  # Counter{model}
    prompt_tokens: Any  # Counter{model}
    images: Any  # Counter{model}
    request_errors: Any  # Counter{endpoint, status}: 4xx/5xx answers from our routes
    engine_deaths: Any  # Counter{model}: engine processes found dead (each is started again)

    def start_series(self, models: list[tuple[str, str]], error_endpoints: Iterable[str] = ()) -> None:
        """Each served model's series (name, "text" or "image") from the start, at 0, and the
        server errors (500, 503, 504) of each of `error_endpoints`: a series that first appears
        at 1 is no increase to `increase()` or `rate()` (the first engine death, or the first
        500, fired no alert), and one that is absent shows "no data" on a dashboard, not 0."""
        for endpoint in error_endpoints:
            for status in SERVER_ERRORS:
                self.request_errors.labels(endpoint=endpoint, status=status)
        for name, kind in models:
            endpoint = TEXT if kind == "text" else IMAGE
            self.requests_running.labels(endpoint=endpoint, model=name).set(0)
            self.requests_waiting.labels(endpoint=endpoint, model=name).set(0)
            for histogram in (self.queue_time, self.batch_size) + ((self.batch_items,) if kind == "image" else ()):
                histogram.labels(endpoint=endpoint, model=name)
            self.engine_deaths.labels(model=name)
            for counter in (self.generated_tokens, self.prompt_tokens) if kind == "text" else (self.images,):
                counter.labels(model=name)


def forget_dead_processes(path: str | None) -> list[int]:
    """Drop the live gauges of the processes that wrote to `path` and are gone; return their
    pids. A `livesum` gauge drops a process's values only when told (BentoML tells it on a
    clean exit): a worker killed (by the OOM killer, say) and started again left its last
    requests running and waiting in the sums for good."""
    from prometheus_client import multiprocess

    if not path or not os.path.isdir(path):
        return []
    pids = {int(m.group(1)) for m in map(LIVE_GAUGE_FILE.fullmatch, os.listdir(path)) if m}
    gone = {pid for pid in pids if not process_exists(pid)}
    for pid in gone:
        multiprocess.mark_process_dead(pid, path)
    return sorted(gone)


def process_exists(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not: a killed worker stays one until BentoML's process
    manager reaps it, some 5 s later, and its gauges and health state counted until then."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # after the name, which may hold ")"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 says whether it exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's
            return True
        return True


@functools.lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    """Create the metric objects once per process (a second registration would raise)."""
    import prometheus_client as pc  # deferred: see the module docstring

    forget_dead_processes(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def histogram(name: str, doc: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        return pc.Histogram(f"{PREFIX}_{name}", doc, labelnames=labels, buckets=buckets)

    def gauge(name: str, doc: str, labels: tuple[str, ...]):
        return pc.Gauge(f"{PREFIX}_{name}", doc, labelnames=labels, multiprocess_mode="livesum")

    metrics = Metrics(
        time_to_first_token=histogram("time_to_first_token_seconds",
                                      "Seconds from a request's acceptance (body read, checked, tokenized) to the "
                                      "first token of a choice"),
        inter_token_latency=histogram("inter_token_latency_seconds",
                                      "Seconds between consecutive tokens of one choice"),
        queue_time=histogram("queue_time_seconds", "Seconds a request waited for an engine batch",
                             ("endpoint", "model")),
        batch_size=histogram("batch_size", "Completions: sequences per decode step; images: requests per batch",
                             ("endpoint", "model"), BATCH_BUCKETS),
        batch_items=histogram("batch_items", "Images per batch", ("endpoint", "model"), BATCH_BUCKETS),
        requests_running=gauge("requests_running", "Completions: sequences decoding; images: requests handed to "
                                                    "the worker", ("endpoint", "model")),
        requests_waiting=gauge("requests_waiting", "Requests queued for an engine call", ("endpoint", "model")),
        generated_tokens=pc.Counter(f"{PREFIX}_generated_tokens", "Tokens sampled by the engine, its clients "
                                    "still there or not", ("model",)),
        prompt_tokens=pc.Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of the completion requests admitted",
                                 ("model",)),
        images=pc.Counter(f"{PREFIX}_images", "Images generated", ("model",)),
        request_errors=pc.Counter(f"{PREFIX}_request_errors", "Error answers by status",
                                  ("endpoint", "status")),
        engine_deaths=pc.Counter(f"{PREFIX}_engine_deaths", "Engine processes found dead (each is started again)",
                                 ("model",)),
    )
    return metrics
