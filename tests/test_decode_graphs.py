"""The fixed-shape decode step (what CUDA graphs replay), run eagerly on the CPU: padding the
batch and reading a bucket of cache positions must not change anyone's tokens."""
import pytest
import torch

from models.continuous import ContinuousEngine, SchedulerConfig
from models.decode_graphs import DecodeGraphs, buckets
from models.engine import CompletionRequest, TextEngine
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from test_continuous import TEXT, run


def test_buckets():
    assert buckets(6, 1) == [1, 2, 4, 6]
    assert buckets(8, 1) == [1, 2, 4, 8]
    assert buckets(300, 128) == [128, 256, 300]
    assert buckets(96, 128) == [96]


@pytest.fixture(scope="module")
def engine() -> TextEngine:
    tok = Tokenizer.train([TEXT], 400)
    torch.manual_seed(0)
    return TextEngine(GPT(GPTConfig(vocab_size=448, block_size=300, n_layer=2, n_head=2, n_embd=32)), tok, "cpu")


def test_fixed_shape_step_yields_the_plain_engines_tokens(engine):
    # 5 requests in 6 slots; a long prompt prefills in chunks in slot 3 while slots 0-2 decode
    # (padded to a batch of 4: the dummy row must not touch its cache); the batch of 8 is capped
    # at the 6 slots; and sequences cross the 128 and 256 cache-length buckets (the longest
    # ignores the end-of-text token: these random weights draw it often enough to stop short)
    reqs = [CompletionRequest("The quick brown fox " * (1 + 12 * (i % 3)), seed=i, max_tokens=40 + 50 * i,
                              sampling=SamplingParams(temperature=0.8, top_k=20 * i), n=1 + i % 2, ignore_eos=i == 4)
            for i in range(5)]
    want = engine.complete(reqs)
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=6, max_tokens_per_step=64, prefill_chunk=8))
    cont.graphs = DecodeGraphs(cont.model, 6, capture=False)
    assert cont.graphs.batch_sizes == [1, 2, 4, 6] and cont.graphs.kv_sizes == [128, 256, 300]
    tokens, reasons, ids = run(cont, {0: reqs[:2], 3: [reqs[2]], 20: [reqs[3]], 24: [reqs[4]]})
    for gid, comp in zip(ids, want):
        for c in comp.choices:
            assert tokens[gid][c.index] == c.token_ids
            assert reasons[gid, c.index] == c.finish_reason
    longest = max(len(engine.prompt_ids(r)) + len(c.token_ids) for r, comp in zip(reqs, want) for c in comp.choices)
    assert longest > 256  # the last bucket was used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_equals_the_same_step_run_eagerly(engine, compile):
    gpu = TextEngine(GPT(engine.model.config), engine.tokenizer, "cuda", dtype=torch.float32)
    cont = ContinuousEngine(gpu, SchedulerConfig(max_running=6))
    if compile:  # what `benchmarks.bandwidth --compile` measures
        cont.graphs = DecodeGraphs(cont.model, 6, compile=True)
    assert cont.graphs is not None and len(cont.graphs.graphs) == 4 * 3  # batch 1, 2, 4, 6 x cache 128, 256, 300
    eager = DecodeGraphs(cont.model, 6, capture=False)  # same model and cache slots, no graphs
    tokens, positions = [5, 7, 9], [0, 130, 299]  # slot 2 is a dummy (the cache's last position)
    with torch.inference_mode():  # as the engine's step runs
        replayed = cont.graphs(tokens, positions, kv_len=131).clone()  # batch bucket 4, cache bucket 256
        # The same inputs write the same keys and values again, so both see the same cache.
        torch.testing.assert_close(replayed, eager(tokens, positions, kv_len=131), rtol=1e-5, atol=1e-5)
    tokens, reasons, [gid] = run(cont, {0: [CompletionRequest("The quick brown fox", seed=1, max_tokens=5)]})
    assert len(tokens[gid][0]) == 5 and reasons[gid, 0] == "length"  # the engine decodes through its graphs
