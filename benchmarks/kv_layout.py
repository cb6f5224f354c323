"""Why a decode step's attention costs what it does on the CPU: the KV cache's layout, measured.

Per layer of a decode step, the engine writes one token's keys and values into a preallocated
cache (B, H, max_seq, D) and attends over its first L positions, a strided view; Hugging Face's
`generate` appends to a compact (B, H, L, D) tensor with torch.cat, copying the whole cache each
step, then attends over the copy. Between two layers the step reads other weights and caches,
so each layer's cache comes back cold (here a matrix product over a 2 MB weight stands in for
them). Prints microseconds per layer (write + attention, then attention alone) for both, at a
short and a long context:
    python -m benchmarks.kv_layout --threads 1
Torch only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import cli


def per_layer_us(layout: str, batch: int, heads: int, head_dim: int, start: int, steps: int,
                 layers: int = 4) -> tuple[float, float, torch.Tensor]:
    """(write + attention, attention alone) in µs per layer, averaged over `steps` decode steps
    that grow the context from `start` tokens, and the last attention output (the same numbers
    go through either layout: the two compute the same thing)."""
    g = torch.Generator().manual_seed(0)
    first = [(torch.randn(batch, heads, start, head_dim, generator=g),
              torch.randn(batch, heads, start, head_dim, generator=g)) for _ in range(layers)]
    if layout == "preallocated":
        caches = []
        for k0, v0 in first:
            k, v = (torch.zeros(batch, heads, start + steps, head_dim) for _ in range(2))
            k[:, :, :start], v[:, :, :start] = k0, v0
            caches.append((k, v))
    else:
        caches = first
    weight, x = torch.randn(4096, 128, generator=g), torch.randn(batch, 128, generator=g)
    total = attention = 0.0
    for step in range(steps):
        length = start + step + 1
        for layer in range(layers):
            q, k, v = torch.randn(batch, 1, 3 * heads * head_dim, generator=g).chunk(3, dim=2)
            q, k, v = (t.view(batch, 1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            x @ weight.T  # the rest of the step, between this layer's turns: evicts its cache
            t0 = time.perf_counter()
            keys, values = caches[layer]
            if layout == "preallocated":
                keys[:, :, length - 1] = k[:, :, 0]
                values[:, :, length - 1] = v[:, :, 0]
                keys, values = keys[:, :, :length], values[:, :, :length]
            else:
                keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
                caches[layer] = (keys, values)
            t1 = time.perf_counter()
            out = F.scaled_dot_product_attention(q, keys, values)
            t2 = time.perf_counter()
            total, attention = total + t2 - t0, attention + t2 - t1
    n = steps * layers / 1e6
    return total / n, attention / n, out


def main(argv: list[str] | None = None) -> dict[tuple[int, int], dict[str, tuple[float, float]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=cli.at_least(1), nargs="+", default=[1, 32])
    ap.add_argument("--contexts", type=cli.at_least(0), nargs="+", default=[11, 180],
                    help="context lengths to start from")
    ap.add_argument("--steps", type=cli.at_least(1), default=64, help="decode steps per run")
    ap.add_argument("--repeats", type=cli.at_least(1), default=7, help="runs per figure, alternating (median reported)")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"small model's attention (4 heads of 32), {args.steps} steps, threads={torch.get_num_threads()}; "
          "µs per layer, write + attention (attention alone)")
    print(f"{'batch':>5} {'context':>9} {'preallocated':>20} {'cat (transformers)':>20}")
    results = {}
    for batch in args.batch:
        for start in args.contexts:
            runs: dict[str, list[tuple[float, float]]] = {"preallocated": [], "cat": []}
            outputs = {}
            for _ in range(args.repeats):
                for layout in runs:
                    *times, outputs[layout] = per_layer_us(layout, batch, 4, 32, start, args.steps)
                    runs[layout].append(tuple(times))
            torch.testing.assert_close(outputs["preallocated"], outputs["cat"])  # the same attention
            results[batch, start] = {layout: tuple(statistics.median(v[i] for v in values) for i in (0, 1))
                                     for layout, values in runs.items()}
            cells = [f"{both:8.1f} ({alone:7.1f})" for both, alone in results[batch, start].values()]
            print(f"{batch:>5} {f'{start}-{start + args.steps}':>9} {cells[0]:>20} {cells[1]:>20}")
    return results


if __name__ == "__main__":
    main()
