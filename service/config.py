"""The service's configuration: environment variables, read once when BentoML imports the
service (a bad value stops the start-up with one line naming the variable), and the models they
choose. README, Configuration, lists them all."""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
import torch

from models.artifacts import ArtifactError, read_config
from models.engine import resolve_device
from models.gpt import kv_cache_bytes
from service import chat
from service.env import ConfigError, env_choice, env_flag, env_float, env_int
from service.limits import Limits
from service.security import model_tag

# Each model variable set empty turns that model off: a text-only or an image-only server.
GPT_MODEL = model_tag("GPT_MODEL", "gpt:latest")  # refused at start-up unless name[:version]
GAN_MODEL = model_tag("GAN_MODEL", "gan:latest")


def _optional_model_tag(env_var: str, default: str) -> str | None:
    """An optional model: the tag `env_var` names (then it must exist), else `default` when the
    store has it; `env_var=""` turns it off."""
    if env_var in os.environ:
        return model_tag(env_var, default)
    try:
        bentoml.models.get(default)
    except bentoml.exceptions.NotFound:
        return None
    return default


AR_IMAGE_MODEL = _optional_model_tag("AR_IMAGE_MODEL", "ar_image:latest")
if not (GPT_MODEL or GAN_MODEL or AR_IMAGE_MODEL):
    raise ConfigError("GPT_MODEL and GAN_MODEL are empty and no AR_IMAGE_MODEL is served: no model to serve "
                      "(unset GPT_MODEL or GAN_MODEL for the default)")


def _check_family(env_var: str, tag: str | None, family: str) -> None:
    """A model the variable names that is missing, or of another family (GPT_MODEL=gan:latest),
    stops the start-up, naming the variable, rather than being listed under the wrong kind and
    failing when loaded. (Importing this module for its helpers needs no models: a missing
    default is left to BentoML's start-up.)"""
    if tag is None:  # not served
        return
    try:
        labels = bentoml.models.get(tag).info.labels
    except bentoml.exceptions.NotFound:
        if env_var not in os.environ:  # a default (`make serve` trains it): BentoML's error names the tag
            return
        # A tag the user set: BentoML's error named neither the variable nor the store, and spoke
        # of a "cloud context" (and `none` or `off` is what one tries to turn a model off).
        store = os.environ.get("BENTOML_HOME") or os.path.expanduser("~/bentoml")
        raise ConfigError(f"{env_var}={tag!r} is not in the model store at {store}: train it there, or set "
                          f"{env_var}= (empty) to serve without it") from None
    if labels.get("family", family) != family:
        raise ConfigError(f"{env_var}={tag!r} is a {labels['family']!r} model; {env_var} needs a {family!r} model")


_check_family("GPT_MODEL", GPT_MODEL, "gpt")
_check_family("GAN_MODEL", GAN_MODEL, "gan")
_check_family("AR_IMAGE_MODEL", AR_IMAGE_MODEL, "ar_image")


def _pinned(tag: str) -> str:
    """The exact version `tag` names now ("gpt:latest" -> "gpt:abc123"), when the store has it."""
    try:
        return str(bentoml.models.get(tag).tag)
    except bentoml.exceptions.NotFound:
        return tag


# The models chosen when the Bento is built are its container's defaults (Dockerfile ENV), pinned
# to the versions it packs: a Bento built with GPT_MODEL=my-gpt serves that my-gpt, not a newer
# one trained since (which the Bento does not hold). A text or GAN model turned off stays off
# there (empty). An AR model left out is simply not in the Bento's store, and is not listed:
# BentoML takes an entry without a value for a variable that `bentoml serve` requires set, and
# `make serve` on a store without ar_image stopped there.
MODEL_ENVS = [{"name": name, "value": _pinned(tag) if tag else ""} for name, tag in
              (("GPT_MODEL", GPT_MODEL), ("GAN_MODEL", GAN_MODEL), ("AR_IMAGE_MODEL", AR_IMAGE_MODEL))
              if tag or name != "AR_IMAGE_MODEL"]
DEVICE = env_choice("CONDGEN_DEVICE", "auto", r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N")  # auto = CUDA when available
if DEVICE.startswith("cuda") and int(DEVICE.partition(":")[2] or 0) >= torch.cuda.device_count():
    # Else every engine failed to load and the server stayed up, never ready, with torch's
    # "Torch not compiled with CUDA enabled" in its log.
    raise ConfigError(f"CONDGEN_DEVICE={DEVICE!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
TIMEOUT_S = env_float("CONDGEN_TIMEOUT", 300.0, 0)  # per request, until the first byte is sent
TEXT_MAX_RUNNING = env_int("CONDGEN_TEXT_MAX_RUNNING", 32, 1)  # sequences decoding at once (KV-cache slots)
TEXT_TOKEN_BUDGET = env_int("CONDGEN_TEXT_TOKEN_BUDGET", 512, 1)  # decode + prefill tokens per step
TEXT_MAX_WAITING = env_int("CONDGEN_TEXT_MAX_WAITING", 256, 0)  # queued completion requests, beyond it 429
CUDA_GRAPHS = env_flag("CONDGEN_CUDA_GRAPHS", True)  # on CUDA, replay the decode step as CUDA graphs
# Completions bit for bit independent of what shares their batch (CPU only; slower: README, Batching)
BATCH_INVARIANT = env_flag("CONDGEN_BATCH_INVARIANT", False)
LIMITS = Limits.from_env()  # in-flight requests, deadline, Retry-After (service.limits)
RETRY_AFTER_S = LIMITS.retry_after_s  # the Retry-After of a 429
# An engine process with work that reports no progress (a text decode step, an image batch), or
# an idle one that does not answer the watchdog's probe, for this long hangs: it is killed and
# started again. 0: never. By default half of the shorter of
# the deadline and the first-byte timeout (60 s): the requests waiting on a hung engine then get
# a 503 that says why, which a client may retry, before their deadline's 504.
ENGINE_STALL_S = env_float("CONDGEN_ENGINE_STALL_S", min(TIMEOUT_S, LIMITS.deadline_s) / 2, 0, allow_minimum=True)
IMAGE_MAX_BATCH = env_int("CONDGEN_IMAGE_MAX_BATCH", 64, 1)  # images per forward pass
IMAGE_MAX_QUEUE = env_int("CONDGEN_MAX_QUEUE", 256, 1)  # images waiting for the engine, beyond it 429
# A forming image batch lingers this long for requests sent together; at most a second: a lone
# request that follows a bigger batch may wait all of it (a value meant as seconds would hold it).
BATCH_WAIT_S = env_float("CONDGEN_BATCH_WAIT_MS", 10.0, 0, allow_minimum=True, maximum=1000) / 1000
ACCESS_LOG = env_flag("CONDGEN_ACCESS_LOG", True)  # one log line per request
# BentoML wraps every request in an OpenTelemetry span, and by default samples none of them;
# the wrapping alone was 0.3-0.4 ms of the event loop's CPU per request (0.83-0.94 against
# 0.54-0.56 ms with it off, single images). Set to 1 when a tracing exporter is configured.
TRACE_REQUESTS = env_flag("CONDGEN_TRACE_REQUESTS", False)
# server processes, each with its own models and batchers (10**30 of them hung the start-up)
WORKERS = env_int("CONDGEN_WORKERS", 1, 1, 4 * (os.cpu_count() or 1))


def _max_concurrency() -> int:
    """BentoML's own limit on requests in flight (beyond it its bare 429), shared out among the
    workers as ceil(limit / workers). It counts every route but the health probes and /metrics,
    so each worker's share must stay above CONDGEN_MAX_INFLIGHT (the generation routes), with
    room for the others (/v1/models, /docs, A1111's progress), or its 429 (no Retry-After, no
    code) comes before the service's own: by default 4 times the workers' in-flight places
    (256 for one worker)."""
    inflight = LIMITS.max_inflight
    limit = env_int("CONDGEN_MAX_CONCURRENCY", 4 * inflight * WORKERS, 1)
    if (share := -(-limit // WORKERS)) <= inflight:
        raise ConfigError(f"CONDGEN_MAX_CONCURRENCY={limit} gives each of the {WORKERS} worker(s) (CONDGEN_WORKERS) "
                          f"{share} requests, not above CONDGEN_MAX_INFLIGHT={inflight}: BentoML would refuse "
                          f"requests before the service's own limit does (raise it, or lower CONDGEN_MAX_INFLIGHT)")
    return limit


MAX_CONCURRENCY = _max_concurrency()
# Per engine process; 0 = share the cores out. More threads than cores only slow torch down
# (500 made a completion 100x slower; 100,000 crashed the engine and exhausted the host's processes).
TORCH_THREADS = env_int("CONDGEN_TORCH_THREADS", 0, 0, os.cpu_count() or 1)
MAX_BODY_BYTES = 1 << 20
# A request holds one of the CONDGEN_MAX_INFLIGHT places from its headers on, so a client that
# sends headers and then stalls must not keep it until the deadline: 64 such sockets would
# shut everyone else out for two minutes. The body has this long to arrive (then 408).
BODY_TIMEOUT_S = env_float("CONDGEN_BODY_TIMEOUT_S", 10.0, 0)


def cgroup_memory_files(proc_cgroup: str, root: str = "/sys/fs/cgroup") -> list[str]:
    """The memory-limit files of the cgroup a process is in (the text of /proc/self/cgroup)
    and of each of its parents, whose limits bind it too: `memory.max` (v2, line `0::/path`),
    `memory.limit_in_bytes` (v1, line `N:memory:/path`). In a container the path is `/`; on a
    host it is the process's own group below the root, whose file alone may hold the limit."""
    files = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        group = Path(path.strip("/"))
        files += [str(base / parent / name) for parent in (group, *group.parents) if str(parent) != "."]
        files.append(str(base / name))
    return files


def memory_limit(cgroup_files: list[str] | None = None) -> int:
    """Bytes this server may use: the machine's memory, or its cgroup's limit when lower (a
    cgroup's file reads "max", or a huge number, when it sets none)."""
    if cgroup_files is None:
        try:
            cgroup_files = cgroup_memory_files(Path("/proc/self/cgroup").read_text())
        except (OSError, ValueError):
            cgroup_files = []
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in cgroup_files:
        try:
            with open(path) as f:
                limits.append(int(f.read().strip()))
        except (OSError, ValueError):  # no such cgroup file, or "max"
            pass
    return min(limits)


def _check_text_slots_fit(tag: str | None) -> None:
    """The text engine allocates its CONDGEN_TEXT_MAX_RUNNING slots whole when it starts (each
    a KV cache of the model's full context and a row of sampling state): more than the memory
    this server may use stops the start-up here, naming the variable. (The engine failed to
    load and the server stayed up, never ready: `CONDGEN_TEXT_MAX_RUNNING=1000000` asked 488 GiB.)
    On the CPU only: a GPU's memory is the engine's to report."""
    if tag is None or resolve_device(DEVICE).type != "cpu":
        return
    try:
        path = bentoml.models.get(tag).path
    except bentoml.exceptions.NotFound:  # a default not trained yet: BentoML's start-up says so
        return
    try:
        cfg = read_config(path, "gpt")
        kv_cache = kv_cache_bytes(cfg["n_layer"], cfg["n_embd"], cfg["block_size"], 4)  # float32 on the CPU
        slot = kv_cache + 9 * cfg["vocab_size"]  # and a bool and two floats per token of the vocabulary
    except (ArtifactError, KeyError, TypeError):  # a broken model: its load fails, naming the file
        return
    need, memory = TEXT_MAX_RUNNING * slot * WORKERS, memory_limit()
    if need > memory:
        workers = f" in each of CONDGEN_WORKERS={WORKERS}" if WORKERS > 1 else ""
        raise ConfigError(f"CONDGEN_TEXT_MAX_RUNNING={TEXT_MAX_RUNNING}: that many sequences of {tag}'s "
                          f"{cfg['block_size']} positions{workers} need {need / 2**30:,.1f} GiB, more than the "
                          f"{memory / 2**30:,.1f} GiB of memory this server may use (at most "
                          f"{memory // (slot * WORKERS):,})")


_check_text_slots_fit(GPT_MODEL)

# A Jinja2 chat template (Hugging Face's convention), read and compiled here; unset: no chat route.
CHAT_TEMPLATE = chat.template_from_env(os.environ)
CHAT_PATH = "/v1/chat/completions"


def engine_threads(engines: int) -> int:
    """Torch CPU threads for each of a worker's `engines` processes: CONDGEN_TORCH_THREADS, or
    the cores this server may use shared out among all engine processes of all workers.
    torch's own default gives every process all the cores, and their spinning threads then
    take the CPU from each other and from the event loop (2 cores, text and image engines,
    through HTTP: 506 images/s and 4,208 tokens/s with 2 threads each, 653 and 4,562 with 1)."""
    if TORCH_THREADS > 0:
        return TORCH_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (WORKERS * engines))
