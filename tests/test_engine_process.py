"""The text engine in a process of its own (models/engine_process.py): same tokens as the
plain engine, checks before any work, cancellation, and a dead or broken child reported as
EngineFailed instead of hanging its requests."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import signal
import threading

import pytest
import torch

from models.artifacts import save_model_dir
from models.continuous import ContinuousEngine, QueueFull, SchedulerConfig
from models.engine import CompletionRequest, TextEngine, TextRequests
from models.engine_process import EngineFailed, EngineProcess, EngineSpec, _serve
from models.errors import InvalidParameter
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from test_continuous import fail_the_first_forward
from tests_support import until, wait_until_idle

TEXT = "The quick brown fox jumps over the lazy dog. Return the value of the attribute. " * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    tok = Tokenizer.train([TEXT], 400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=448, block_size=96, n_layer=2, n_head=2, n_embd=32))
    return save_model_dir(tmp_path_factory.mktemp("gpt"), model.config.to_dict(), model.state_dict(), tok)


@pytest.fixture(scope="module")
def engine_process(model_dir):
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1, SchedulerConfig(max_running=4, max_waiting=8)))
    yield proc
    proc.shutdown()


def requests() -> list[CompletionRequest]:
    return [CompletionRequest("The quick brown fox " * (1 + i % 3), seed=10 + i, max_tokens=4 + 5 * i, n=1 + i % 2,
                              sampling=SamplingParams(temperature=0.8, top_k=5 * i,
                                                      repetition_penalty=1.5 if i % 3 == 1 else 1.0),
                              stop=["lazy"] if i == 2 else [])
            for i in range(6)]


async def _tokens(proc: EngineProcess, req: CompletionRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {c: [] for c in range(req.n)}
    async for ev in proc.generate(req):
        if ev.token_id is not None:
            out[ev.choice].append(ev.token_id)
    return out


def test_same_tokens_as_the_plain_engine_while_requests_join_and_leave(engine_process, model_dir):
    plain = TextEngine.load(model_dir, device="cpu")

    async def main():  # six requests of different lengths on four slots: they queue, join and leave
        return await asyncio.gather(*(_tokens(engine_process, r) for r in requests()))

    got = asyncio.run(main())
    for req, tokens in zip(requests(), got):
        want = plain.complete([req])[0]
        assert tokens == {c.index: c.token_ids for c in want.choices}
    assert engine_process.stats() == (0, 0)


def test_bad_requests_fail_in_the_server_before_any_work(engine_process):
    async def first(req: CompletionRequest):
        return await engine_process.generate(req).__anext__()

    with pytest.raises(InvalidParameter) as e:
        asyncio.run(first(CompletionRequest("The", seed=1, max_tokens=-1)))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParameter) as e:
        asyncio.run(first(CompletionRequest("The", seed=1, n=5)))  # more choices than slots
    assert e.value.param == "n"


def test_a_client_that_leaves_frees_its_slots(engine_process):
    async def main():
        stream = engine_process.generate(CompletionRequest("The", seed=1, max_tokens=90, n=4))
        await stream.__anext__()
        assert engine_process.stats()[0] == 4
        await stream.aclose()  # the client went away
        assert await wait_until_idle(engine_process) == (0, 0)
        assert await _tokens(engine_process, CompletionRequest("The", seed=2, max_tokens=3)) != {}

    asyncio.run(main())


def test_each_admitted_request_reports_its_wait_and_prompt_tokens(engine_process):
    """The service counts prompt tokens at admission, whatever the client does after: it counted
    them when the route saw the first event, and missed a client that left in between."""
    admitted: list[tuple[float, int]] = []
    engine_process.on_admit = lambda waited, prompt_tokens: admitted.append((waited, prompt_tokens))
    reqs = [CompletionRequest("The quick brown fox", seed=1, max_tokens=2, n=2), CompletionRequest("", seed=2)]
    try:
        for req in reqs:
            asyncio.run(_tokens(engine_process, req))
    finally:
        engine_process.on_admit = None
    lengths = [len(engine_process.requests.prompt_ids(req)) for req in reqs]  # "" is one end-of-text token
    assert [tokens for _, tokens in admitted] == lengths and lengths[1] == 1 and all(w >= 0 for w, _ in admitted)


def test_a_request_cancelled_while_queued_is_never_admitted_nor_counted(engine_process):
    """Its cancellation reaches the child with it (the child is stopped meanwhile): it leaves the
    queue before any step, and the report of that step-less round counts no token."""
    admitted, sampled = [], []
    engine_process.on_admit = lambda waited, prompt_tokens: admitted.append(waited)
    engine_process.on_step = lambda b, r, w: sampled.append(b)

    async def main():
        os.kill(engine_process._proc.pid, signal.SIGSTOP)
        try:
            first = asyncio.ensure_future(engine_process.generate(CompletionRequest("The", seed=1, n=2)).__anext__())
            await asyncio.sleep(0.1)  # submitted, waiting
            first.cancel()  # the client left
            await asyncio.gather(first, return_exceptions=True)
        finally:
            os.kill(engine_process._proc.pid, signal.SIGCONT)
        return await wait_until_idle(engine_process)

    try:
        assert asyncio.run(main()) == (0, 0)
        assert sampled and admitted == [] and sum(sampled) == 0
    finally:
        engine_process.on_admit = engine_process.on_step = None


def test_the_queue_limit_counts_requests_still_on_their_way(model_dir):
    """max_waiting 0 (the engine starts: its warm-up request was refused) lets in what the free
    slot takes, one request; the second, still on its way to the engine, is refused."""
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1, SchedulerConfig(max_running=1, max_waiting=0)))

    async def main():
        streams = [proc.generate(CompletionRequest("The", seed=i, max_tokens=60)) for i in range(2)]
        tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
        return done

    try:
        results = asyncio.run(main())
        assert isinstance(results[1], QueueFull) and not isinstance(results[0], BaseException)
    finally:
        proc.shutdown()


def test_a_dead_engine_fails_its_requests_and_refuses_new_ones(model_dir):
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1))
    reports: list[tuple[int, int, int]] = []
    proc.on_step = lambda *report: reports.append(report)

    async def main():
        stream = proc.generate(CompletionRequest("The", seed=1, max_tokens=90))
        await stream.__anext__()
        os.kill(proc._proc.pid, signal.SIGKILL)
        async def drain():
            async for _ in stream:
                pass

        with pytest.raises(EngineFailed):
            await asyncio.wait_for(drain(), timeout=60)  # fails, does not hang

    try:
        asyncio.run(main())
        assert not proc.alive
        with pytest.raises(EngineFailed):
            proc.check(CompletionRequest("The", seed=1))
        # The gauges (running, waiting) go to 0: they kept their last values after the death.
        assert reports[-1] == (0, 0, 0) and proc.stats() == (0, 0)
    finally:
        proc.shutdown()


def test_a_model_that_does_not_load_fails_the_start_naming_the_file(model_dir, tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineFailed, match="model.safetensors"):
        EngineProcess(EngineSpec(str(tmp_path), "cpu", 1))


def test_a_request_checked_by_its_caller_is_not_tokenized_again(engine_process, monkeypatch):
    """The server counted the prompt's tokens and generate() checked the request again: two
    tokenizations on the event loop (37 ms each for the longest prompt)."""
    calls = []
    encode = engine_process.requests.tokenizer.encode
    monkeypatch.setattr(engine_process.requests.tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    req = CompletionRequest("The quick brown", seed=4, max_tokens=3)
    prompt = engine_process.check(req)

    async def run() -> int:
        return sum([ev.num_tokens async for ev in engine_process.generate(req, prompt)])

    assert asyncio.run(run()) >= 1 and prompt == encode("The quick brown") and len(calls) == 1


def test_a_callers_requests_about_to_queue_count_against_the_queue(engine_process):
    """Several prompts of one request are checked one after the other before any is queued:
    each counts those ahead of it (4 slots + 8 waiting here)."""
    req = CompletionRequest("The", seed=1, max_tokens=2)
    assert engine_process.check(req, ahead=11)
    with pytest.raises(QueueFull):
        engine_process.check(req, ahead=12)


def test_errors_and_requests_survive_the_pipe(model_dir):
    e = pickle.loads(pickle.dumps(InvalidParameter("top_p", "must be in (0, 1]")))
    assert (e.param, e.message, str(e)) == ("top_p", "must be in (0, 1]", "top_p: must be in (0, 1]")
    checker = TextRequests.load(model_dir)
    assert checker.block_size == 96 and len(checker.prompt_ids(CompletionRequest("The quick", seed=0))) >= 1


def test_a_failed_step_fails_the_request_it_had_finished(model_dir):
    """The child's side: a step that fails after finishing a request loses its last events; the
    request must get an error as the others do (it was no longer in `groups`: no message at all,
    and the server's generate() waited until the service's deadline)."""
    cont = ContinuousEngine(TextEngine.load(model_dir, device="cpu"), SchedulerConfig(max_running=4))
    fail_the_first_forward(cont)
    server, child = mp.Pipe()
    serving = threading.Thread(target=_serve, args=(child, cont), daemon=True)
    server.send(("add", 0, CompletionRequest("The", seed=1, max_tokens=1)))  # finishes in the failing step
    server.send(("add", 1, CompletionRequest("The", seed=2, max_tokens=20)))
    serving.start()  # both queued first: on a busy machine the first step could run before the second add
    errors, events = {}, []
    while server.poll(5) and len(errors) < 2:
        kind, payload = server.recv()
        if kind == "error":
            errors[payload[0]] = payload[1]
        else:
            events += payload.events
    server.send(("stop", None, None))
    serving.join(timeout=5)
    assert sorted(errors) == [0, 1] and all("out of memory" in str(e) for e in errors.values())
    assert events == []  # the failed step's events (incomplete) are not delivered: the error is the answer


def test_a_child_that_dies_while_starting_reports_its_exit_code():
    """Its end of the pipe closes before the OS has reaped it: the exit code was read too early,
    and the start failed saying "it exited with code None"."""
    class Reaped:  # a child whose exit code is known once it has been joined
        exitcode = None

        def join(self, timeout: float | None = None) -> None:
            self.exitcode = -9

    proc = EngineProcess.__new__(EngineProcess)
    proc._conn, child = mp.Pipe()
    child.close()
    proc._proc = Reaped()
    assert proc._recv_start() == ("exited", "it exited with code -9")


def test_a_request_that_passed_its_check_as_the_engine_died_fails_instead_of_waiting(model_dir):
    """Checked just before the death, registered just after the reader failed the requests it
    saw: it waited for events that would never come (until the service's deadline)."""
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1))

    async def main():
        proc.check = lambda req: None  # the check passed: the engine was still alive then
        os.kill(proc._proc.pid, signal.SIGKILL)
        while proc.alive:
            await asyncio.sleep(0.01)
        stream = proc.generate(CompletionRequest("The", seed=1, max_tokens=5))
        with pytest.raises(EngineFailed):
            await asyncio.wait_for(stream.__anext__(), timeout=10)

    try:
        asyncio.run(main())
    finally:
        proc.shutdown()


def test_a_failing_metrics_callback_does_not_stop_the_events(engine_process):
    """The step's callbacks run before its events are handed out: one that raises must not keep
    them from the clients."""
    def broken(*report):
        raise RuntimeError("metrics backend down")

    engine_process.on_step = broken
    try:
        tokens = asyncio.run(_tokens(engine_process, CompletionRequest("The", seed=3, max_tokens=4)))
    finally:
        engine_process.on_step = None
    assert len(tokens[0]) == 4


@pytest.mark.parametrize("how", ["shutdown", "death with a failing metrics callback"])
def test_requests_in_flight_fail_when_the_engine_stops(model_dir, how):
    """At a shutdown nothing fed the requests in flight any more and they hung (AsyncEngine
    failed them); and a metrics callback that raised after a death ended the reader thread
    before it failed them."""
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1))

    async def main():
        stream = proc.generate(CompletionRequest("The", seed=1, max_tokens=90))
        await stream.__anext__()
        if how == "shutdown":
            proc.shutdown()
        else:
            proc.on_step = lambda *report: 1 / 0
            os.kill(proc._proc.pid, signal.SIGKILL)

        async def drain():
            async for _ in stream:
                pass
        with pytest.raises(EngineFailed, match="shut down" if how == "shutdown" else "exited"):
            await asyncio.wait_for(drain(), timeout=30)  # fails, does not hang

    try:
        asyncio.run(main())
    finally:
        proc.shutdown()


def test_a_hung_engine_is_stuck_while_it_has_work_or_a_probe_out_and_stopping_it_fails_its_requests(model_dir):
    """A child that hangs (a deadlock, a GPU that stopped answering) stays alive: the server's
    watchdog (service/engines.py) probes it, reads `seconds_stuck` and kills it with
    `stop_stuck`. A hung child is stuck from its first request, or idle from the probe it does
    not answer; one that answers again is not."""
    proc = EngineProcess(EngineSpec(str(model_dir), "cpu", 1))
    reports: list[tuple[int, int, int]] = []
    proc.on_step = lambda *report: reports.append(report)

    def request(seed: int) -> asyncio.Future:
        return asyncio.ensure_future(_tokens(proc, CompletionRequest("The", seed=seed, max_tokens=3)))

    async def main():
        proc.probe()  # a healthy idle child answers at once
        await until(lambda: proc._probed_at is None, "the idle child's answer")
        assert proc.seconds_stuck() == 0.0

        os.kill(proc.pid, signal.SIGSTOP)  # hung while idle
        await asyncio.sleep(0.3)
        assert proc.seconds_stuck() == 0.0  # nothing asked of it yet
        proc.probe()
        await asyncio.sleep(1.0)
        probed_at = proc._probed_at
        proc.probe()  # one probe out at a time
        assert proc._probed_at == probed_at and 0.95 < proc.seconds_stuck() < 5  # from the probe
        early = request(1)  # no fresh start for a child that has not answered the probe
        await asyncio.sleep(0.3)
        assert 1.25 < proc.seconds_stuck() < 6  # from the probe, not from the request
        os.kill(proc.pid, signal.SIGCONT)  # it answers again
        assert len((await asyncio.wait_for(early, timeout=60))[0]) == 3
        assert await wait_until_idle(proc) == (0, 0) and proc.seconds_stuck() == 0.0
        assert proc._probed_at is None  # the probe sent while it hung was answered too

        os.kill(proc.pid, signal.SIGSTOP)  # hung, no probe out
        proc._progress_at -= 100  # its last step, long ago
        first = request(2)
        await asyncio.sleep(0.3)
        second = request(3)  # joins work in hand: the clock goes on
        await asyncio.sleep(0.3)
        assert 0.5 < proc.seconds_stuck() < 5  # from the first request, not the last step nor the latest request
        os.kill(proc.pid, signal.SIGCONT)
        assert [len((await asyncio.wait_for(w, timeout=60))[0]) for w in (first, second)] == [3, 3]
        assert await wait_until_idle(proc) == (0, 0) and proc.seconds_stuck() == 0.0

        os.kill(proc.pid, signal.SIGSTOP)
        waiting = request(4)
        await asyncio.sleep(0.3)
        proc._proc.kill = lambda: None  # a kill that has not taken yet (a process inside a GPU driver's call)
        proc.stop_stuck("the text engine made no progress for 0 s")
        assert not proc.alive and proc.seconds_stuck() == 0.0 and proc.stats() == (0, 0)  # dead at once
        # its gauges to 0, once: its reader must not zero them again under a fresh engine's steps
        assert reports[-1] == (0, 0, 0) and proc.on_step is None
        with pytest.raises(EngineFailed, match="made no progress"):  # fails, with the reason, without the pipe
            await asyncio.wait_for(waiting, timeout=2)
        with pytest.raises(EngineFailed, match="made no progress"):
            proc.check(CompletionRequest("The", seed=1))
        del proc._proc.kill  # shutdown() kills it for real

    try:
        asyncio.run(main())
    finally:
        proc.shutdown()
