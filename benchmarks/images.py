"""Image generation throughput of models.image_engine.ImageEngine at batch 1, 8 and 64.

A batch of b is b requests (different prompts and seeds, n=1 each) in one `generate`
call, which is one forward pass: what the service's batcher hands the engine. The
figure that matters for serving is images/s at batch 64 over images/s at batch 1.

    python -m benchmarks.images [--model_dir runs/gan/model] [--device cpu]

Without --model_dir the small preset's architecture runs with random weights (speed
does not depend on the weights). Needs torch only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks import cli
from models.gan import GANConfig, Generator
from models.image_engine import ImageEngine, ImageRequest
from models.tokenizer import Tokenizer

PROMPTS = ["a small red circle on the left, blue background",
           "blue backdrop with a little crimson disc at the left",
           "a large green square at the top on white", "a purple cross in the middle",
           "on a grey background: big cyan triangle to the right"]


def build_engine(model_dir: str, device: str) -> ImageEngine:
    if model_dir:
        return ImageEngine.load(model_dir, device=device)
    torch.manual_seed(0)
    tok = Tokenizer.train(PROMPTS * 20, 512)
    return ImageEngine(Generator(GANConfig(g_ch=16, d_ch=16)), tok, device=device)


def images_per_second(engine: ImageEngine, batch: int, repeats: int) -> float:
    reqs = [ImageRequest(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch)]
    engine.generate(reqs)  # warm-up
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        engine.generate(reqs)
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default="", type=cli.model_dir, help="a model directory (default: random weights)")
    ap.add_argument("--device", default="auto", type=cli.device, help="auto, cpu or cuda")
    ap.add_argument("--batch", type=cli.at_least(1), nargs="+", default=[1, 8, 64], help="batch sizes")
    ap.add_argument("--repeats", type=cli.at_least(1), default=20, help="timed calls per batch size (median)")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model_dir, args.device)
    results = {b: images_per_second(engine, b, args.repeats) for b in args.batch}
    print(f"device {engine.device}, threads {torch.get_num_threads()}, image {engine.image_size}px")
    for b, ips in results.items():
        print(f"batch {b:3d}: {ips:9.1f} images/s")
    report = {"device": str(engine.device), "images_per_s": results}
    if 1 in results and 64 in results:
        report["ratio_64_over_1"] = results[64] / results[1]
        print(f"batch-64 / batch-1 throughput: {report['ratio_64_over_1']:.1f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
