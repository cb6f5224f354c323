"""Decode speed against the memory system, and batch invariance, on the device at hand.

For a model size (random weights), on CUDA in bf16 or on the CPU in float32, side by side:
the static engine (TextEngine), the continuous-batching engine stepping eagerly, and (on
CUDA) the continuous engine replaying its decode step as CUDA graphs, which is what the
service runs. For each:
  - tokens/s at each --batch (decode steps only: a run of one token, the prefill, is
    subtracted from a run of --new_tokens);
  - at batch 1, memory bandwidth use = (bytes of weights + KV cache read per step) / step
    time / the device's bandwidth. A decode step at batch 1 must read every weight once, so
    this says how close the engine gets to the memory system's limit. The bandwidth is the
    one measured here by a large device copy (read + write), or --peak_gbs (the data sheet's);
  - with --compile, a fourth path: the graphed engine with its decode step compiled by
    torch.compile before capture;
  - batch invariance: how many of --trials seeded requests yield the same tokens alone as
    inside a batch of 8 with other, different requests (on the CPU in float32 the logits
    agree to about 1e-6, so nearly always: see benchmarks/invariance.py; bf16 kernels on a
    GPU round differently with the batch shape).

Needs torch only.
    python -m benchmarks.bandwidth --size gpt2-124m --batch 1 64        # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from benchmarks import cli
from benchmarks.decode import PROMPT, SIZES, run_continuous, timed_rounds
from models.continuous import ContinuousEngine, SchedulerConfig
from models.decode_graphs import DecodeGraphs
from models.engine import CompletionRequest, TextEngine, pick_device
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best


Complete = Callable[[list[CompletionRequest]], list[list[int]]]  # requests -> first choice's tokens


def static_path(engine: TextEngine) -> Complete:
    return lambda reqs: [c.choices[0].token_ids for c in engine.complete(reqs)]


def continuous_path(cont: ContinuousEngine) -> Complete:
    return lambda reqs: [choices[0] for choices in run_continuous(cont, reqs)]


def replay_seconds(graphs: DecodeGraphs, sync, replays: int = 200) -> float:
    """Seconds of one replay of the batch-1 decode graph with the shortest cache bucket: the
    forward pass alone, without the scheduler and sampler around it."""
    graph, _ = graphs.graphs[1, graphs.kv_sizes[0]]
    graph.replay()
    sync()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    sync()
    return (time.perf_counter() - t) / replays


def invariance(complete: Complete, trials: int, new_tokens: int) -> int:
    """Of `trials` seeded requests, how many decode the same tokens alone as in a batch of 8."""
    same = 0
    for t in range(trials):
        target = CompletionRequest(PROMPT, seed=1000 + t, max_tokens=new_tokens,
                                   sampling=SamplingParams(temperature=1.0))
        others = [CompletionRequest("the of and " * (i + 1), seed=t * 8 + i, max_tokens=new_tokens // 2 + i,
                                    sampling=SamplingParams(temperature=0.7, top_k=40)) for i in range(7)]
        same += complete([target])[0] == complete(others[:3] + [target] + others[3:])[3]
    return same


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="gpt2-124m", help="model shape (random weights)")
    ap.add_argument("--batch", type=cli.at_least(1), nargs="+", default=[1, 64], help="batch sizes to measure")
    ap.add_argument("--new_tokens", type=cli.at_least(2), default=128, help="tokens generated per sequence")
    ap.add_argument("--trials", type=cli.at_least(1), default=16, help="requests checked for batch invariance")
    ap.add_argument("--device", default="auto", type=cli.device, help="auto, cpu or cuda")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="auto: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--peak_gbs", type=cli.not_negative, default=0.0,
                    help="the device's memory bandwidth in GB/s (0 = measure a large copy)")
    ap.add_argument("--compile", action="store_true",
                    help="on CUDA, also the graphed engine with its decode step compiled before capture")
    ap.add_argument("--copy_mib", type=cli.at_least(1), default=1024, help="size of the copy that measures bandwidth")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SIZES[args.size]
    tok = Tokenizer.train([PROMPT * 40, "the of and to in is for that with " * 40], 512)
    torch.manual_seed(0)
    engine = TextEngine(GPT(GPTConfig(**shape)), tok, device=device,
                        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    model, elem = engine.model, torch.finfo(engine.dtype).bits // 8
    prompt_len = len(tok.encode(PROMPT))
    n = min(args.new_tokens, shape["block_size"] - prompt_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = args.peak_gbs * 1e9 or copy_bandwidth(device, args.copy_mib)
    print(f"device={name} dtype={engine.dtype} size={args.size} params={model.num_params() / 1e6:.1f}M "
          f"prompt={prompt_len} new_tokens={n} bandwidth={bandwidth / 1e9:.0f} GB/s "
          f"({'given' if args.peak_gbs else 'measured copy'})")
    slots = max(max(args.batch), 8)
    paths = {"static": static_path(engine),
             "continuous": continuous_path(ContinuousEngine(engine, SchedulerConfig(slots, cuda_graphs=False)))}
    graphed: dict[str, ContinuousEngine] = {}
    if device.type == "cuda":
        for p, compiled in [("continuous+graphs", False)] + [("compiled+graphs", True)] * args.compile:
            t = time.perf_counter()
            graphed[p] = ContinuousEngine(engine, SchedulerConfig(slots, cuda_graphs=not compiled))
            if compiled:
                graphed[p].graphs = DecodeGraphs(model, slots, compile=True)
            print(f"{p}: {'compiled and ' * compiled}captured {len(graphed[p].graphs.graphs)} CUDA graphs "
                  f"in {time.perf_counter() - t:.1f} s")
            paths[p] = continuous_path(graphed[p])
    weights = (model.num_params() - model.transformer.wpe.weight.numel()) * elem  # wpe: one row a step

    def kv_read(positions: float) -> float:  # bytes of keys + values attended to, all layers
        return 2 * model.config.n_layer * positions * model.config.n_embd * elem

    kv = kv_read(prompt_len + n / 2)  # the mean length of a run
    result: dict = {"device": name, "dtype": str(engine.dtype), "size": args.size, "new_tokens": n,
                    "bandwidth_gbs": bandwidth / 1e9, "bytes_per_step": weights + kv, "paths": {}}
    for b in args.batch:
        produced: dict[tuple[str, int], int] = {}

        def run(path: str, max_tokens: int):
            def go():
                reqs = [CompletionRequest(PROMPT, seed=i, max_tokens=max_tokens, ignore_eos=True,  # every step
                                          sampling=SamplingParams(temperature=1.0)) for i in range(b)]
                produced[path, max_tokens] = sum(map(len, paths[path](reqs)))
            return go

        secs = timed_rounds({(p, m): run(p, m) for p in paths for m in (n, 1)}, 3, sync)
        for p in paths:
            step = (secs[p, n] - secs[p, 1]) / (n - 1)  # one decode step (all rows)
            tps = (produced[p, n] - produced[p, 1]) / (secs[p, n] - secs[p, 1])
            row = result["paths"].setdefault(p, {"tokens_per_s": {}})
            row["tokens_per_s"][b] = tps
            line = f"{p:<18} batch {b:>3}: {tps:10.1f} tokens/s, {step * 1e3:7.3f} ms per decode step"
            if b == 1:
                row["bandwidth_use"] = (weights + kv) / step / bandwidth
                line += f", {(weights + kv) / 1e6:.1f} MB read per step -> bandwidth use {row['bandwidth_use']:.1%}"
            print(line)
    for p, cont in graphed.items():
        fwd = replay_seconds(cont.graphs, sync)
        result["paths"][p].update(graph_replay_s=fwd,
                                  graph_replay_bandwidth_use=(weights + kv_read(cont.graphs.kv_sizes[0])) / fwd / bandwidth)
        print(f"{p:<18} decode forward alone (one graph replay, batch 1, {cont.graphs.kv_sizes[0]} cache slots): "
              f"{fwd * 1e6:.0f} us -> bandwidth use {result['paths'][p]['graph_replay_bandwidth_use']:.1%}")
    for p, complete in paths.items():
        same = invariance(complete, args.trials, min(n, 32))
        result["paths"][p].update(invariant=same, trials=args.trials)
        print(f"{p:<18} batch invariance: {same} of {args.trials} seeded requests decode the same tokens "
              f"alone and in a batch of 8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
