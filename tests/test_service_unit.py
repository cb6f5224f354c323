"""Service pieces without a server: schemas, encoding, the micro-batcher."""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from service import sdapi
from service.batching import Job, MicroBatcher
from service.encode import SSE_DONE, encode_png, png_parameters, sse_event
from service.metrics import forget_dead_processes, get_metrics
from service.worker_health import WorkerHealth
from service.schemas import (CompletionBody, ImageBody, OpenAICompletionBody, OpenAIImageBody, Txt2ImgBody,
                             from_validation_error)
from tests.tests_support import wait_for


# ---- schemas ----------------------------------------------------------------------------

def _error_param(model, data) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    err = from_validation_error(info.value)
    assert err.status == 400
    return err.param


@pytest.mark.parametrize("data, param", [
    ({}, "prompt"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "repetition_penalty": 1e-45}, "repetition_penalty"),  # would overflow the logits
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "seed": -2}, "seed"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "max_token": 3}, "max_token"),  # typo: unknown fields are errors
    ({"prompt": 3}, "prompt"),
])
def test_completion_body_names_the_field(data, param):
    assert _error_param(CompletionBody, data) == param


def test_minus_one_means_off_for_top_k_and_pick_one_for_a_seed():
    """vLLM's top_k -1, and AUTOMATIC1111's seed -1: both were 400s."""
    body = CompletionBody.model_validate({"prompt": "a", "top_k": -1, "seed": -1})
    assert body.sampling_params().top_k == 0 and body.seed is None
    for image_body in (ImageBody, OpenAIImageBody):
        assert image_body.model_validate({"prompt": "a", "seed": -1, "top_k": -1}).seed is None


def test_completion_body_rejects_nan():
    # Python's json module accepts NaN; it must never reach the sampler.
    assert _error_param(CompletionBody, json.loads('{"prompt": "a", "temperature": NaN}')) == "temperature"


def test_completion_body_defaults_and_stop_normalised():
    body = CompletionBody.model_validate({"prompt": "hi"})
    assert body.stop == [] and body.n == 1 and body.seed is None and body.stream is False
    assert CompletionBody.model_validate({"prompt": "hi", "stop": "\n"}).stop == ["\n"]


@pytest.mark.parametrize("body_class", [CompletionBody, ImageBody, OpenAIImageBody])
def test_null_means_the_default_on_every_route_but_not_for_a_required_field(body_class):
    """/generate refused `"n": null` while taking `"seed": null`; a null prompt was reported
    as missing ("Field required") on the OpenAI routes, which drop nulls."""
    own = ({"max_tokens": None, "stop": None, "echo": None} if body_class is CompletionBody
           else {"truncation": None, "response_format": None})
    body = body_class.model_validate({"prompt": "hi", "n": None, "seed": None, **own})
    assert body.n == 1 and body.seed is None
    with pytest.raises(ValidationError) as e:
        body_class.model_validate({"prompt": None})
    err = from_validation_error(e.value)
    assert err.param == "prompt" and "valid string" in err.message


def test_errors_repeat_a_clients_field_names_cut_short():
    """An unknown 900,000-character key came back twice, in the message and in param: a 1.8 MB
    answer to a 0.9 MB request. So did a thousand unknown fields, each in the message."""
    long = "z" * 900_000
    with pytest.raises(ValidationError) as e:
        CompletionBody.model_validate({"prompt": "a", long: 1})
    err = from_validation_error(e.value)
    assert err.param == "z" * 100 + "…" and len(err.message) < 300
    with pytest.raises(ValidationError) as e:
        CompletionBody.model_validate({"prompt": "a", **{f"f{i}": 1 for i in range(1000)}})
    err = from_validation_error(e.value)
    assert err.message.endswith("; and 980 more") and err.message.count("f1") < 20
    for extra in ({long: 1}, {"override_settings": {long: 1}}):
        err = Txt2ImgBody.model_validate({"prompt": "a", **extra}).unsupported()
        assert err.status == 400 and len(err.message) < 300 and len(err.param or "") <= 101


@pytest.mark.parametrize("stop, message", [
    ("", "stop: String should have at least 1 character"),  # was also "; stop: Input should be a valid list"
    (["a", ""], "stop.1: String should have at least 1 character"),
    (["a", 5], "stop.1: Input should be a valid string"),
    (5, "stop: Input should be a valid string or a valid list"),
])
def test_a_union_fields_error_names_the_member_the_value_is_of(stop, message):
    with pytest.raises(ValidationError) as e:
        CompletionBody.model_validate({"prompt": "a", "stop": stop})
    err = from_validation_error(e.value)
    assert (err.message, err.param) == (message, "stop")


def test_best_of_keeps_each_prompts_n_best_candidates_by_mean_token_logprob():
    from models.engine import Choice, TokenLogprob
    from service.app import best_of

    def cand(i: int, lps: list[float]) -> Choice:
        return Choice(i, f"c{i}", "length", [], [TokenLogprob("t", lp, {}) for lp in lps])

    # prompt 0: candidates 0-2; prompt 1: candidates 3-5 (mean -1.5 of two beats -2 of one; ties keep order)
    candidates = [cand(0, [-3.0]), cand(1, [-1.0, -2.0]), cand(2, [-2.0]), cand(3, [-0.5]), cand(4, [-0.1]),
                  cand(5, [-0.1])]
    chosen = best_of(candidates, k=3, n=2, keep_logprobs=False)
    assert [(c.index, c.text) for c in chosen] == [(0, "c1"), (1, "c2"), (2, "c4"), (3, "c5")]
    assert all(c.logprobs is None for c in chosen)
    assert best_of(candidates, k=3, n=1, keep_logprobs=True)[0].logprobs == candidates[1].logprobs


def test_best_of_beyond_the_servers_slots_or_seeds_is_refused_naming_best_of():
    """The engine's refusal named `n`, which the client had not sent, and its seed message
    counted the candidates as choices."""
    import types

    from service.app import Generation
    from service.schemas import ApiError

    cfg = types.SimpleNamespace(max_running=3, max_waiting=8)
    svc = types.SimpleNamespace(engines=types.SimpleNamespace(text_stream=types.SimpleNamespace(cfg=cfg)))
    engine = types.SimpleNamespace(max_prompt_chars=1000)

    def refused(**fields) -> ApiError:
        body = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": "a", **fields})
        with pytest.raises(ApiError) as e:
            Generation.inner._completion_requests(svc, body, body.prompts(), engine)
        return e.value

    err = refused(best_of=4)
    assert err.param == "best_of" and "CONDGEN_TEXT_MAX_RUNNING" in err.message
    assert refused(n=4).param == "n"
    err = refused(best_of=3, seed=2**32 - 2)
    assert err.param == "seed" and "for 3 candidates (prompts × best_of)" in err.message


def test_openai_body_takes_openais_prompt_forms_and_refuses_unimplemented_knobs():
    body = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": ["only one"]})
    assert body.prompts() == ["only one"] and body.unsupported() is None
    for prompt, prompts in [("", [""]), ([""], [""]), (["a", "b"], ["a", "b"]), ([5, 7], [[5, 7]]),
                            ([[5], [7, 8]], [[5], [7, 8]])]:
        assert OpenAICompletionBody.model_validate({"model": "gpt", "prompt": prompt}).prompts() == prompts
    for bad in ([], [[]], ["a", 1], [-1], [True], [1.5], ["a"] * 17):
        assert _error_param(OpenAICompletionBody, {"model": "gpt", "prompt": bad}) == "prompt", bad
    assert OpenAICompletionBody.model_validate(
        {"model": "gpt", "prompt": "a", "presence_penalty": 0.5, "frequency_penalty": -1}).unsupported() is None
    assert _error_param(OpenAICompletionBody, {"model": "gpt", "prompt": "a", "frequency_penalty": 2.5}) == \
        "frequency_penalty"
    ranked = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": "a", "best_of": 3})
    assert ranked.unsupported() is None and ranked.candidates() == 3
    streamed = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": "a", "best_of": 3, "stream": True})
    assert streamed.unsupported().param == "best_of"  # OpenAI's rule: the best are known only at the end
    assert _error_param(OpenAICompletionBody, {"model": "gpt", "prompt": "a", "best_of": 17}) == "best_of"
    fewer = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": "a", "n": 2, "best_of": 1}).unsupported()
    assert fewer.param == "best_of" and "at least n (2)" in fewer.message  # said "not supported"
    same = OpenAICompletionBody.model_validate({"model": "gpt", "prompt": "a", "n": 2, "best_of": 2})
    assert same.unsupported() is None
    biased = {"model": "gpt", "prompt": "a", "logit_bias": {"50": 0, "7": -100}}
    assert OpenAICompletionBody.model_validate(biased).sampling_params().logit_bias == ((50, 0), (7, -100))
    for bad in ({"x": 1}, {"-7": 1}, {"7": 100.5}, {"7": "1"}):
        assert _error_param(OpenAICompletionBody, {**biased, "logit_bias": bad}) == "logit_bias", bad


def test_openai_stream_options_need_a_stream():
    """As OpenAI and vLLM answer: options of a stream on a request that is not one are a mistake."""
    body = {"model": "gpt", "prompt": "a", "stream_options": {"include_usage": True}}
    assert OpenAICompletionBody.model_validate(body).unsupported().param == "stream_options"
    assert OpenAICompletionBody.model_validate({**body, "stream": True}).unsupported() is None
    assert OpenAICompletionBody.model_validate({**body, "stream_options": None}).unsupported() is None
    # null inside the options means the default too; the current client's obfuscation switch is known
    options = {"include_usage": None, "include_obfuscation": False}
    body = OpenAICompletionBody.model_validate({**body, "stream": True, "stream_options": options})
    assert body.stream_options.include_usage is False and body.unsupported() is None


def test_a_killed_process_not_yet_reaped_counts_as_dead():
    """A killed worker stays a zombie until BentoML's process manager reaps it (some 5 s): its
    gauges stayed in the sums, and its last health state counted, that long."""
    from service.metrics import process_exists

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_exists(child.pid)
        child.kill()
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] == "Z",
                 "the child to be a zombie")
        assert not process_exists(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_exists(child.pid) and process_exists(os.getpid())


def test_a_dead_workers_live_gauges_leave_the_sums_and_its_counters_stay(tmp_path):
    """A worker killed (SIGKILL, the OOM killer) and started again kept its last requests
    running and waiting in /metrics for good: livesum forgets a process only when told."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead, alive = ended.pid, os.getpid()
    names = [f"gauge_livesum_{dead}.db", f"gauge_liveall_{dead}.db", f"counter_{dead}.db",
             f"histogram_{dead}.db", f"gauge_livesum_{alive}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_processes(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])  # what it did stays counted
    assert forget_dead_processes(None) == [] and forget_dead_processes(str(tmp_path / "none")) == []


def test_worker_health_counts_the_running_workers_states_only(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / f"condgen_health_{ended.pid}.json").write_text('{"ready": false, "alive": false}')  # gone
    (tmp_path / f"condgen_health_{os.getppid()}.json").write_text('{"ready": true, "alive": true}')  # running
    mine = WorkerHealth(str(tmp_path))
    mine.publish(ready=False, alive=True)
    assert mine.others() == [{"ready": True, "alive": True}]  # its own state is not among the others'
    assert json.loads((tmp_path / f"condgen_health_{os.getpid()}.json").read_text()) == {"ready": False, "alive": True}
    mine.withdraw()
    assert not (tmp_path / f"condgen_health_{os.getpid()}.json").exists()
    assert not (tmp_path / f"condgen_health_{ended.pid}.json").exists()  # a dead worker's state goes
    assert WorkerHealth(None).others() == [] and WorkerHealth(str(tmp_path / "none")).others() == []
    gone = tmp_path / "gone"  # the folder removed under a running worker (the server stopping)
    gone.mkdir()
    orphan = WorkerHealth(str(gone))
    gone.rmdir()
    orphan.publish(ready=True, alive=True)  # the watch loop that calls it must not die of it
    assert orphan.others() == []


def test_engine_gauges_are_zero_before_the_first_request():
    """Not absent until an engine first reports: a dashboard sees 0 from the start. A process of
    its own, so that no other test's metrics have touched the gauges yet."""
    code = ("import prometheus_client as pc; from service.metrics import get_metrics; "
            "get_metrics().start_series([('gpt', 'text'), ('gan', 'image')]); print(pc.generate_latest().decode())")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    for gauge in ("condgen_requests_running", "condgen_requests_waiting"):
        for endpoint, model in (("completions", "gpt"), ("images", "gan")):
            assert f'{gauge}{{endpoint="{endpoint}",model="{model}"}} 0.0' in out


@pytest.mark.parametrize("data, param", [
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "response_format": "url"}, "response_format"),
    ({"prompt": "a", "truncation": 0}, "truncation"),
    ({"prompt": "a", "steps": 3}, "steps"),
])
def test_image_body_names_the_field(data, param):
    assert _error_param(ImageBody, data) == param


# ---- encoding ---------------------------------------------------------------------------

def test_png_keeps_its_parameters():
    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    params = {"prompt": "a red circle", "seed": 7, "model": "gan:abc", "truncation": 0.7}
    png = encode_png(img, params)
    assert png_parameters(png) == params
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (12, 8)
        assert np.array_equal(np.asarray(im.convert("RGB")), img)


def _png_texts(png: bytes) -> list[bytes]:
    """The text of each tEXt / iTXt chunk, read off the file's bytes (after the keyword, and
    for iTXt its flags, language and translated keyword)."""
    texts, at = [], 8
    while at < len(png):
        length, kind = int.from_bytes(png[at:at + 4], "big"), png[at + 4:at + 8]
        data = png[at + 8:at + 8 + length]
        if kind == b"tEXt":
            texts.append(data.split(b"\x00", 1)[1])
        elif kind == b"iTXt":
            after_flags = data.split(b"\x00", 1)[1][2:]
            texts.append(after_flags.split(b"\x00", 2)[2])
        at += 12 + length
    return texts


@pytest.mark.parametrize("prompt", ["a\x00b", "ä\x00€"])  # tEXt, and iTXt past Latin-1
def test_png_infotext_holds_no_nul(prompt):
    """A NUL in an AUTOMATIC1111 prompt went into the infotext chunk, which the PNG specification
    forbids (a NUL ends the keyword: readers split the chunk there); `info` says what the PNG does."""
    from models.image_engine import ImageRequest

    req = ImageRequest(prompt=prompt, seed=3, negative_prompt="x\x00")
    text = sdapi.infotext(req, 0, "gan:v1", 8)
    png = encode_png(np.zeros((2, 2, 3), dtype=np.uint8), text)
    [chunk_text] = _png_texts(png)
    assert b"\x00" not in chunk_text
    with Image.open(io.BytesIO(png)) as im:
        assert im.text["parameters"] == text == sdapi.info(req, "gan:v1", 8, 1)["infotexts"][0]
    assert text.startswith(prompt.replace("\x00", "\ufffd") + "\nNegative prompt: x\ufffd")


def test_png_refuses_wrong_arrays():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.uint8), {})
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32), {})


def test_sse_framing():
    assert sse_event({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'  # newlines stay escaped in JSON
    assert SSE_DONE == b"data: [DONE]\n\n"


# ---- batching ---------------------------------------------------------------------------

def test_requests_queued_while_busy_form_the_next_batch():
    """The first job runs alone; the three that queue meanwhile (different n) run together."""
    batches: list[list[int]] = []

    async def scenario():
        release = asyncio.Event()

        async def run(jobs):
            batches.append([j.payload for j in jobs])
            if len(batches) == 1:
                await release.wait()  # the engine is busy with the first batch
            for j in jobs:
                j.future.set_result(j.payload)

        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", run, get_metrics(), max_batch_cost=64)
        jobs = [Job(p, cost=n, future=loop.create_future()) for p, n in [(0, 1), (1, 3), (2, 1), (3, 4)]]
        batcher.submit(jobs[0])
        await asyncio.sleep(0.01)
        for job in jobs[1:]:
            batcher.submit(job)
        await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return results

    assert asyncio.run(scenario()) == [0, 1, 2, 3]
    assert batches == [[0], [1, 2, 3]]


def test_outstanding_cost_counts_queued_and_running_images_until_they_are_done():
    """What /sdapi/v1/progress reports as A1111's job count."""
    seen: list[int] = []

    async def scenario():
        release = asyncio.Event()

        async def run(jobs):
            await release.wait()
            for j in jobs:
                j.future.set_result(None)

        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", run, get_metrics(), max_batch_cost=64)
        seen.append(batcher.outstanding_cost)
        jobs = [Job(p, cost=n, future=loop.create_future()) for p, n in [(0, 2), (1, 3), (2, 4)]]
        batcher.submit(jobs[0])
        await asyncio.sleep(0.01)  # the first runs; the others queue behind it
        batcher.submit(jobs[1])
        batcher.submit(jobs[2])
        seen.append(batcher.outstanding_cost)
        batcher.withdraw(jobs[2])  # its client left
        seen.append(batcher.outstanding_cost)
        release.set()
        await asyncio.gather(*(j.future for j in jobs[:2]))
        seen.append(batcher.outstanding_cost)
        await batcher.close()

    asyncio.run(scenario())
    assert seen == [0, 9, 5, 0]
    busy, idle = sdapi.progress(5), sdapi.progress(0)  # webuiapi waits while either is non-zero
    assert (busy["progress"], busy["state"]["job_count"], busy["state"]["job"]) == (0.01, 5, "txt2img")
    assert (idle["progress"], idle["state"]["job_count"], idle["state"]["job"]) == (0.0, 0, "")


def recording(batches: list[list[int]]):
    """A batch runner that notes each batch's payloads and finishes its jobs at once."""
    async def run(jobs):
        batches.append([j.payload for j in jobs])
        for j in jobs:
            j.future.set_result(None)
    return run


def test_batches_respect_the_cost_budget_and_skip_cancelled_jobs():
    batches: list[list[int]] = []

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", recording(batches), get_metrics(), max_batch_cost=4)
        jobs = [Job(p, cost=n, future=loop.create_future()) for p, n in [(0, 2), (1, 1), (2, 2), (3, 9), (4, 1)]]
        for job in jobs:
            batcher.submit(job)
        batcher.withdraw(jobs[4])  # its client left while it waited
        await asyncio.gather(*(j.future for j in jobs[:4]))
        await batcher.close()

    asyncio.run(scenario())
    # A job larger than the budget still runs (alone); the cancelled one never runs.
    assert batches == [[0, 1], [2], [3]]


def test_close_fails_the_queued_jobs_and_keeps_the_callers_cancellation():
    """close() left queued jobs, and those taken into a lingering batch, waiting forever (and
    the lingering batch's slot taken); and awaiting the consumer swallowed the caller's own
    cancellation."""
    from service.schemas import ApiError

    async def scenario():
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def run(jobs):
            await release.wait()  # busy with the first batch
            for j in jobs:
                j.future.set_result(j.payload)

        batcher = MicroBatcher("test", run, get_metrics(), max_batch_cost=8, max_wait_s=30, max_in_flight=2)
        batcher._expected = 4  # the previous batch had 4: the next one lingers for more
        jobs = [Job(p, cost=1, future=loop.create_future()) for p in range(3)]
        batcher.submit(jobs[0])  # lingers, in the consumer
        await asyncio.sleep(0.01)
        await batcher.close()
        # the caller of close() is cancelled while it waits: it must end cancelled
        batcher.submit(jobs[1])
        batcher.submit(jobs[2])
        closing = loop.create_task(batcher.close())
        await asyncio.sleep(0)
        closing.cancel()
        await asyncio.wait({closing})
        await asyncio.sleep(0.01)  # the consumer's own cancellation ends
        release.set()
        return [j.future.exception() for j in jobs[:1]], closing.cancelled(), batcher._in_flight._value

    failed, cancelled, free_slots = asyncio.run(scenario())
    assert [type(e) for e in failed] == [ApiError] and cancelled and free_slots == 2
    assert failed[0].status == 503 and failed[0].code == "shutting_down"  # it had no code


def test_jobs_whose_clients_left_free_their_queue_places_at_once():
    """They held CONDGEN_MAX_QUEUE places until the busy worker took them, and live requests
    got 429s meanwhile."""
    async def scenario():
        loop = asyncio.get_running_loop()
        busy = asyncio.Event()

        async def run(jobs):
            await busy.wait()
            for j in jobs:
                j.future.set_result(None)

        batcher = MicroBatcher("test-withdraw", run, get_metrics(), max_batch_cost=4, max_queue_cost=4)
        running = Job(0, cost=4, future=loop.create_future())
        batcher.submit(running)
        await asyncio.sleep(0.01)  # the worker is busy with it
        left = [Job(i, cost=2, future=loop.create_future()) for i in (1, 2)]
        for job in left:
            batcher.submit(job)
        for job in left:
            batcher.withdraw(job)
        live = Job(3, cost=4, future=loop.create_future())
        batcher.submit(live)  # raised Overloaded: the queue held the dead jobs' cost
        waiting = get_metrics().requests_waiting.labels(endpoint="test-withdraw", model="")._value.get()
        busy.set()
        await asyncio.gather(running.future, live.future)
        await batcher.close()
        return waiting

    assert asyncio.run(scenario()) == 1  # the live job alone


def test_an_idle_worker_gets_half_the_queue_and_the_other_half_queues_behind_it():
    """With split_when_idle, jobs that queue together while the worker is idle split by
    cost: the first half's clients can come back while the second half runs. A batch formed
    while another is in flight is not split, and without the option nothing is."""
    batches: list[list[int]] = []

    async def scenario():
        gates = [asyncio.Event() for _ in range(3)]

        async def run(jobs):
            gate = gates[len(batches)]
            batches.append([j.payload for j in jobs])
            await gate.wait()
            for j in jobs:
                j.future.set_result(None)

        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", run, get_metrics(), max_batch_cost=64, max_in_flight=2, split_when_idle=True)
        jobs = [Job(p, cost=n, future=loop.create_future()) for p, n in [(0, 4), (1, 1), (2, 1), (3, 1), (4, 1)]]
        for job in jobs:
            batcher.submit(job)  # all queued before the consumer first runs
        late = [Job(p, cost=1, future=loop.create_future()) for p in (5, 6, 7)]
        await asyncio.sleep(0.01)
        for job in late:  # both slots are taken: these wait
            batcher.submit(job)
        gates[0].set()  # a slot frees while the second batch still runs
        await jobs[0].future
        await asyncio.sleep(0.01)
        for gate in gates[1:]:
            gate.set()
        await asyncio.gather(*(j.future for j in jobs + late))
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7]]  # cost 4 | 4, then everything that waited

    whole: list[list[int]] = []

    async def unsplit():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", recording(whole), get_metrics(), max_batch_cost=64, max_in_flight=2)
        jobs = [Job(p, cost=1, future=loop.create_future()) for p in range(4)]
        for job in jobs:
            batcher.submit(job)
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()

    asyncio.run(asyncio.wait_for(unsplit(), timeout=60))
    assert whole == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        MicroBatcher("test", lambda jobs: None, get_metrics(), split_when_idle=True)  # nowhere for the 2nd half


# ---- error mapping of the routes --------------------------------------------------------

def test_internal_failures_are_500_with_a_request_id_and_a_logged_traceback(monkeypatch, caplog):
    import bentoml
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from models.errors import InvalidParameter
    from service import app as service_app

    @service_app._route
    async def broken(svc, request):
        raise RuntimeError("engine exploded")

    @service_app._route
    async def picky(svc, request):
        raise InvalidParameter("top_k", "must be >= 0")

    monkeypatch.setattr(bentoml, "get_current_service", lambda: object())
    client = TestClient(Starlette(routes=[Route("/broken", broken), Route("/picky", picky)]))
    with caplog.at_level("ERROR", logger="condgen.service"):
        r = client.get("/broken")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["request_id"] == r.headers["x-request-id"]
    assert "engine exploded" not in r.text  # internals stay in the log
    record = next(rec for rec in caplog.records if err["request_id"] in rec.getMessage())
    assert record.exc_info and "engine exploded" in str(record.exc_info[1])

    r = client.get("/picky", headers={"x-request-id": "abc"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "abc"
    assert r.json()["error"] == {"message": "top_k: must be >= 0", "type": "invalid_request_error",
                                 "param": "top_k", "code": None}


def test_a_text_engine_that_dies_mid_answer_is_a_503_not_a_500(caplog):
    """The engine process dies after a request's first event: the plain answer is a 503 (as
    for a request that arrives after it died), a stream ends with that error in-band, in the
    completions layout and the chat layout alike."""
    from models.engine import StreamEvent
    from models.engine_process import EngineFailed
    from service import app as service_app
    from service.chat import ChatChunks
    from service.schemas import ApiError

    async def dies_after_one_token():
        yield StreamEvent(0, 0, "Hello", 1, [], None, 5)
        raise EngineFailed("the text engine process exited (code -9)")

    def run() -> service_app.TextRun:
        return service_app.TextRun("gpt:v1", seed=1, choices=1, logprobs=None, prompt_tokens=1,
                                   events=dies_after_one_token())

    with pytest.raises(ApiError) as info:
        asyncio.run(service_app._collect(run()))
    assert info.value.status == 503 and "exited (code -9)" in info.value.message
    assert info.value.code == "unavailable" and info.value.headers == {"Retry-After": "1"}  # it had neither

    async def stream(endpoint: str, shape: service_app.ChunkShape, events=None) -> list[bytes]:
        request = Request({"type": "http", "method": "POST", "path": endpoint, "query_string": b"",
                           "headers": [(b"x-request-id", b"r-1")]})
        text_run = run() if events is None else service_app.TextRun("gpt:v1", 1, 1, None, 1, events)
        gen = service_app.Generation.inner._stream(None, text_run, {"id": "x-1"}, request, shape, False)
        return [chunk async for chunk in gen]

    for endpoint, shape, first in [("/complete", service_app.CompletionChunks([""], False, False, False), 0),
                                   ("/v1/chat/completions", ChatChunks(1, None, logprobs=False), 1)]:
        errors = get_metrics().request_errors.labels(endpoint=endpoint, status="503")
        before = errors._value.get()
        chunks = asyncio.run(stream(endpoint, shape))
        choice = json.loads(chunks[first].removeprefix(b"data: "))["choices"][0]
        assert choice.get("text", choice.get("delta", {}).get("content")) == "Hello", chunks
        error_event, done, _ = chunks[-1].split(b"\n\n")
        error = json.loads(error_event.removeprefix(b"data: "))["error"]
        assert error["type"] == "server_error" and "text engine is not available" in error["message"], chunks
        assert done == b"data: [DONE]"  # after the error, as vLLM ends a failed stream
        assert errors._value.get() == before + 1  # counted, though the stream's status was a 200
        # the log names the request as its client knows it (the engine's reader logs the cause once)
        assert f"request r-1 to {endpoint} (stream x-1) failed: the text engine is not available" in caplog.text

    async def fails_after_one_token():  # a bug: a 500 whose id is the request's (it was a new one)
        yield StreamEvent(0, 0, "Hello", 1, [], None, 5)
        raise RuntimeError("a bug")

    chunks = asyncio.run(stream("/complete", service_app.CompletionChunks([""], False, False, False),
                                fails_after_one_token()))
    error = json.loads(chunks[-1].split(b"\n\n")[0].removeprefix(b"data: "))["error"]
    assert error["request_id"] == "r-1" and "internal error (request id r-1)" in error["message"]


def test_a_tgi_stream_whose_engine_dies_ends_with_tgi_s_error_event():
    """TGI's stream ends in TGI's error shape, which huggingface_hub raises as its typed error
    (from this service's shape it raised UnknownError carrying a dict)."""
    from huggingface_hub.errors import GenerationError
    from huggingface_hub.inference._common import _format_text_generation_stream_output

    from models.engine import StreamEvent
    from models.engine_process import EngineFailed
    from service import app as service_app
    from service import tgi
    from service.schemas import TGIParameters

    async def dies_after_one_token():
        yield StreamEvent(0, 0, "Hello", 1, [], None, 5)
        raise EngineFailed("the text engine process exited (code -9)")

    async def stream() -> list[bytes]:
        answer = tgi.Generated(None, TGIParameters(), [1], "", None)
        request = Request({"type": "http", "method": "POST", "path": "/generate_stream", "query_string": b"",
                           "headers": []})
        gen = service_app.Generation.inner._tgi_stream(None, dies_after_one_token(), answer, request)
        return [chunk async for chunk in gen]

    last = asyncio.run(stream())[-1].decode().strip()
    assert json.loads(last.removeprefix("data: "))["error_type"] == "generation"
    with pytest.raises(GenerationError, match="text engine is not available"):
        _format_text_generation_stream_output(last, details=True)


def test_a_batch_the_next_queued_job_does_not_fit_goes_at_once():
    """It lingered for the whole window (CONDGEN_BATCH_WAIT_MS), the job that did not fit waiting
    behind it, for company that could not join: the queue is first come, first served."""
    batches: list[list[int]] = []

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", recording(batches), get_metrics(), max_batch_cost=4, max_wait_s=3600)
        three = [Job(p, cost=1, future=loop.create_future()) for p in (0, 1, 2)]
        for job in three:  # a batch of three: the next one waits for as many
            batcher.submit(job)
        await asyncio.gather(*(j.future for j in three))
        two, big = Job(3, cost=2, future=loop.create_future()), Job(4, cost=3, future=loop.create_future())
        batcher.submit(two)
        batcher.submit(big)  # 2 + 3 > 4: it cannot join
        await asyncio.gather(two.future, big.future)
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert batches == [[0, 1, 2], [3], [4]]


def test_linger_waits_only_for_as_many_requests_as_the_previous_batch_had():
    """With a one-hour window, batches still start at once: a lone first request does not
    wait, and a batch starts as soon as as many requests as last time have come (but a
    single arrival after a batch of two does wait for a partner)."""
    batches: list[list[int]] = []

    async def scenario():
        gate = asyncio.Event()

        async def run(jobs):
            batches.append([j.payload for j in jobs])
            if len(batches) == 2:
                await gate.wait()
            for j in jobs:
                j.future.set_result(None)

        loop = asyncio.get_running_loop()
        batcher = MicroBatcher("test", run, get_metrics(), max_batch_cost=64, max_wait_s=3600)
        first = Job(0, cost=1, future=loop.create_future())
        batcher.submit(first)
        await first.future  # ran alone and at once: nothing suggested waiting for company
        pair = [Job(p, cost=1, future=loop.create_future()) for p in (1, 2)]
        batcher.submit(pair[0])
        batcher.submit(pair[1])  # batch of 2 while 3 and 4 queue behind it
        await asyncio.sleep(0)
        rest = [Job(p, cost=1, future=loop.create_future()) for p in (3, 4)]
        for job in rest:
            batcher.submit(job)
        gate.set()
        await asyncio.gather(*(j.future for j in pair + rest))
        # Last batch had two: a single arrival waits for a second one instead of running alone.
        late = [Job(p, cost=1, future=loop.create_future()) for p in (5, 6)]
        batcher.submit(late[0])
        await asyncio.sleep(0.05)
        assert len(batches) == 3
        batcher.submit(late[1])
        await asyncio.gather(*(j.future for j in late))
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert batches == [[0], [1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("env,want", [(None, {"excluded_urls": ".*"}), ("1", {})])
def test_requests_skip_opentelemetry_unless_tracing_is_asked_for(env, want):
    """BentoML's span per request costs event-loop CPU even when nothing is sampled: off by
    default (every path excluded), BentoML's own tracing settings with CONDGEN_TRACE_REQUESTS=1."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "CONDGEN_TRACE_REQUESTS"}
    if env is not None:
        environ["CONDGEN_TRACE_REQUESTS"] = env
    code = "import json, service.app as a; print(json.dumps(a.Generation.config.get('tracing')))"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_engine_processes_share_the_cores_unless_told(monkeypatch):
    import service.config as config
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(config, "TORCH_THREADS", 0)
    monkeypatch.setattr(config, "WORKERS", 1)
    assert config.engine_threads(2) == 8  # text + one image model
    monkeypatch.setattr(config, "WORKERS", 3)
    assert config.engine_threads(3) == 1  # 9 processes on 16 cores
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert config.engine_threads(2) == 1  # never 0
    monkeypatch.setattr(config, "TORCH_THREADS", 4)
    assert config.engine_threads(2) == 4


def test_an_image_backend_fails_when_its_loaded_worker_dies_not_when_loading_fails():
    import os
    import signal

    from service.engines import ImageBackend
    from service.image_worker import ImageWorker, WorkerError
    from tests_support import NoiseImageEngine

    backend = ImageBackend(served=None, stored=None, engine_class=NoiseImageEngine, checker_class=None)
    assert not backend.failed  # nothing started yet
    backend.worker = ImageWorker(NoiseImageEngine, "missing", "cpu", 1, 64)
    with pytest.raises(WorkerError):
        backend.worker.wait_started()
    assert not backend.failed  # a load error leaves the service alive, only not ready
    backend.worker.shutdown()
    backend.worker = ImageWorker(NoiseImageEngine, "unused", "cpu", 1, 64)
    backend.worker.wait_started()
    backend.requests = object()  # loaded
    assert not backend.failed
    os.kill(backend.worker._proc.pid, signal.SIGKILL)
    backend.worker._proc.join(timeout=5)
    assert backend.failed  # seen at once: /readyz and /livez answer 503 before any request fails
    backend.worker.shutdown()


# ---- the served models ------------------------------------------------------------------

@pytest.mark.parametrize("env_var, tag, message", [
    ("GPT_MODEL", "gan:latest", "GPT_MODEL='gan:latest' is a 'gan' model"),
    ("GAN_MODEL", "gpt", "GAN_MODEL='gpt' is a 'gpt' model"),
    # BentoML's own error named neither the variable nor the store (and spoke of a "cloud context")
    ("GAN_MODEL", "none", "GAN_MODEL='none' is not in the model store at"),
    # not a model, but the same kind of mistake: the engines failed to load and the server stayed not ready
    ("CONDGEN_DEVICE", "cuda:64", "CONDGEN_DEVICE='cuda:64': this machine has"),
    # the engine could not allocate its KV cache, and the server stayed up, never ready
    ("CONDGEN_TEXT_MAX_RUNNING", "100000000",
     "CONDGEN_TEXT_MAX_RUNNING=100000000: that many sequences of gpt:latest's")])
def test_a_missing_model_one_of_the_wrong_family_or_a_missing_device_or_memory_stops_the_start_up(
        bentoml_home, env_var, tag, message):
    """A model of the wrong family was listed under the wrong kind by /models and failed when loaded."""
    # on the CPU (the memory check is the CPU's; a CUDA machine's is the engine's), unless the case sets it
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "CONDGEN_DEVICE": "cpu", env_var: tag}
    run = subprocess.run([sys.executable, "-c", "import service.app"], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert message in run.stderr.splitlines()[-1], run.stderr[-2000:]


@pytest.mark.parametrize("settings, expected", [
    ({"CONDGEN_WORKERS": "5"}, "1280"),  # the default grows with the workers: 4 x 64 in flight x 5
    ({"CONDGEN_WORKERS": "2", "CONDGEN_MAX_CONCURRENCY": "130"}, "130"),  # 65 a worker, above 64
    ({"CONDGEN_WORKERS": "3", "CONDGEN_MAX_CONCURRENCY": "6"},
     "CONDGEN_MAX_CONCURRENCY=6 gives each of the 3 worker(s) (CONDGEN_WORKERS) 2 requests"),
    ({"CONDGEN_MAX_CONCURRENCY": "64"}, "CONDGEN_MAX_CONCURRENCY=64 gives each of the 1 worker(s) (CONDGEN_WORKERS) "
                                        "64 requests"),
])
def test_bentoml_s_limiter_stays_above_the_services_own(bentoml_home, settings, expected):
    """BentoML gives each worker ceil(CONDGEN_MAX_CONCURRENCY / workers) requests of every route
    but the health probes and /metrics: at or below CONDGEN_MAX_INFLIGHT its 429 (no Retry-After,
    no code, no CORS headers) came first. With the old fixed default of 256 that happened from 5 workers on."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "CONDGEN_DEVICE": "cpu", **settings}
    run = subprocess.run([sys.executable, "-c", "import service.config as c; print(c.MAX_CONCURRENCY)"],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert expected in (run.stdout + run.stderr).strip().splitlines()[-1], run.stderr[-2000:]


def test_the_memory_limit_is_the_container_s_when_lower(tmp_path):
    """A container's limit (cgroup v2 or v1) bounds the KV cache's check, not the host's memory."""
    from service.config import memory_limit

    host = memory_limit([])
    (tmp_path / "v2").write_text("max\n")  # no limit
    (tmp_path / "v1").write_text(f"{2**30}\n")
    assert memory_limit([str(tmp_path / "v2"), str(tmp_path / "missing")]) == host
    assert memory_limit([str(tmp_path / "v2"), str(tmp_path / "v1")]) == min(host, 2**30)


def test_the_memory_limit_files_are_those_of_the_process_s_own_cgroup_and_its_parents(tmp_path):
    """On a host (no cgroup namespace) the process's cgroup is a path below the root, whose
    files hold no limit: its own cgroup's file, and each parent's, are the ones to read."""
    from service.config import cgroup_memory_files

    v1 = "4:memory:/jobs/a\n3:cpu:/\n"
    assert cgroup_memory_files(v1, str(tmp_path)) == [
        str(tmp_path / "memory/jobs/a/memory.limit_in_bytes"), str(tmp_path / "memory/jobs/memory.limit_in_bytes"),
        str(tmp_path / "memory/memory.limit_in_bytes")]
    assert cgroup_memory_files("0::/user.slice/run-1.scope\n", str(tmp_path)) == [
        str(tmp_path / "user.slice/run-1.scope/memory.max"), str(tmp_path / "user.slice/memory.max"),
        str(tmp_path / "memory.max")]
    assert cgroup_memory_files("0::/\n", str(tmp_path)) == [str(tmp_path / "memory.max")]  # in a container
    assert cgroup_memory_files("", str(tmp_path)) == []


def test_name_latest_names_only_the_latest_version():
    """A server pinned to an older version (GPT_MODEL=gpt:v1) answered `gpt:latest` with it."""
    from service.engines import ServedModel

    pinned = ServedModel("text", "gpt:v1", {}, 0.0, {}, is_latest=False)
    latest = ServedModel("text", "gpt:v2", {}, 0.0, {})
    assert pinned.answers_to("gpt:v1") and pinned.answers_to("gpt") and pinned.answers_to(None)
    assert not pinned.answers_to("gpt:latest") and latest.answers_to("gpt:latest")


def test_a_handler_cancelled_by_the_timeout_is_not_a_client_that_left():
    """BentoML's first-byte timeout cancels the handler and answers 504; the server then reports a
    disconnect. That was taken for the client leaving: the handler swallowed its cancellation
    and counted a 499."""
    from starlette.requests import Request

    from service.app import _until_disconnected

    async def scenario() -> str:
        disconnect = asyncio.Event()

        async def receive() -> dict:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def work() -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                for _ in range(5):  # cleaning up (cancelling a generation) takes a few turns
                    await asyncio.sleep(0)
                raise
            return "done"

        request = Request({"type": "http", "method": "POST", "path": "/complete", "headers": []}, receive)
        handler = asyncio.ensure_future(_until_disconnected(work(), request))
        await asyncio.sleep(0.01)
        handler.cancel()  # the timeout
        disconnect.set()  # its 504 is sent: the server's next message is the disconnect
        try:
            return "returned " + repr(await handler)
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario()) == "cancelled"


def test_an_engine_that_cannot_start_again_is_retried_with_back_off_and_fails_liveness(monkeypatch):
    """The watchdog starts a dead engine again in its worker; a start that fails is retried
    after 5 s, then 10 s, ..., and only then does /livez fail (not while a start is under way)."""
    import types

    import service.engines as engines

    clock = [0.0]
    deaths: list[str] = []
    counter = types.SimpleNamespace(labels=lambda model: types.SimpleNamespace(inc=lambda: deaths.append(model)))
    watched = types.SimpleNamespace(stopping=False, images={}, _failed_starts=set(),
                                text_stream=types.SimpleNamespace(alive=False),
                                text_model=types.SimpleNamespace(name="gpt"),
                                metrics=types.SimpleNamespace(engine_deaths=counter),
                                health=WorkerHealth(None), _ready_here=lambda: True, _shared_dir=None)
    tries: list[float] = []
    alive_at: list[tuple[float, bool]] = []

    def revive() -> None:
        tries.append(clock[0])
        if len(tries) < 3:
            raise RuntimeError("CUDA out of memory")
        watched.text_stream = types.SimpleNamespace(alive=True)

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        alive_at.append((clock[0], engines.Engines.alive(watched)))
        watched.stopping = clock[0] > 30

    monkeypatch.setattr(engines, "time", types.SimpleNamespace(sleep=sleep, monotonic=lambda: clock[0],
                                                               perf_counter=lambda: clock[0]))
    watched._revive_text_engine = revive
    watched._dead_engines = types.MethodType(engines.Engines._dead_engines, watched)
    watched._stop_stuck_engines = lambda: None
    engines.Engines._restart_dead_engines(watched)
    assert [t - tries[0] for t in tries] == [0.0, 5.0, 15.0]
    assert all(ok for t, ok in alive_at if t <= tries[0]) and all(ok for t, ok in alive_at if t > tries[2])
    assert not any(ok for t, ok in alive_at if tries[0] < t <= tries[2])
    assert deaths == ["gpt"]  # one death, however many starts it took


@pytest.mark.parametrize("stall_s", [10.0, 0.0])
def test_the_watchdog_stops_the_engines_that_hold_work_without_progress(monkeypatch, stall_s):
    """An engine process that hangs looks alive; the watchdog probes each engine at each look
    and kills the ones whose `seconds_stuck` passed CONDGEN_ENGINE_STALL_S (0: none) at two
    looks in a row, each with the reason its requests will carry, busy or idle. One that reports a step in between is left alone:
    after a paused container, the first look may come before the steps waiting in the pipe
    are read."""
    import types

    import service.engines as engines

    stopped: list[tuple[str, str]] = []

    calls: list[str] = []

    def engine(name: str, *stuck: float, has_work: bool = True):
        looks = iter(stuck)

        def seconds_stuck() -> float:
            calls.append(f"look {name}")
            return next(looks)
        return types.SimpleNamespace(seconds_stuck=seconds_stuck, pid=1, has_work=has_work,
                                     probe=lambda: calls.append(f"probe {name}"),
                                     stop_stuck=lambda reason: stopped.append((name, reason)))

    watched = types.SimpleNamespace(stopping=False, _stuck_at_last_look=set(), text_stream=engine("text", 10.2, 10.7), images={
        "gan:a": types.SimpleNamespace(worker=engine("gan", 9.5, 10.0)),  # not past 10 s
        "sd:c": types.SimpleNamespace(worker=engine("sd", 30.0, 0.0)),  # its steps read in between
        "ar:b": types.SimpleNamespace(worker=engine("ar", 60.0, 60.5)),
        "gan:d": types.SimpleNamespace(worker=engine("idle", 12.0, 12.5, has_work=False))})  # its probe unanswered
    monkeypatch.setattr(engines, "ENGINE_STALL_S", stall_s)
    engines.Engines._stop_stuck_engines(watched)
    assert stopped == []  # a first look only
    engines.Engines._stop_stuck_engines(watched)
    if stall_s:
        # each engine, at each look, probed before it is read
        assert calls == [f"{call} {name}" for name in ("text", "gan", "sd", "ar", "idle")
                         for call in ("probe", "look")] * 2
        assert stopped == [
            ("text", "the text engine made no progress for 11 s with work in hand and was stopped"),
            ("ar", "the image engine of ar:b made no progress for 60 s with work in hand and was stopped"),
            ("idle", "the image engine of gan:d made no progress for 12 s while idle (no answer to a probe) and "
                     "was stopped")]
    else:
        assert stopped == [] and calls == []  # no watchdog, no probes


def test_several_prompts_merge_their_events_and_close_together():
    """One request with several prompts: choices numbered prompt * n + choice, in arrival order;
    closing the merged stream (the client left) closes every prompt's stream (cancelling it)."""
    import service.app as service_app
    from models.engine import StreamEvent

    closed: list[int] = []

    async def prompt_stream(i: int, events: int):
        try:
            for k in range(events):
                await asyncio.sleep(0.001 * (i + 1))
                yield StreamEvent(i, k % 2, f"{i}{k}", 1, [], None)
        finally:
            closed.append(i)

    async def scenario():
        merged = service_app._merged([prompt_stream(0, 4), prompt_stream(1, 4)], n=2)
        got = [(ev.choice, ev.text) async for ev in merged]
        early = service_app._merged([prompt_stream(0, 100), prompt_stream(1, 100)], n=2)
        await early.__anext__()
        await early.aclose()
        return got

    got = asyncio.run(scenario())
    assert sorted(got) == [(0, "00"), (0, "02"), (1, "01"), (1, "03"), (2, "10"), (2, "12"), (3, "11"), (3, "13")]
    assert sorted(closed) == [0, 0, 1, 1]  # both runs: every stream closed


def test_long_lists_are_encoded_in_pieces_into_the_same_json():
    from starlette.responses import JSONResponse

    from service.app import JSON_PIECE, _json_response

    for content in ([{"id": i, "text": "é\"😀"} for i in range(2 * JSON_PIECE + 1)],
                    {"count": 1, "tokens": list(range(JSON_PIECE + 1)), "token_strs": ["a"] * (3 * JSON_PIECE)},
                    [], {"tokens": []}, list(range(JSON_PIECE))):
        assert _json_response(content).body == JSONResponse(content).body


def test_make_serve_checks_the_port_before_the_models_train():
    """`bentoml serve --port 70000` listened on 4464 (70000 mod 65536), after a fresh checkout's
    make serve had trained the models for a quarter of an hour."""
    repo = Path(__file__).resolve().parents[1]
    for port in ("70000", "0", "abc"):
        run = subprocess.run(["make", "-s", "port", f"PORT={port}"], cwd=repo, capture_output=True, text=True)
        assert run.returncode != 0 and f"PORT='{port}': must be a port number" in run.stderr, run.stderr
    assert subprocess.run(["make", "-s", "port", "PORT=8080"], cwd=repo).returncode == 0
    plan = subprocess.run(["make", "-n", "serve"], cwd=repo, capture_output=True, text=True).stdout
    assert plan.index("must be a port number") < plan.index("training.ensure_defaults")
