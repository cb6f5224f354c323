"""Batch invariance, measured: how many seeded requests decode the same tokens alone as inside
a batch of 8 with other requests, on the static engine and on the continuous one.

On the CPU in float32 a row's logits depend on the batch in their last bits: MKL picks a
product's kernel by its shape (how many rows share it), and attention rounds
differently with the cache length the batch reads. A token changes when its uniform falls
between the two cumulative distributions, so a long completion occasionally differs. Each
choice's logprobs show the size of the difference (largest |difference| over the tokens the
two runs share).

With --batch_invariant, the exact mode, which makes every row's arithmetic independent of the
batch: none should differ, and the logprobs agree exactly.

On CUDA (--device cuda) the engines run in bf16 and the continuous one replays its decode
step as CUDA graphs, as the service does.

Needs torch only.   python -m benchmarks.invariance --model_dir DIR --requests 320 --max_tokens 100
(DIR: a model directory, e.g. `bentoml models get gpt:latest -o path`; without it, random
weights of the small shape.)
"""
from __future__ import annotations

import argparse
import random

import torch

from benchmarks import cli
from benchmarks.decode import PROMPT, SIZES, run_continuous
from models.continuous import ContinuousEngine, SchedulerConfig
from models.engine import CompletionRequest, TextEngine
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

WORDS = "the value of a module returns object file name list class function data".split()


def requests(n: int, max_tokens: int, seed: int) -> list[CompletionRequest]:
    rng = random.Random(seed)
    return [CompletionRequest(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))), seed=i,
                              max_tokens=max_tokens, logprobs=0, sampling=SamplingParams(temperature=1.0))
            for i in range(n)]


def compare(alone: list[tuple[list[int], list[float]]], batched: list[tuple[list[int], list[float]]]) -> dict:
    """Requests whose tokens differ, and the largest logprob difference over shared tokens."""
    differ, gap = 0, 0.0
    for (tok_a, lp_a), (tok_b, lp_b) in zip(alone, batched):
        shared = next((i for i, (a, b) in enumerate(zip(tok_a, tok_b)) if a != b), min(len(tok_a), len(tok_b)))
        differ += tok_a != tok_b
        gap = max([gap] + [abs(a - b) for a, b in zip(lp_a[:shared], lp_b[:shared])])
    return {"requests": len(alone), "differ": differ, "max_logprob_diff": gap}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default="", type=cli.model_dir,
                    help="a saved model directory (default: random small weights)")
    ap.add_argument("--requests", type=cli.at_least(1), default=64,
                    help="seeded requests, each run alone and in a batch of 8")
    ap.add_argument("--max_tokens", type=cli.at_least(1), default=100, help="tokens per request")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--batch_invariant", action="store_true", help="the exact mode (GPT.set_batch_invariant)")
    ap.add_argument("--device", default="cpu", type=cli.device,
                    help="cpu (float32), cuda (bf16, as the service runs it) or auto")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_dir:
        engine = TextEngine.load(args.model_dir, device=args.device)
    else:
        torch.manual_seed(0)
        # The tokenizer learns the requests' words: 12 of them in 12 tokens, not 29, leave room for 100 more
        tokenizer = Tokenizer.train([PROMPT * 40, " ".join(WORDS) * 40], 512)
        engine = TextEngine(GPT(GPTConfig(**SIZES["small"])), tokenizer, device=args.device)
    engine.model.set_batch_invariant(args.batch_invariant)
    reqs = requests(args.requests, args.max_tokens, seed=0)

    def static(batch: list[CompletionRequest]) -> list[tuple[list[int], list[float]]]:
        return [(c.choices[0].token_ids, [lp.logprob for lp in c.choices[0].logprobs]) for c in engine.complete(batch)]

    cont = ContinuousEngine(engine, SchedulerConfig(max_running=8))  # on the model, in the mode set above

    def continuous(batch: list[CompletionRequest]) -> list[tuple[list[int], list[float]]]:
        return [(choices[0], []) for choices in run_continuous(cont, batch)]  # tokens only

    result = {"device": str(engine.device), "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
              "batch_invariant": args.batch_invariant}
    for name, run in (("static", static), ("continuous", continuous)):
        alone = [run([r])[0] for r in reqs]
        batched = [out for i in range(0, len(reqs), 8) for out in run(reqs[i:i + 8])]
        result[name] = compare(alone, batched)
        r = result[name]
        print(f"{name:<10} {r['differ']} of {r['requests']} requests ({args.max_tokens} tokens) differ alone vs in a "
              f"batch of 8" + (f"; largest logprob difference {r['max_logprob_diff']:.1e}" if name == "static" else ""))
    return result


if __name__ == "__main__":
    main()
