"""Throughput through HTTP versus calling the engines in-process, at the same concurrency.

    python -m benchmarks.http --concurrency 8 --seconds 30          # starts `bentoml serve` itself
    python -m benchmarks.http --url http://127.0.0.1:3000            # or measures a running server

Through HTTP, `concurrency` clients each send their next request as soon as the previous
answer arrives. The in-process baseline hands the engine batches of `concurrency` requests
back to back: what perfect batching of that many waiting clients would achieve, with no
HTTP, JSON or queueing (images are PNG-encoded on both sides): the ratio HTTP / in-process.
Each kind also gets the service's own path without HTTP, `concurrency` closed-loop callers in
one event loop, so HTTP / that isolates what the HTTP layer costs (the README's summary figure;
both are held to >= 80 %): for text the continuous-batching engine process (models.engine_process),
for images the service's micro-batcher, with its settings, feeding the image worker process
(service.batching, service.image_worker). The same engine on a thread of the
callers' own process (models.continuous.AsyncEngine) shows what sharing the GIL with them
costs. For reference the table also shows the engine called with one request at a time (what
`concurrency` callers sharing one engine without a batcher would get).
The two sides alternate in short rounds so that drifting machine load biases neither.
Models come from the BentoML store (BENTOML_HOME), GPT_MODEL / GAN_MODEL as for the service.
Note that the HTTP clients run on the same machine and take CPU from the server.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks import cli

REPO = Path(__file__).resolve().parents[1]
WARM_UP_S = 2.0  # untimed, before the rounds: every batch shape seen once, on both sides


@dataclass
class Result:
    requests: int
    units: int  # generated tokens or images
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def ups(self) -> float:
        return self.units / self.seconds


def load_text_engine(device: str):
    import bentoml

    from models.engine import CompletionRequest, TextEngine

    model_dir = bentoml.models.get(os.environ.get("GPT_MODEL", "gpt:latest")).path
    engine = TextEngine.load(model_dir, device=device)
    engine.model_dir = str(model_dir)  # for the engine process, which loads its own copy
    engine.complete([CompletionRequest(prompt="warm", seed=0, max_tokens=2)])
    return engine


def load_image_engine(device: str):
    import bentoml

    from models.image_engine import ImageEngine, ImageRequest

    model_dir = bentoml.models.get(os.environ.get("GAN_MODEL", "gan:latest")).path
    engine = ImageEngine.load(model_dir, device=device)
    engine.model_dir = str(model_dir)  # for the image worker process, which loads its own copy
    engine.generate([ImageRequest(prompt="warm", seed=0)])
    return engine


def in_process_text(engine, batch: int, seconds: float, max_tokens: int) -> Result:
    """`batch` requests per engine call, back to back (batch=1: no batching at all)."""
    from models.engine import CompletionRequest

    done = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        reqs = [CompletionRequest(prompt=f"Request {done + i}:", seed=done + i, max_tokens=max_tokens)
                for i in range(batch)]
        tokens += sum(c.completion_tokens for c in engine.complete(reqs))
        done += batch
    return Result(done, tokens, time.perf_counter() - start)


def in_process_served_text(engine, concurrency: int, seconds: float, max_tokens: int, process: bool) -> Result:
    """The service's text path without HTTP: `concurrency` closed-loop callers of the
    continuous-batching engine, in one event loop. process=True: in its own process, as the
    service runs it (models.engine_process.EngineProcess); False: on a thread of this process
    (models.continuous.AsyncEngine), where the callers' Python shares the GIL with decoding."""
    from models.continuous import AsyncEngine, ContinuousEngine, SchedulerConfig
    from models.engine import CompletionRequest
    from models.engine_process import EngineProcess, EngineSpec

    if process:
        served = EngineProcess(EngineSpec(engine.model_dir, engine.device.type, torch_threads(), SchedulerConfig()))
    else:
        served = AsyncEngine(ContinuousEngine(engine, SchedulerConfig()))
    counter = {"requests": 0, "units": 0}

    async def caller(w: int, start: float) -> None:
        i = w
        while time.perf_counter() - start < seconds:
            req = CompletionRequest(prompt=f"Request {i}:", seed=i, max_tokens=max_tokens)
            tokens = sum([ev.num_tokens async for ev in served.generate(req)])  # awaits: not inside +=
            counter["units"] += tokens
            counter["requests"] += 1
            i += concurrency

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(caller(w, start) for w in range(concurrency)))
        return time.perf_counter() - start

    try:
        elapsed = asyncio.run(run())
    finally:
        served.shutdown()
    return Result(counter["requests"], counter["units"], elapsed)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def in_process_images(engine, batch: int, seconds: float, n: int) -> Result:
    from models.image_engine import ImageRequest
    from service.encode import encode_png  # the service encodes PNGs too: count it on both sides

    done = images = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        reqs = [ImageRequest(prompt=f"a shape {done + i}", seed=done + i, n=n) for i in range(batch)]
        for imgs in engine.generate(reqs):
            for img in imgs:
                encode_png(img, {"prompt": "x", "seed": 0})
            images += len(imgs)
        done += batch
    return Result(done, images, time.perf_counter() - start)


class ServedImages:
    """The service's image path without HTTP: closed-loop callers submit jobs to the service's
    micro-batcher, with the service's settings, whose batches go to an image worker process
    (forward pass and PNG encoding), as in service/app.py. The worker and the event loop
    (uvloop, as the service's, where installed) live across rounds, as the server's do."""

    def __init__(self, engine):
        from models.image_engine import ImageEngine
        from service.config import IMAGE_MAX_BATCH
        from service.image_worker import ImageWorker

        self.worker = ImageWorker(ImageEngine, engine.model_dir, engine.device.type, torch_threads(), IMAGE_MAX_BATCH)
        self.worker.wait_started()
        try:
            import uvloop
        except ImportError:
            uvloop = None
        self.loop = asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None)

    def run(self, concurrency: int, seconds: float, n: int) -> Result:
        from models.image_engine import ImageEngine, ImageRequest
        from service.app import image_batcher, image_parameters
        from service.batching import Job, MicroBatcher

        counter = {"requests": 0, "units": 0}

        async def run_batch(jobs: list[Job[ImageRequest]]) -> None:
            params = [[image_parameters(j.payload, i, "gan") for i in range(j.payload.n)] for j in jobs]
            for job, pngs in zip(jobs, await self.worker.generate_pngs([j.payload for j in jobs], params)):
                job.future.set_result(pngs)

        async def caller(batcher: MicroBatcher, w: int, start: float) -> None:
            i = w
            while time.perf_counter() - start < seconds:
                job = Job(ImageRequest(prompt=f"a shape {i}", seed=i, n=n), cost=n,
                          future=asyncio.get_running_loop().create_future())
                batcher.submit(job)
                pngs = await job.future  # awaited first: not inside +=
                counter["units"] += len(pngs)
                counter["requests"] += 1
                i += concurrency

        async def run() -> float:
            batcher = image_batcher(run_batch, service_metrics(), ImageEngine, "gan")  # the service's, for a GAN
            start = time.perf_counter()
            await asyncio.gather(*(caller(batcher, w, start) for w in range(concurrency)))
            elapsed = time.perf_counter() - start
            await batcher.close()
            return elapsed

        elapsed = self.loop.run(run())
        return Result(counter["requests"], counter["units"], elapsed)

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.loop.close()


@functools.cache
def service_metrics():
    """The service's metric objects, created once: prometheus registers each name once per process."""
    from service.metrics import get_metrics

    return get_metrics()


async def over_http(url: str, path: str, make_body, count_units, concurrency: int, seconds: float) -> Result:
    """`concurrency` closed-loop clients. aiohttp, not httpx: the clients share the machine with
    the server, and aiohttp spends about a third of httpx's CPU per request (measured here:
    10 % of a core against 31 % at 340 requests/s)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        async with client.post(path, json=make_body(0)) as r:  # warm the connection path
            await r.read()
        counter = {"requests": 0, "units": 0}
        start = time.perf_counter()

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() - start < seconds:
                async with client.post(path, json=make_body(i)) as r:
                    r.raise_for_status()
                    body = await r.json()
                counter["requests"] += 1
                counter["units"] += count_units(body)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return Result(counter["requests"], counter["units"], time.perf_counter() - start)


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "service.app:Generation",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("server not ready after 180 s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="", help="a running server; empty = start `bentoml serve` here")
    p.add_argument("--concurrency", type=cli.at_least(1), default=8,
                   help="simultaneous clients (and in-process batch size)")
    p.add_argument("--seconds", type=cli.positive, default=30, help="measuring time per side and kind, split in rounds")
    p.add_argument("--rounds", type=cli.at_least(1), default=3, help="alternations between HTTP and in-process")
    p.add_argument("--max_tokens", type=cli.at_least(1), default=32, help="tokens per completion")
    p.add_argument("--images_per_request", type=cli.at_least(1), default=1, help="n of each image request")
    p.add_argument("--device", default="auto", type=cli.device, help="device of the in-process engines")
    p.add_argument("--threads", type=cli.at_least(0), default=0,
                   help="torch CPU threads, in-process and per engine process of the server it starts "
                        "(0: torch's default in-process, the server's own default there)")
    p.add_argument("--only", choices=["text", "images", "both"], default="both", help="what to measure")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    for kind, env_var, model in (("text", "GPT_MODEL", "text"), ("images", "GAN_MODEL", "image")):
        if args.only in (kind, "both") and os.environ.get(env_var) == "":
            p.error(f"{env_var} is empty, so no {model} model is served: measure the other kind (--only)")

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["CONDGEN_TORCH_THREADS"] = str(args.threads)  # inherited by the server started below
    proc = None
    url = args.url
    if not url:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(port)
        url = f"http://127.0.0.1:{port}"
    report: dict = {"concurrency": args.concurrency, "seconds": args.seconds, "rounds": args.rounds,
                    "threads": args.threads, "max_tokens": args.max_tokens,
                    "images_per_request": args.images_per_request}
    c, secs, n = args.concurrency, args.seconds / args.rounds, args.images_per_request
    kinds = {
        "text": ("tokens", "/complete", load_text_engine,
                 lambda i: {"prompt": f"Request {i}:", "seed": i, "max_tokens": args.max_tokens},
                 lambda body: body["usage"]["completion_tokens"],
                 lambda engine, batch: in_process_text(engine, batch, secs, args.max_tokens)),
        "images": ("images", "/generate", load_image_engine,
                   lambda i: {"prompt": f"a shape {i}", "seed": i, "n": n},
                   lambda body: len(body["images"]),
                   lambda engine, batch: in_process_images(engine, batch, secs, n)),
    }
    try:
        for kind, (unit, path, load, make_body, count_units, local_run) in kinds.items():
            if args.only not in (kind, "both"):
                continue
            engine = load(args.device)
            if kind == "images":
                served_images = ServedImages(engine)
                served_images.run(c, WARM_UP_S, n)
            asyncio.run(over_http(url, path, make_body, count_units, c, WARM_UP_S))
            http, batched, single, served, threaded = [], [], [], [], []
            # Interleaved short rounds: a machine whose load drifts (shared CPUs) biases neither side.
            for _ in range(args.rounds):
                http.append(asyncio.run(over_http(url, path, make_body, count_units, c, secs)))
                batched.append(local_run(engine, c))
                single.append(local_run(engine, 1))
                if kind == "text":
                    served.append(in_process_served_text(engine, c, secs, args.max_tokens, process=True))
                    threaded.append(in_process_served_text(engine, c, secs, args.max_tokens, process=False))
                else:
                    served.append(served_images.run(c, secs, n))
            if kind == "images":
                served_images.shutdown()
            del engine
            report[kind] = _row(kind, unit, _sum(http), _sum(batched), _sum(single), _sum(served),
                                _sum(threaded) if threaded else None)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _sum(results: list[Result]) -> Result:
    return Result(sum(r.requests for r in results), sum(r.units for r in results), sum(r.seconds for r in results))


def _ratio(a: Result, b: Result) -> float:
    return a.ups / b.ups if b.ups else float("nan")


def _row(name: str, unit: str, http: Result, batched: Result, single: Result, served: Result,
         threaded: Result | None) -> dict:
    print(f"{name:7s} HTTP {http.rps:7.1f} req/s {http.ups:8.1f} {unit}/s | in-process, batches of the same "
          f"concurrency {batched.rps:7.1f} req/s {batched.ups:8.1f} {unit}/s -> HTTP/in-process "
          f"{_ratio(http, batched):6.1%} | in-process one request per call {single.ups:8.1f} {unit}/s -> "
          f"{_ratio(http, single):6.1%}")
    row = {"http_rps": http.rps, f"http_{unit}_per_s": http.ups,
           "inproc_batched_rps": batched.rps, f"inproc_batched_{unit}_per_s": batched.ups,
           "ratio": _ratio(http, batched),
           f"inproc_single_{unit}_per_s": single.ups, "ratio_vs_single": _ratio(http, single)}
    what = "engine process (continuous batching)" if name == "text" else "batcher and image worker process"
    print(f"{'':7s} no HTTP, the service's {what}, same concurrency "
          f"{served.rps:7.1f} req/s {served.ups:8.1f} {unit}/s -> HTTP/that {_ratio(http, served):6.1%}")
    row.update({"inproc_served_rps": served.rps, f"inproc_served_{unit}_per_s": served.ups,
                "ratio_vs_served": _ratio(http, served)})
    if threaded is not None:
        print(f"{'':7s} no HTTP, the same engine on a thread of the callers' process "
              f"{threaded.rps:7.1f} req/s {threaded.ups:8.1f} {unit}/s -> HTTP/that {_ratio(http, threaded):6.1%}")
        row.update({"inproc_thread_rps": threaded.rps, f"inproc_thread_{unit}_per_s": threaded.ups,
                    "ratio_vs_thread": _ratio(http, threaded)})
    return row


if __name__ == "__main__":
    main()
