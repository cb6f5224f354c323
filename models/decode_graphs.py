"""The decode step's forward pass at fixed shapes, replayed as CUDA graphs.

At batch 1 a decode step of a GPT-2-sized model launches a few hundred small kernels; in eager
PyTorch each launch costs microseconds of Python and driver time, more than the GPU needs to
run it. A CUDA graph records the launches once and replays them with one call. A graph has
fixed shapes and fixed memory addresses, so the step is captured once per (batch, cache
length) bucket, over static input buffers and the continuous engine's own KV slots (which
never move):

  - the batch is padded up to the next power of two (capped at the slot count) with dummy
    rows that write at the cache's last position, which no sequence reads before writing it;
  - attention reads the first `kv` cache positions, the smallest bucket (128, 256, ... up to
    the cache length) that holds every live position; the mask is computed from the
    positions inside the graph.

On the CPU the same padded step runs eagerly (`capture=False`), which is how the tests check
it against the engine's usual step.

With `compile=True` the step is compiled by `torch.compile` (dynamic shapes: four compilations
serve all buckets) before it is captured, so each graph replays fused kernels (a layer norm
with its residual add, the cache write with the mask) instead of one kernel per operation.
The engine does not use it: on an H200 it saved 12 % of a batch-1 replay and made batch 64
3.4x slower (`python -m benchmarks.bandwidth --compile`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.gpt import GPT

# Attention kernels for the captured step, in order of preference (the first that takes the shape).
GRAPH_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def buckets(limit: int, first: int) -> list[int]:
    """first, 2*first, 4*first, ... below limit, then limit itself."""
    sizes, b = [], first
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


class DecodeGraphs:
    """Next-token logits for cache slots [0, n), at fixed shapes (see the module docstring)."""

    def __init__(self, model: GPT, max_batch: int, capture: bool = True, compile: bool = False):
        self.model = model
        self.step = torch.compile(self._forward, dynamic=True, fullgraph=True) if compile else self._forward
        device = model.lm_head.weight.device
        self.max_seq = model.caches[0].k.size(2)
        self.batch_sizes = buckets(max_batch, 1)
        self.kv_sizes = buckets(self.max_seq, 128)
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((max_batch, 1), self.max_seq - 1, dtype=torch.long, device=device)
        self.slots = torch.arange(self.max_seq, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if capture:
            self._capture_all()

    def _forward(self, batch: int, kv: int) -> Tensor:
        """The captured computation: reads the static buffers, returns (batch, V) float32."""
        pos = self.pos[:batch]
        mask = (self.slots[:kv] <= pos).view(batch, 1, 1, kv)
        logits = self.model.forward_cached(self.tokens[:batch], pos, mask, rows=slice(0, batch))
        return logits[:, -1].float()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # cuDNN's attention, which the engine keeps off elsewhere (it plans every new shape,
        # see pick_device), plans each bucket's shape once here and is replayed from then on.
        with sdpa_kernel(GRAPH_ATTENTION, set_priority=True):
            with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, workspaces, plans
                for b in self.batch_sizes:
                    for kv in self.kv_sizes:
                        self.step(b, kv)
            torch.cuda.current_stream().wait_stream(side)
            for b in self.batch_sizes:
                for kv in self.kv_sizes:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self.step(b, kv)
                    self.graphs[b, kv] = (graph, out)
        torch.cuda.synchronize()

    def __call__(self, tokens: list[int], positions: list[int], kv_len: int) -> Tensor:
        """Logits (n, V) for slots 0..n-1, given each slot's last token and its position
        (dummy slots: any token, position max_seq - 1) and the cache length the live slots
        attend to. The result is valid until the next call."""
        n = len(tokens)
        batch = next(b for b in self.batch_sizes if b >= n)
        kv = next(k for k in self.kv_sizes if k >= kv_len)
        self.tokens[:n, 0] = torch.tensor(tokens)
        self.pos[:n, 0] = torch.tensor(positions)
        self.pos[n:batch] = self.max_seq - 1  # padding rows: dummies
        if not self.graphs:
            return self.step(batch, kv)[:n]
        graph, out = self.graphs[batch, kv]
        graph.replay()
        return out[:n]
