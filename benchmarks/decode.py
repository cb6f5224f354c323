"""Decode throughput, side by side in one run, on the same weights and prompts:

  (a) our KV-cache engine (models.engine.TextEngine)
  (a') on CUDA: the continuous-batching engine replaying its decode step as CUDA graphs, as served
  (b) the same model recomputing the whole prefix every step (nanoGPT's `generate`)
  (c) Hugging Face `transformers` `generate` (KV cache too), on the same weights via the GPT-2 import
  with --batch_invariant also (a) in the exact batch-invariant mode (GPT.set_batch_invariant), to show its cost

Needs torch only ((c) is skipped when transformers is missing).
    python -m benchmarks.decode --size small --batch 1 32 --new_tokens 64
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable

import torch

from benchmarks import cli
from models.continuous import ContinuousEngine, SchedulerConfig
from models.engine import CompletionRequest, TextEngine, pick_device, reference_generate
from models.gpt import GPT, GPTConfig, from_hf_gpt2
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

SIZES = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}
PROMPT = "Return the value of the named attribute of the object."
ENGINE, GRAPHED, EXACT = "(a) KV-cache engine", "(a') continuous, CUDA graphs", "(a) batch-invariant mode"


def timed_rounds(paths: dict[Hashable, Callable[[], None]], repeats: int, sync) -> dict[Hashable, float]:
    """Median seconds per path. Paths alternate within each round, so a change in the
    machine's load hits them all alike (these machines are shared and noisy)."""
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_continuous(cont: ContinuousEngine, reqs: list[CompletionRequest]) -> list[list[list[int]]]:
    """Run requests to the end on a continuous engine; each request's choices' tokens."""
    ids = [cont.add(r) for r in reqs]
    tokens = {gid: [[] for _ in range(r.n)] for gid, r in zip(ids, reqs)}
    while cont.has_work():
        for ev in cont.step():
            if ev.token_id is not None:
                tokens[ev.request][ev.choice].append(ev.token_id)
    return [tokens[gid] for gid in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small", help="model shape (random weights)")
    ap.add_argument("--batch", type=cli.at_least(1), nargs="+", default=[1, 32], help="batch sizes to measure")
    ap.add_argument("--new_tokens", type=cli.at_least(1), default=64, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=cli.at_least(1), default=3, help="timed runs per figure (median reported)")
    ap.add_argument("--device", default="auto", type=cli.device, help="auto, cpu or cuda")
    ap.add_argument("--skip_recompute", action="store_true", help="skip (b), slow for big models")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--batch_invariant", action="store_true", help="also (a) in the exact batch-invariant mode")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SIZES[args.size]
    tok = Tokenizer.train([PROMPT * 40, "the of and to in is for that with " * 40], 512)
    torch.manual_seed(0)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["block_size"],
                                        n_embd=shape["n_embd"], n_layer=shape["n_layer"], n_head=shape["n_head"]))
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d, safe_serialization=True)
            model = from_hf_gpt2(d)  # (a), (b) and (c) share these exact weights
        hf = hf.to(device, dtype).eval()
    except ImportError:
        hf, model = None, GPT(GPTConfig(**shape))
    engine = TextEngine(model, tok, device=device, dtype=dtype)
    exact = TextEngine(copy.deepcopy(model), tok, device=device, dtype=dtype) if args.batch_invariant else None
    if exact is not None:
        exact.model.set_batch_invariant(True)
    graphed = ContinuousEngine(engine, SchedulerConfig(max(args.batch))) if device.type == "cuda" else None
    prompt_ids = tok.encode(PROMPT)
    n = args.new_tokens
    # temperature 1, no filters: every path does the same sampling work, and every row makes its
    # n tokens (ignore_eos, as transformers' min_new_tokens: a random model draws end-of-text
    # now and then, and a row that stopped early made its batch smaller for the rest).
    params = SamplingParams(temperature=1.0)

    print(f"device={device} dtype={dtype} size={args.size} params={model.num_params() / 1e6:.1f}M "
          f"prompt={len(prompt_ids)} tokens new_tokens={n} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'path':<32} {'tokens/s':>10} {'vs (c)':>7}")
    for b in args.batch:
        ids = torch.tensor([prompt_ids] * b, device=device)
        reqs = [CompletionRequest(PROMPT, seed=i, max_tokens=n, sampling=params, ignore_eos=True) for i in range(b)]
        produced: dict[str, int] = {}

        def run_engine():
            produced[ENGINE] = sum(c.completion_tokens for c in engine.complete(reqs))

        def run_exact():
            produced[EXACT] = sum(c.completion_tokens for c in exact.complete(reqs))

        def run_hf():
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                            max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        def run_graphed():
            produced[GRAPHED] = sum(len(choices[0]) for choices in run_continuous(graphed, reqs))

        paths = {ENGINE: run_engine}
        if exact is not None:
            paths[EXACT] = run_exact
        if graphed is not None:
            paths[GRAPHED] = run_graphed
        if not args.skip_recompute:
            paths["(b) full recompute"] = lambda: reference_generate(engine.model, [prompt_ids] * b, n, params,
                                                                     list(range(b)))
        if hf is not None:
            paths["(c) transformers generate"] = run_hf
        seconds = timed_rounds(paths, args.repeats, sync)
        tps = {name: produced.get(name, b * n) / secs for name, secs in seconds.items()}
        ref = tps.get("(c) transformers generate")
        for name, value in tps.items():
            ratio = f"{value / ref:6.2f}x" if ref else "   n/a"
            print(f"{b:>5} {name:<32} {value:>10.1f} {ratio:>7}")

if __name__ == "__main__":
    main()
