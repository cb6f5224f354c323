"""Serving simulation, in-process: the same Poisson trace of requests with mixed prompt and
output lengths, served three ways, side by side in one run:

  one-at-a-time  a single request at a time (TextEngine, batch of 1)
  static         whatever is queued (up to --max_batch) runs as one batch to the end; a
                 finished request leaves the batch and gets its answer at once (our engine)
  static padded  the same batches as Hugging Face `generate` runs them: every row decodes
                 until the batch's longest request is done, and every answer comes then
  continuous     ContinuousEngine: requests join and leave between decode steps (eager, as
                 the static policies, unless --cuda_graphs 1: on a GPU, graphs alone make the
                 step 2-4x faster, which is not what this comparison is about)

Prints aggregate tokens/s, p50/p95 latency and p50/p95 time to first token, then the
closed-loop ratio of aggregate tokens/s at --streams concurrent streams to one stream (median
of --repeats runs after a warm-up run).
Needs torch only.   python -m benchmarks.serving_sim --requests 64 --rate 6
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from benchmarks import cli
from models.continuous import ContinuousEngine, SchedulerConfig
from models.engine import CompletionRequest, TextEngine, pick_device
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

WORDS = "the of and to in is for that with value return object module function class file name list".split()


@dataclass
class Trace:
    arrival: float
    req: CompletionRequest
    first: float = 0.0
    done: float = 0.0
    tokens: int = 0
    ttft_set: bool = field(default=False)


def make_trace(n: int, rate: float, seed: int, max_prompt_words: int, max_new: int) -> list[Trace]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, max_prompt_words)))
        new = rng.choice([max_new // 8, max_new // 4, max_new // 2, max_new])  # a mix of short and long
        out.append(Trace(t, CompletionRequest(prompt, seed=i, max_tokens=new, sampling=SamplingParams(temperature=1.0))))
    return out


def on_event(tr: Trace, now: float, num_tokens: int, finished: bool) -> None:
    if num_tokens and not tr.ttft_set:
        tr.first, tr.ttft_set = now, True
    tr.tokens += num_tokens
    if finished:
        tr.done = now


def serve_batches(engine: TextEngine, trace: list[Trace], max_batch: int, padded: bool = False) -> None:
    """One-at-a-time (max_batch=1) and static batching: run what is queued, to the end. Padded,
    every row runs to the batch's longest max_tokens and answers then; only the tokens a
    request asked for count."""
    start, pending = time.perf_counter(), list(trace)
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival > now:
            time.sleep(pending[0].arrival - now)
            continue
        batch = [tr for tr in pending if tr.arrival <= now][:max_batch]
        pending = [tr for tr in pending if tr not in batch]
        longest = max(tr.req.max_tokens for tr in batch)
        reqs = [replace(tr.req, max_tokens=longest) if padded else tr.req for tr in batch]
        made = [0] * len(batch)
        for ev in engine.stream(reqs):
            tr, made[ev.request] = batch[ev.request], made[ev.request] + ev.num_tokens
            wanted = ev.num_tokens if made[ev.request] <= tr.req.max_tokens else 0
            on_event(tr, time.perf_counter() - start, wanted, ev.finish_reason is not None and not padded)
        if padded:
            end = time.perf_counter() - start
            for tr in batch:
                tr.done = end


def serve_continuous(engine: TextEngine, trace: list[Trace], max_running: int, cuda_graphs: bool = False) -> None:
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=max_running, max_waiting=len(trace) + 1,
                                                    cuda_graphs=cuda_graphs))
    start, pending, by_id = time.perf_counter(), list(trace), {}
    while pending or cont.has_work():
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            tr = pending.pop(0)
            by_id[cont.add(tr.req)] = tr
        if not cont.has_work():
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        for ev in cont.step():
            on_event(by_id[ev.request], time.perf_counter() - start, ev.num_tokens, ev.finish_reason is not None)


def report(name: str, trace: list[Trace]) -> dict:
    lat = [tr.done - tr.arrival for tr in trace]
    ttft = [tr.first - tr.arrival for tr in trace]
    span = max(tr.done for tr in trace) - min(tr.arrival for tr in trace)
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    row = dict(tps=sum(tr.tokens for tr in trace) / span, p50=q(lat, 50), p95=q(lat, 95), ttft50=q(ttft, 50),
               ttft95=q(ttft, 95))
    print(f"{name:<14} {row['tps']:>9.1f} {row['p50']:>8.2f} {row['p95']:>8.2f} {row['ttft50']:>9.3f} {row['ttft95']:>9.3f}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=cli.at_least(1), default=64, help="requests in the Poisson trace")
    ap.add_argument("--rate", type=cli.not_negative, default=6.0, help="mean arrivals per second")
    ap.add_argument("--max_new", type=cli.at_least(8), default=96,
                    help="longest completion; others are 1/8, 1/4, 1/2 of it")
    ap.add_argument("--max_prompt_words", type=cli.at_least(2), default=24, help="longest prompt, in words")
    ap.add_argument("--max_batch", type=cli.at_least(1), default=32, help="static batch size / continuous slots")
    ap.add_argument("--streams", type=cli.at_least(1), default=32, help="concurrent streams for the closed-loop ratio")
    ap.add_argument("--n_layer", type=cli.at_least(1), default=4,
                    help="model depth (random weights, small preset shape)")
    ap.add_argument("--n_embd", type=cli.at_least(1), default=128, help="model width")
    ap.add_argument("--device", default="auto", type=cli.device, help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="trace seed")
    ap.add_argument("--repeats", type=cli.at_least(1), default=3,
                    help="closed-loop runs per setting, after a warm-up run")
    ap.add_argument("--cuda_graphs", type=int, default=0, choices=(0, 1),
                    help="1: the continuous engine replays its decode step as CUDA graphs, as the service does; "
                         "the static policies run eagerly, so the comparison is then no longer batching alone")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch CPU threads (0 = torch's default); 1 is "
                                                           "steadier on a machine shared with other work")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = Tokenizer.train([" ".join(WORDS) * 50], 512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, block_size=256, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd))
    engine = TextEngine(model, tok, device=pick_device(args.device))
    engine.complete([CompletionRequest("the value", seed=0, max_tokens=8)])  # warm-up
    print(f"device={engine.device} threads={torch.get_num_threads()} requests={args.requests} rate={args.rate}/s "
          f"max_new={args.max_new} cuda_graphs={args.cuda_graphs}")
    print(f"{'policy':<14} {'tokens/s':>9} {'p50 s':>8} {'p95 s':>8} {'ttft50 s':>9} {'ttft95 s':>9}")
    rows = {}
    for name, serve in [("one-at-a-time", lambda t: serve_batches(engine, t, 1)),
                        ("static", lambda t: serve_batches(engine, t, args.max_batch)),
                        ("static padded", lambda t: serve_batches(engine, t, args.max_batch, padded=True)),
                        ("continuous", lambda t: serve_continuous(engine, t, args.max_batch, bool(args.cuda_graphs)))]:
        trace = make_trace(args.requests, args.rate, args.seed, args.max_prompt_words, args.max_new)
        serve(trace)
        rows[name] = report(name, trace)
    for static in ("static", "static padded"):
        print(f"continuous / {static} throughput: {rows['continuous']['tps'] / rows[static]['tps']:.2f}x, "
              f"p95 latency {rows['continuous']['p95']:.2f}s vs {rows[static]['p95']:.2f}s")

    # All requests present at t=0, equal lengths. Each setting runs once to warm up (its
    # first run allocates the engine's buffers), then the median of --repeats runs counts.
    closed = {}
    for streams in (1, args.streams):
        runs = []
        for _ in range(1 + args.repeats):
            trace = [Trace(0.0, CompletionRequest("the value of the object", seed=i, max_tokens=args.max_new,
                                                  sampling=SamplingParams(temperature=1.0))) for i in range(streams)]
            serve_continuous(engine, trace, streams, bool(args.cuda_graphs))
            runs.append(sum(tr.tokens for tr in trace) / max(tr.done for tr in trace))
        closed[streams] = statistics.median(runs[1:])
    print(f"closed loop: 1 stream {closed[1]:.1f} tokens/s, {args.streams} streams {closed[args.streams]:.1f} "
          f"tokens/s, ratio {closed[args.streams] / closed[1]:.1f}x")


if __name__ == "__main__":
    main()
