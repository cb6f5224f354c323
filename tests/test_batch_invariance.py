"""Exact batch invariance (GPT.set_batch_invariant): a request's logprobs, not only its tokens,
are bit for bit the same alone, in a static batch, and while others join and leave the
continuous batch, on one thread and on two. Without the mode the logits differ in their
last bits (MKL rounds one row, two or three, and four or more differently)."""
import pytest
import torch
import torch.nn.functional as F

from models.continuous import ContinuousEngine, SchedulerConfig
from models.engine import CompletionRequest, TextEngine
from models.gpt import GPT, KV_BLOCK, GPTConfig, invariant_attention, invariant_read, row_blocked_linear
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Return the value of the attribute. " * 30


@pytest.fixture(scope="module", params=[2, 4], ids=["head-size-32", "head-size-16"])
def engine(request) -> TextEngine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=120, n_layer=2, n_head=request.param, n_embd=64))
    return TextEngine(model, Tokenizer.train([TEXT], 400), "cpu")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def target(seed: int) -> CompletionRequest:
    """Even seeds: a three-token prompt; odd: a one-token one (its prompt pass is the special case)."""
    return CompletionRequest("Return the value" if seed % 2 == 0 else "The", seed=seed, max_tokens=40, logprobs=0,
                             sampling=SamplingParams(temperature=1.0))


def others() -> list[CompletionRequest]:
    return [CompletionRequest("The quick brown fox " * (1 + i % 4), seed=100 + i, max_tokens=5 + 9 * i,
                              sampling=SamplingParams(temperature=0.8, top_p=0.9), n=1 + i % 2) for i in range(7)]


def trace(choice) -> tuple[list[int], list[float]]:
    return choice.token_ids, [lp.logprob for lp in choice.logprobs]


def run(cont: ContinuousEngine, arrivals: dict[int, list[CompletionRequest]], target: int
        ) -> tuple[tuple[list[int], list[float]], list[int]]:
    """Add requests at given steps, run to the end; the tokens and logprobs of the request with
    id `target`, and the ids the requests got, in the order added."""
    tokens, logprobs, ids, step = [], [], [], 0
    while cont.has_work() or any(s >= step for s in arrivals):
        ids += [cont.add(r) for r in arrivals.get(step, [])]
        for ev in cont.step():
            if ev.request == target and ev.token_id is not None:
                tokens.append(ev.token_id)
                logprobs += [lp.logprob for lp in ev.logprobs]
        step += 1
    return (tokens, logprobs), ids


def test_static_batch_gives_bit_identical_logprobs(engine, threads):
    assert len(engine.tokenizer.encode(target(1).prompt)) == 1
    engine.model.set_batch_invariant(True)
    try:
        for seed in range(4):
            alone = trace(engine.complete([target(seed)])[0].choices[0])
            batch = others()[:3] + [target(seed)] + others()[3:]
            assert trace(engine.complete(batch)[3].choices[0]) == alone
    finally:
        engine.model.set_batch_invariant(False)


def test_continuous_batch_with_chunked_prefill_gives_the_static_engines_logprobs(engine, threads):
    """Joining mid-run, prefilled in chunks of 3 under a small token budget, beside requests
    that come and go: the same logprobs as the static engine alone (prompt in one pass)."""
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=8, max_tokens_per_step=12, prefill_chunk=3,
                                                    batch_invariant=True))
    want = trace(engine.complete([target(7)])[0].choices[0])  # the mode is on: the engine set it
    arrivals = {0: others()[:3], 2: [target(7)], 6: others()[3:5], 15: others()[5:]}
    got, ids = run(cont, arrivals, target=3)  # the fourth request added
    engine.model.set_batch_invariant(False)
    assert ids[3] == 3 and got == want


def test_a_rows_product_does_not_depend_on_how_many_rows_share_it():
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 200)
    x = torch.randn(9, 96)
    alone = row_blocked_linear(linear, x[:1])
    for m in range(2, 10):
        assert torch.equal(row_blocked_linear(linear, x[:m])[:1], alone)
    assert torch.allclose(alone, F.linear(x[:1], linear.weight, linear.bias), atol=1e-6)


def test_attention_of_a_row_does_not_depend_on_the_cache_length_read_or_its_neighbours():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 128, 16), torch.randn(3, 2, 128, 16)
    position = 20  # row 0 sees slots 0..20
    alone = invariant_attention(q[:1], k[:1, :, :32], v[:1, :, :32], None, position + 1)
    for read in (32, 64, 128):
        mask = (torch.arange(read - 5) <= torch.tensor([[position], [read - 6], [3]])).view(3, 1, 1, read - 5)
        assert torch.equal(invariant_attention(q, k[:, :, :read], v[:, :, :read], mask, read - 5)[:1], alone)
    want = F.scaled_dot_product_attention(q[:1], k[:1, :, :position + 1], v[:1, :, :position + 1])
    assert torch.allclose(alone, want, atol=1e-6) and read % KV_BLOCK == 0


@pytest.mark.parametrize("head_dim", [8, 16, 32, 64])
def test_the_positions_read_keep_a_decode_step_on_one_kernel(head_dim):
    """Under 400 multiply-adds PyTorch's CPU bmm takes a plain loop that rounds differently (a
    head size of 16 read over 16 positions, beside 32): the exact mode reads at least enough."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 1, head_dim), torch.randn(1, 2, 320, head_dim), torch.randn(1, 2, 320, head_dim)
    for kv_len in (3, 12, 20):
        least = invariant_read(kv_len, head_dim)
        alone = invariant_attention(q, k[:, :, :least], v[:, :, :least], None, kv_len)
        for read in (least + KV_BLOCK, least + 4 * KV_BLOCK):
            assert torch.equal(invariant_attention(q, k[:, :, :read], v[:, :, :read], None, kv_len), alone)


def test_a_prompt_whose_last_chunk_is_one_token_prefills_like_a_whole_prompt(engine, threads):
    """Chunks of 3 split a 7-token prompt 3 + 3 + 1: the one-token chunk must not take the
    decode step's one-query arithmetic (GPT.forward_cached passes it twice)."""
    req = CompletionRequest("Return the value of the attribute", seed=3, max_tokens=20, logprobs=0)
    assert len(engine.tokenizer.encode(req.prompt)) % 3 == 1
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=2, prefill_chunk=3, batch_invariant=True))
    want = trace(engine.complete([req])[0].choices[0])
    got, _ = run(cont, {0: [req]}, target=0)
    engine.model.set_batch_invariant(False)
    assert got == want


@pytest.mark.parametrize("threads", [3], indirect=True)
def test_a_long_prompt_is_exact_on_three_threads(threads):
    """GELU's kernel rounds an element by where the threads split its tensor: a 160-token prompt
    alone and beside another (more values than one thread takes) had differed on 3 threads."""
    torch.manual_seed(0)
    engine = TextEngine(GPT(GPTConfig(vocab_size=512, block_size=512, n_layer=2, n_head=4, n_embd=256)),
                        Tokenizer.train([TEXT], 400), "cpu")
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4, batch_invariant=True))
    long = CompletionRequest("The quick brown fox " * 40, seed=3, max_tokens=8, logprobs=0,
                             sampling=SamplingParams(temperature=1.0))
    other = CompletionRequest("The lazy dog " * 47, seed=9, max_tokens=8)
    assert len(engine.tokenizer.encode(long.prompt)) >= 160
    alone, _ = run(cont, {0: [long]}, target=0)
    beside, _ = run(cont, {0: [other, long]}, target=2)
    assert beside == alone


def test_the_exact_mode_is_checked_when_the_engine_starts(engine, monkeypatch):
    """A machine whose BLAS rounds a row differently in a batch fails the start-up check, where
    the mode would have been lost in silence: here the mode is made a no-op."""
    calls = []
    monkeypatch.setattr(engine.model, "set_batch_invariant", lambda on=True: calls.append(on))
    with pytest.raises(ValueError, match=r"batch_invariant: on this machine, on \d+ thread\(s\), a request.s logprobs differ"):
        ContinuousEngine(engine, SchedulerConfig(max_running=2, batch_invariant=True))
    assert calls == [True, False]  # turned off again: a caller may go on without the mode
