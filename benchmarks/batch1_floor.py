"""How close a batch-1 decode step can get to the memory system, by model size.

At batch 1 a decode step reads every weight once, so its time is bounded below by
bytes / bandwidth. For GPT-2 shapes (random weights), this times, at batch 1:
  - the model's matrix products alone (four per layer and the vocabulary projection,
    nothing else), as one CUDA graph on CUDA: the floor PyTorch's matrix kernels set;
  - the engine's decode forward pass (models/decode_graphs.py: one graph replay on CUDA,
    the same step eagerly on the CPU), with 128 cache positions;
each as bandwidth use = bytes of weights / time / the device's bandwidth (a measured copy).

Needs torch only.   python -m benchmarks.batch1_floor              # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import cli
from benchmarks.bandwidth import copy_bandwidth
from models.decode_graphs import DecodeGraphs
from models.engine import pick_device
from models.gpt import GPT, GPTConfig

SHAPES = {  # (n_layer, n_head, n_embd), GPT-2's sizes
    "124m": (12, 12, 768), "355m": (24, 16, 1024), "774m": (36, 20, 1280), "1.5b": (48, 25, 1600),
    "tiny": (2, 2, 32),  # for a quick check on the CPU
}


def per_call(fn: Callable[[], object], sync: Callable[[], None], calls: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls


def as_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured as a CUDA graph (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.inference_mode()
def measure(shape: str, device: torch.device, bandwidth: float, calls: int) -> dict:
    n_layer, n_head, n_embd = SHAPES[shape]
    cuda, sync = device.type == "cuda", torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with device:
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50304))
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    weights = (model.num_params() - model.transformer.wpe.weight.numel()) * model.lm_head.weight.element_size()
    x = torch.randn(1, n_embd, device=device, dtype=model.lm_head.weight.dtype)
    x4 = x.repeat(1, 4)  # the MLP's second matrix takes the 4x wider hidden state
    mats = [m.weight for block in model.transformer.h
            for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]

    def matrix_products() -> None:
        for w in mats:
            F.linear(x if w.size(1) == n_embd else x4, w)
        model.lm_head(x)

    model.setup_caches(1, 1024)
    step = DecodeGraphs(model, 1, capture=cuda)
    forward = (lambda: step([5], [100], 128))
    t_mm = per_call(as_graph(matrix_products) if cuda else matrix_products, sync, calls)
    t_fwd = per_call(forward, sync, calls)
    return {"shape": shape, "params": model.num_params(), "weight_bytes": weights,
            "matrix_products_s": t_mm, "matrix_products_use": weights / t_mm / bandwidth,
            "forward_s": t_fwd, "forward_use": weights / t_fwd / bandwidth}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=["124m", "355m", "774m", "1.5b"])
    ap.add_argument("--device", default="auto", type=cli.device, help="auto, cpu or cuda")
    ap.add_argument("--calls", type=cli.at_least(1), default=200, help="timed calls per figure")
    ap.add_argument("--copy_mib", type=cli.at_least(1), default=1024, help="size of the copy that measures bandwidth")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    bandwidth = copy_bandwidth(device, args.copy_mib)
    print(f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"bandwidth={bandwidth / 1e9:.0f} GB/s (measured copy)")
    rows = []
    for shape in args.shapes:
        r = measure(shape, device, bandwidth, args.calls)
        print(f"{shape:>5}: {r['params'] / 1e6:6.0f}M params, {r['weight_bytes'] / 1e6:6.0f} MB; "
              f"matrix products alone {r['matrix_products_s'] * 1e6:6.0f} us ({r['matrix_products_use']:.1%}); "
              f"decode forward {r['forward_s'] * 1e6:6.0f} us ({r['forward_use']:.1%})")
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
