"""Continuous batching: same tokens as the plain engine, whatever joins or leaves; limits; cancel."""
import asyncio
import itertools
import time

import pytest
import torch

from models.continuous import AsyncEngine, ContinuousEngine, EngineStopped, QueueFull, SchedulerConfig
from models.engine import CompletionBuilder, CompletionRequest, TextEngine
from models.errors import InvalidParameter
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from tests_support import wait_until_idle

TEXT = "The quick brown fox jumps over the lazy dog. Return the value of the attribute. " * 30


@pytest.fixture(scope="module")
def engine() -> TextEngine:
    tok = Tokenizer.train([TEXT], 400)
    torch.manual_seed(0)
    return TextEngine(GPT(GPTConfig(vocab_size=448, block_size=96, n_layer=2, n_head=2, n_embd=32)), tok, "cpu")


def requests() -> list[CompletionRequest]:
    return [CompletionRequest("The quick brown fox " * (1 + i % 3), seed=10 + i, max_tokens=4 + 5 * i,
                              sampling=SamplingParams(temperature=0.7 + 0.05 * i, top_k=5 * i, top_p=0.95,
                                                      typical_p=0.9 if i % 3 == 2 else 1.0,
                                                      repetition_penalty=1.5 if i % 3 == 1 else 1.0,
                                                      presence_penalty=1.0 if i % 4 == 2 else 0.0,
                                                      frequency_penalty=-0.5 if i == 5 else 0.0,
                                                      logit_bias=((7, 4.0), (9, -100.0)) if i in (3, 6) else ()),
                              stop=["x"] if i % 4 == 3 else [], n=1 + i % 2, logprobs=1 if i == 2 else None)
            for i in range(8)]


def run(cont: ContinuousEngine, arrivals: dict[int, list[CompletionRequest]], max_steps: int = 2000):
    """Submit requests at given step numbers; return {gid: {choice: tokens}}, finish reasons, ids in order."""
    tokens: dict[int, dict[int, list[int]]] = {}
    reasons: dict[tuple[int, int], str] = {}
    ids = []
    step = 0
    while step < max_steps and (cont.has_work() or any(s >= step for s in arrivals)):
        for req in arrivals.get(step, []):
            ids.append(cont.add(req))
        for ev in cont.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request, {}).setdefault(ev.choice, []).append(ev.token_id)
            if ev.finish_reason:
                reasons[ev.request, ev.choice] = ev.finish_reason
        step += 1
    return tokens, reasons, ids


def test_continuous_equals_the_plain_batched_engine(engine):
    reqs = requests()
    want = engine.complete(reqs)
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=6, max_tokens_per_step=64, prefill_chunk=8))
    # staggered arrivals; only 6 slots for 12 sequences, so some wait and join later
    tokens, reasons, ids = run(cont, {0: reqs[:3], 2: reqs[3:5], 7: reqs[5:]})
    for gid, req, comp in zip(ids, reqs, want):
        for c in comp.choices:
            assert tokens[gid][c.index] == c.token_ids
            assert reasons[gid, c.index] == c.finish_reason


def test_min_tokens_and_ignore_eos_as_in_the_plain_engine_whatever_joins_or_leaves(engine):
    eos = engine.tokenizer.eot_id
    reqs = [CompletionRequest("The quick " * (1 + i % 2), seed=[50, 51, 52, 53, 55][i], max_tokens=6 + 3 * i,
                              n=1 + i % 2,
                              sampling=SamplingParams(temperature=0.9, logit_bias=((eos, 6.0),)),
                              min_tokens=[0, 3, 5, 0, 8][i], ignore_eos=i == 3,
                              stop_token_ids=[[], [30, 31], [], [40], [50]][i], include_stop_str_in_output=i == 3,
                              stop=[[], [], [], [], ["o"]][i])  # in its first 8 tokens only: never a stop
            for i in range(5)]
    want = engine.complete(reqs)
    assert {c.finish_reason for w in want for c in w.choices} == {"eos", "length"}
    assert "o" in want[4].choices[0].text
    assert all(len(c.token_ids) > r.min_tokens for r, w in zip(reqs, want) for c in w.choices
               if c.finish_reason == "eos")
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4, max_tokens_per_step=64, prefill_chunk=8))
    tokens, reasons, ids = run(cont, {0: reqs[:2], 3: reqs[2:4], 5: reqs[4:]})
    for gid, comp in zip(ids, want):
        for c in comp.choices:
            assert (tokens[gid][c.index], reasons[gid, c.index]) == (c.token_ids, c.finish_reason)


def test_prompt_logprobs_and_max_tokens_zero_as_in_the_plain_engine(engine):
    reqs = [CompletionRequest("The quick brown fox " * (1 + i), seed=i, max_tokens=[0, 6, 0, 9][i], n=1 + i % 2,
                              logprobs=[1, 2, None, 0][i], prompt_logprobs=i != 1, echo=i == 2) for i in range(4)]
    want = engine.complete(reqs)
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=3, max_tokens_per_step=16, prefill_chunk=8))
    ids = [cont.add(r) for r in reqs]
    builders = {gid: CompletionBuilder(r.n, r.logprobs) for gid, r in zip(ids, reqs)}
    while cont.has_work():
        for ev in cont.step():
            builders[ev.request].add(ev)
    assert not cont.groups and sorted(cont.free) == [0, 1, 2]  # the scored-only requests left their slots
    for gid, w in zip(ids, want):
        got = builders[gid].build(w.prompt_tokens)
        for a, b in zip(got.choices, w.choices):
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
            # scored from the chunked, cached prefill here, from one full pass there: float32 rounding apart
            assert [(e.token, e.offset, list(e.top or [])) for e in a.prompt_logprobs or []] == \
                   [(e.token, e.offset, list(e.top or [])) for e in b.prompt_logprobs or []]
            assert [e.logprob for e in a.prompt_logprobs or []] == \
                   pytest.approx([e.logprob for e in b.prompt_logprobs or []], abs=1e-5)


def test_the_plain_engine_on_the_same_model_does_not_disturb_running_sequences(engine):
    reqs = requests()[:4]
    want = engine.complete(reqs)
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=8))
    ids = [cont.add(req) for req in reqs]
    tokens: dict[int, dict[int, list[int]]] = {}
    for step in itertools.count():
        if step == 2:  # mid-generation, a static batch reallocates the model's KV caches
            engine.complete([CompletionRequest("Another prompt", seed=99, max_tokens=3)])
        for ev in cont.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request, {}).setdefault(ev.choice, []).append(ev.token_id)
        if not cont.has_work():
            break
    for gid, comp in zip(ids, want):
        assert {c.index: c.token_ids for c in comp.choices} == tokens[gid]


def test_a_request_is_batch_invariant_whatever_joins_or_leaves(engine):
    target = CompletionRequest("Return the value", seed=99, max_tokens=40, sampling=SamplingParams(temperature=1.0))
    alone, _, [gid] = run(ContinuousEngine(engine, SchedulerConfig(max_running=4)), {0: [target]})
    crowd = ContinuousEngine(engine, SchedulerConfig(max_running=8, max_tokens_per_step=32, prefill_chunk=4))
    arrivals = {0: requests()[:2], 1: [target], 5: requests()[2:4], 20: requests()[4:6]}
    got, _, ids = run(crowd, arrivals)
    assert got[ids[2]][0] == alone[gid][0]


def test_sequences_move_down_into_freed_slots_and_keep_their_tokens(engine):
    """When a sequence in a low slot finishes, the one in the highest slot moves into it, so the
    decode step never computes a free slot as a dummy row; the moved one's tokens (penalised:
    its seen-token row moves too) equal its tokens alone."""
    mover = CompletionRequest("Return the value", seed=3, max_tokens=30,
                              sampling=SamplingParams(temperature=1.0, repetition_penalty=1.5))
    alone, _, [gid] = run(ContinuousEngine(engine, SchedulerConfig(max_running=4)), {0: [mover]})
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4))
    short = [CompletionRequest("The quick", seed=i, max_tokens=2 + 3 * i) for i in range(3)]
    ids = [cont.add(r) for r in short] + [cont.add(mover)]  # the mover takes slot 3
    tokens: list[int] = []
    slots = set()
    forward = cont._forward

    def compact_forward():
        assert sorted(cont.decoding) == list(range(len(cont.decoding)))  # no free slot inside the batch
        slots.update(seq.slot for _, seq in cont.decoding.values() if seq.request == ids[-1])
        forward()

    cont._forward = compact_forward
    while cont.has_work():
        tokens += [ev.token_id for ev in cont.step() if ev.request == ids[-1] and ev.token_id is not None]
    assert slots == {3, 0}  # from the highest slot into the first one freed
    assert tokens == alone[gid][0]


def test_a_sequence_moved_down_alone_samples_from_its_own_logits(engine):
    """A short request finishes in slot 0 while a long one, chunk-prefilling in slot 1, goes on:
    it then moves to slot 0 while the decoding rows stay the same list (just it). The rows'
    sampling index must follow it there (it was cached by rows alone: the moved sequence read
    the logits left in its old slot, and drew garbage)."""
    long = CompletionRequest("The quick brown fox jumps over the lazy dog. " * 2, seed=7, max_tokens=20,
                             sampling=SamplingParams(temperature=1.0))
    want = engine.complete([long])[0].choices[0].token_ids
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=2, prefill_chunk=4))
    cont.add(CompletionRequest("The", seed=1, max_tokens=2))
    gid = cont.add(long)
    got: list[int] = []
    while cont.has_work():
        got += [ev.token_id for ev in cont.step() if ev.request == gid and ev.token_id is not None]
    assert got == want


@pytest.mark.parametrize("field", ["max_running", "max_tokens_per_step", "prefill_chunk"])
def test_a_scheduler_that_could_never_run_a_request_is_refused(field):
    with pytest.raises(ValueError, match=field):  # a prefill chunk of 0 never prefilled: requests waited forever
        SchedulerConfig(**{field: 0})


def test_limits_are_respected_and_no_request_starves(engine):
    cfg = SchedulerConfig(max_running=3, max_tokens_per_step=20, prefill_chunk=5)
    cont = ContinuousEngine(engine, cfg)
    reqs = [CompletionRequest("The quick brown fox jumps " * 3, seed=i, max_tokens=6) for i in range(12)]
    ids = [cont.add(r) for r in reqs]
    finished = set()
    for _ in range(500):
        if not cont.has_work():
            break
        events = cont.step()
        assert cont.num_running <= cfg.max_running
        assert cont.last_batch_size <= cfg.max_running
        finished |= {ev.request for ev in events if ev.finish_reason}
    assert finished == set(ids)  # every request finished: nobody starved


def test_cancel_frees_the_slot_within_one_step(engine):
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=2))
    long = [cont.add(CompletionRequest("The", seed=i, max_tokens=80, sampling=SamplingParams(temperature=1.0)))
            for i in range(2)]
    queued = cont.add(CompletionRequest("The", seed=5, max_tokens=3))
    for _ in range(3):
        cont.step()
    assert cont.num_waiting == 1 and len(cont.free) == 0
    cont.cancel(long[0])
    assert len(cont.free) == 1
    events = cont.step()  # the queued request is admitted at once
    assert cont.num_waiting == 0 and any(ev.request == queued for ev in events)
    assert all(ev.request != long[0] for ev in events)


def test_a_bad_request_does_not_disturb_the_others(engine):
    good = CompletionRequest("The quick", seed=3, max_tokens=10)
    want = engine.complete([good])[0].choices[0].token_ids
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4))
    gid = cont.add(good)
    with pytest.raises(InvalidParameter):
        cont.add(CompletionRequest("The", seed=1, max_tokens=10, sampling=SamplingParams(top_p=2.0)))
    tokens, _, _ = run(cont, {})
    assert tokens[gid][0] == want


def test_queue_limit_raises_queue_full(engine):
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=1, max_waiting=2))
    for i in range(3):  # one for the free slot, two waiting
        cont.add(CompletionRequest("The", seed=i, max_tokens=3))
    with pytest.raises(QueueFull, match=r"^3 requests waiting \(free decode slots: 1\); at most 2 may wait beyond"):
        cont.add(CompletionRequest("The", seed=9, max_tokens=3))


def test_the_waiting_limit_counts_only_requests_beyond_the_free_slots(engine):
    """Every request queues until the next step: counting them all, a burst into an idle server
    was refused, and max_waiting=0 refused everything."""
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=2, max_waiting=0))
    for i in range(2):
        cont.add(CompletionRequest("The", seed=i, max_tokens=3))
    with pytest.raises(QueueFull):
        cont.add(CompletionRequest("The", seed=9, max_tokens=3))
    cont.step()  # both admitted: no slot is free
    with pytest.raises(QueueFull):
        cont.add(CompletionRequest("The", seed=9, max_tokens=3))


def test_the_waiting_limit_takes_requests_of_n_choices_whole(engine):
    """The free slots were counted as requests: with 4 slots and max_waiting=0, four requests
    of n=4 were taken, and three of them waited. The scheduler admits whole requests in order."""
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4, max_waiting=0))
    cont.add(CompletionRequest("The", seed=0, max_tokens=3, n=4))
    with pytest.raises(QueueFull):
        cont.add(CompletionRequest("The", seed=1, max_tokens=3, n=4))
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4, max_waiting=1))
    for n in (2, 1, 3):  # 2 + 1 fit; the 3 waits (one of one place)
        cont.add(CompletionRequest("The", seed=n, max_tokens=3, n=n))
    with pytest.raises(QueueFull):
        cont.add(CompletionRequest("The", seed=9, max_tokens=3))  # it would wait behind the 3
    cont.step()
    assert (cont.num_running, cont.num_waiting) == (3, 1)


def test_async_engine_streams_and_cancels_on_early_exit(engine):
    async def main():
        aeng = AsyncEngine(ContinuousEngine(engine, SchedulerConfig(max_running=4)))
        req = CompletionRequest("The quick", seed=3, max_tokens=12, n=2)
        got = [ev async for ev in aeng.generate(req)]
        want = engine.complete([req])[0]
        for c in want.choices:
            assert [ev.token_id for ev in got if ev.choice == c.index and ev.token_id is not None] == c.token_ids
        stream = aeng.generate(CompletionRequest("The", seed=1, max_tokens=90, sampling=SamplingParams(temperature=1)))
        await stream.__anext__()
        await stream.aclose()  # the client went away
        assert await wait_until_idle(aeng) == (0, 0)
        with pytest.raises(InvalidParameter):
            await aeng.generate(CompletionRequest("The", seed=1, max_tokens=-1)).__anext__()
        aeng.shutdown()

    asyncio.run(main())


def test_the_scheduler_does_not_tokenize_a_checked_prompt_again(engine, monkeypatch):
    """It tokenized every prompt a second time between two decode steps (50 ms for a
    100,000-character prompt, which every running sequence waited for); it gets the ids now,
    and decodes the same tokens from them (truncated prompts included)."""
    calls = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: calls.append(text) or encode(text))

    async def main():
        aeng = AsyncEngine(ContinuousEngine(engine, SchedulerConfig(max_running=4)))
        got = []
        for req in (CompletionRequest("The quick brown", seed=3, max_tokens=8, n=2),
                    CompletionRequest("fox " * 200, seed=4, max_tokens=8, truncate=True)):
            prompt = aeng.check(req)
            got.append([ev.token_id async for ev in aeng.generate(req, prompt) if ev.token_id is not None])
        aeng.shutdown()
        return got

    async def echoed():  # the scheduler gets the ids; the text stays for echo
        aeng = AsyncEngine(ContinuousEngine(engine, SchedulerConfig(max_running=4)))
        req = CompletionRequest("The quick", seed=1, max_tokens=3, echo=True)
        text = "".join([ev.text async for ev in aeng.generate(req, aeng.check(req))])
        aeng.shutdown()
        return text

    got = asyncio.run(main())
    assert asyncio.run(echoed()).startswith("The quick")
    assert calls == ["The quick brown", "fox " * 200, "The quick"]  # the checks' only
    monkeypatch.undo()
    want = engine.complete([CompletionRequest("The quick brown", seed=3, max_tokens=8, n=2),
                            CompletionRequest("fox " * 200, seed=4, max_tokens=8, truncate=True)])
    assert sorted(got[0]) == sorted(t for c in want[0].choices for t in c.token_ids)
    assert got[1] == want[1].choices[0].token_ids


def fail_the_first_forward(cont: ContinuousEngine) -> None:
    """Make the first decode forward pass raise (a CUDA out-of-memory error, say): after
    `_sample`, which has finished a request and taken it out of `cont.groups`."""
    forward, calls = cont._forward, []

    def failing() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        forward()
    cont._forward = failing


async def outcome(aeng: AsyncEngine, req: CompletionRequest) -> str | BaseException:
    """The finish reason of a one-choice request, or the error it failed with."""
    async def drain() -> str:
        return [ev.finish_reason async for ev in aeng.generate(req)][-1]
    try:
        return await asyncio.wait_for(drain(), timeout=10)  # a hang fails here
    except Exception as e:
        return e


def test_a_failed_step_fails_the_request_it_had_finished(engine):
    """The step's events are lost with it, the finished request's last one too: it must get the
    error as the others do (it was no longer in `groups`, and waited forever)."""
    async def main():
        cont = ContinuousEngine(engine, SchedulerConfig(max_running=4))
        fail_the_first_forward(cont)
        # No step before both are in: the second had come after the first step under load
        # (then the first finished unharmed, and the test failed though the engine was right).
        added, add, step = [], cont.add, cont.step

        def add_counted(*args) -> int:
            added.append(args)
            return add(*args)
        cont.add = add_counted
        cont.step = lambda: step() if len(added) == 2 else []
        aeng = AsyncEngine(cont)
        try:
            return await asyncio.gather(outcome(aeng, CompletionRequest("The", seed=1, max_tokens=1)),
                                        outcome(aeng, CompletionRequest("The", seed=2, max_tokens=20)))
        finally:
            aeng.shutdown()

    for result in asyncio.run(main()):
        assert isinstance(result, RuntimeError) and "out of memory" in str(result)


def test_a_failing_on_step_callback_does_not_stop_the_scheduler(engine):
    async def main():
        aeng = AsyncEngine(ContinuousEngine(engine, SchedulerConfig(max_running=4)))
        aeng.on_step = lambda *report: 1 / 0  # a metrics callback with a bug
        try:
            return await outcome(aeng, CompletionRequest("The", seed=1, max_tokens=3)), aeng._thread.is_alive()
        finally:
            aeng.shutdown()

    assert asyncio.run(main()) == ("length", True)


def test_shutdown_fails_the_requests_in_flight_and_refuses_new_ones(engine):
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4))
    step = cont.step
    cont.step = lambda: (time.sleep(0.01), step())[1]  # 90 tokens take about a second

    async def main():
        aeng = AsyncEngine(cont)
        stream = aeng.generate(CompletionRequest("The", seed=1, max_tokens=90))
        await stream.__anext__()
        aeng.shutdown()

        async def drain():
            async for _ in stream:
                pass
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(drain(), timeout=10)
        with pytest.raises(EngineStopped):
            await aeng.generate(CompletionRequest("The", seed=2, max_tokens=3)).__anext__()

    asyncio.run(main())


def test_a_requester_whose_event_loop_closed_does_not_stop_the_others(engine):
    """A request left open on an event loop that then closed (another thread's loop, a script's
    `asyncio.run`) cannot take its events: handing them over raised, which ended the scheduler's
    thread, and every other request hung. It is dropped and cancelled; the others go on."""
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=4))
    step = cont.step
    cont.step = lambda: (time.sleep(0.002), step())[1]
    aeng = AsyncEngine(cont)
    closed = asyncio.new_event_loop()
    orphan = aeng.generate(CompletionRequest("The", seed=1, max_tokens=80, sampling=SamplingParams(temperature=1)))
    closed.run_until_complete(orphan.__anext__())
    closed.close()  # without finishing the request
    try:
        assert asyncio.run(outcome(aeng, CompletionRequest("The", seed=2, max_tokens=5))) == "length"
        assert aeng._thread.is_alive()
        assert asyncio.run(wait_until_idle(aeng)) == (0, 0)  # the orphan was cancelled, not left decoding
    finally:
        aeng.shutdown()


def test_cancellations_on_their_way_are_not_counted_as_waiting_requests(engine):
    """The inbox holds cancellations too: counting its size as waiting requests refused a
    request with QueueFull that the limit allowed."""
    cont = ContinuousEngine(engine, SchedulerConfig(max_running=2, max_waiting=0))
    aeng = AsyncEngine(cont)
    aeng.shutdown()  # no scheduler thread: the inbox keeps what is put into it
    aeng._stopping = False
    aeng._submit(0, CompletionRequest("The", seed=1, max_tokens=3))
    aeng._cancel(0)
    assert aeng.stats() == (0, 1)
    aeng.check(CompletionRequest("The", seed=2, max_tokens=3))  # 1 waiting, 2 free slots: room for it


def test_a_kv_cache_too_large_to_allocate_names_the_setting(engine):
    """The allocator's error gave a byte count only (CONDGEN_TEXT_MAX_RUNNING=100000000 left the
    server not ready, saying it could not allocate 819200000000 bytes)."""
    # Petabytes: past any machine's address space (122 TB, 10**10 rows, fit one with overcommit
    # and was filled with zeros until the kernel killed the test, on a 128 GiB GPU machine).
    with pytest.raises(ValueError, match=r"max_running=1000000000000: the KV cache .* needs [\d,.]+ GiB"):
        ContinuousEngine(engine, SchedulerConfig(max_running=10**12))


def test_a_prompt_is_tokenized_once_per_engine(engine, monkeypatch):
    """Checking a request tokenized its prompt, and queuing it tokenized it again: the longest
    allowed prompt took 37 ms each time, in the scheduler's thread, between decode steps."""
    calls = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    ContinuousEngine(engine, SchedulerConfig(max_running=2)).add(CompletionRequest("The quick", seed=1, max_tokens=2))
    engine.complete([CompletionRequest("The lazy", seed=1, max_tokens=2)])
    assert calls == ["The quick", "The lazy"]
