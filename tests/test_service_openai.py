"""The official openai client, unchanged, with base_url pointing at the real server."""
from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from models.tokenizer import Tokenizer
from service.encode import png_parameters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(oai):
    ids = [m.id for m in oai.models.list()]
    assert len(ids) == 3 and {i.split(":")[0] for i in ids} == {"gpt", "gan", "ar_image"}
    for name in ("gpt", "gpt:latest", ids[0]):  # models.retrieve, by any name a request may use
        assert oai.models.retrieve(name).id.split(":")[0] == name.split(":")[0]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-3.5-turbo-instruct")
    text = oai.models.retrieve("gpt").model_dump()
    assert text["max_model_len"] == 64  # vLLM's: the tiny model's context (block_size)
    assert "max_model_len" not in oai.models.retrieve("gan").model_dump()


def test_completions(oai):
    r = oai.completions.create(model="gpt", prompt="Hello", max_tokens=6, n=2, seed=9)
    assert r.object == "text_completion" and r.model.startswith("gpt:")
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = oai.completions.create(model=r.model, prompt="Hello", max_tokens=6, n=2, seed=9)  # full tag works too
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_null_means_the_default_as_in_openai(oai):
    """The client sends explicit nulls for optional fields (`temperature=None`); OpenAI's API
    takes them as the defaults, and so does this one."""
    r = oai.completions.create(model="gpt", prompt="Hello", max_tokens=3, seed=2, temperature=None, top_p=None,
                               n=None, echo=None, stream=None, presence_penalty=None, frequency_penalty=None)
    plain = oai.completions.create(model="gpt", prompt="Hello", max_tokens=3, seed=2)
    assert r.choices[0].text == plain.choices[0].text
    assert oai.images.generate(prompt="a red circle", n=None, size=None).data


def test_completions_extra_sampling_params_and_logprobs(oai):
    r = oai.completions.create(model="gpt", prompt="x", max_tokens=4, seed=1, logprobs=3, top_p=0.9,
                               extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) >= 1


def test_presence_and_frequency_penalties_are_honoured(oai, server):
    """They were refused with a 400; the same request on /complete gives the same text."""
    kw = dict(prompt="the the the", max_tokens=12, seed=5, presence_penalty=1.5, frequency_penalty=0.7)
    r = oai.completions.create(model="gpt", **kw)
    plain = httpx.post(f"{server.url}/complete", json=kw, timeout=60).json()
    assert r.choices[0].text == plain["choices"][0]["text"]


def test_logit_bias_forces_a_token(oai):
    r = oai.completions.create(model="gpt", prompt="Hello", max_tokens=5, seed=3, logprobs=0, logit_bias={"65": 100})
    assert len(set(r.choices[0].logprobs.tokens)) == 1  # the same token, five times
    with pytest.raises(openai.BadRequestError) as e:  # past the tokenizer's vocabulary
        oai.completions.create(model="gpt", prompt="Hello", max_tokens=5, logit_bias={"999999": 1})
    assert e.value.body["param"] == "logit_bias"


def test_min_tokens_and_ignore_eos_as_in_vllm(oai, server):
    """End-of-text (token 0 of these tokenizers, all but forced here by a bias) waits for
    min_tokens, and never comes with ignore_eos, on /complete and /v1 alike."""
    forced = {"prompt": "Hello", "max_tokens": 6, "seed": 1, "logit_bias": {"0": 100}}

    def ask(**kw) -> tuple[int, str]:
        r = httpx.post(f"{server.url}/complete", json={**forced, **kw}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]

    assert ask() == (1, "eos")
    assert ask(min_tokens=3) == (4, "eos")
    assert ask(ignore_eos=True) == (6, "length")
    r = oai.completions.create(model="gpt", **forced, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (6, "length")
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt", **forced, extra_body={"min_tokens": 7})
    assert e.value.body["param"] == "min_tokens" and "max_tokens=6" in e.value.body["message"]

    # No stop string is checked before min_tokens either (token 65 forced: its text six times)
    ask_x = {**forced, "logit_bias": {"65": 100}}
    x = oai.completions.create(model="gpt", **ask_x, extra_body={"ignore_eos": True}).choices[0].text[:1]
    r = oai.completions.create(model="gpt", **ask_x, stop=[x], extra_body={"min_tokens": 3, "ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].text, r.choices[0].finish_reason) == (4, x * 3, "stop")


def test_skip_special_tokens_false_shows_end_of_text_as_vllm_does(oai):
    """It was refused; with it a choice that draws end-of-text (token 0, forced) ends with its
    text, streamed or not."""
    forced = dict(model="gpt", prompt="Hello", max_tokens=6, seed=1, logit_bias={"0": 100})
    extra = {"skip_special_tokens": False, "min_tokens": 2}
    plain = oai.completions.create(**forced, extra_body={"min_tokens": 2}).choices[0]
    shown = oai.completions.create(**forced, extra_body=extra).choices[0]
    assert shown.text == plain.text + "<|endoftext|>" and shown.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in oai.completions.create(**forced, extra_body=extra, stream=True))
    assert streamed == shown.text


def test_a_prompt_past_the_context_is_context_length_exceeded(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt", prompt="Hello " * 200, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message


def test_top_logprobs_hold_the_sampled_token_too_as_openai_s_do(oai):
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up
    to logprobs+1 elements"; here a forced token that is not the likeliest came without itself."""
    forced = oai.completions.create(model="gpt", prompt="the cat", max_tokens=2, temperature=0, logprobs=1,
                                    logit_bias={"88": 100}).choices[0].logprobs
    for top, token, value in zip(forced.top_logprobs, forced.tokens, forced.token_logprobs):
        assert len(top) == 2 and top[token] == value and max(top.values()) > value
    none = oai.completions.create(model="gpt", prompt="the cat", max_tokens=2, logprobs=0, seed=1).choices[0].logprobs
    assert none.top_logprobs == [{t: v} for t, v in zip(none.tokens, none.token_logprobs)]


def test_echo_with_logprobs_scores_the_prompt_as_openai_does(oai):
    """What lm-evaluation-harness and other scorers send (echo, logprobs, max_tokens 0): the
    prompt's own tokens and logprobs, the first null. Only the generated tokens came back,
    so a scorer's slices were silently empty."""
    r = oai.completions.create(model="gpt", prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert (c.text, c.finish_reason, r.usage.completion_tokens) == ("Hello world", "length", 0)
    assert len(lp.tokens) == r.usage.prompt_tokens and "".join(lp.tokens) == "Hello world"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])

    kw = dict(model="gpt", prompt="Hello world", max_tokens=4, echo=True, logprobs=1, seed=1)
    full = oai.completions.create(**kw)
    lp2, n = full.choices[0].logprobs, len(lp.tokens)
    assert lp2.tokens[:n] == lp.tokens and lp2.token_logprobs[:n] == lp.token_logprobs
    assert len(lp2.tokens) == n + full.usage.completion_tokens and lp2.text_offset[n] == len("Hello world")
    chunks = [ch.choices[0] for ch in oai.completions.create(**kw, stream=True) if ch.choices]
    assert "".join(ch.text for ch in chunks) == full.choices[0].text
    assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == lp2.tokens
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == lp2.text_offset
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt", prompt="Hello world", max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo" in e.value.message


def test_several_prompts_and_token_arrays_as_openai_takes_them(oai, bentoml_home):
    """OpenAI's prompt forms: several strings (LangChain's OpenAI LLM batches its prompts so),
    a token array, several. Choice j is prompt j // n's choice j % n, with seed + j; they were
    400s past one string."""
    one = [oai.completions.create(model="gpt", prompt=p, max_tokens=5, seed=20 + i, logprobs=0)
           for i, p in enumerate(["The quick", "A lazy", "Return"])]
    batch = oai.completions.create(model="gpt", prompt=["The quick", "A lazy", "Return"], max_tokens=5, seed=20,
                                   logprobs=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [r.choices[0].text for r in one]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in one)
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for r in one)
    two = oai.completions.create(model="gpt", prompt=["The quick", "A lazy"], max_tokens=5, seed=20, n=2)
    assert [two.choices[j].text for j in (0, 2)] == [one[0].choices[0].text, one[2].choices[0].text]  # seed + j
    chunks = [ch.choices[0] for ch in oai.completions.create(model="gpt", prompt=["The quick", "A lazy", "Return"],
                                                              max_tokens=5, seed=20, stream=True) if ch.choices]
    assert ["".join(ch.text for ch in chunks if ch.index == j) for j in range(3)] == [c.text for c in batch.choices]

    gpt = bentoml_home / "models" / "gpt"
    tok = Tokenizer.load(gpt / (gpt / "latest").read_text().strip() / "tokenizer.json")
    ids = tok.encode("The quick")
    as_ids = oai.completions.create(model="gpt", prompt=[ids, tok.encode("Return")], max_tokens=5, seed=20,
                                    logprobs=0, echo=True)
    assert as_ids.choices[0].text == "The quick" + one[0].choices[0].text  # echo: the ids' text
    assert as_ids.usage.prompt_tokens == len(ids) + len(tok.encode("Return"))
    assert oai.completions.create(model="gpt", prompt=ids, max_tokens=5, seed=20).choices[0].text == \
        one[0].choices[0].text
    for ids in ([5, 10**6], [[5], [2**40]]):  # past the tokenizer's vocabulary (2**40 was a 500: decoded first)
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="gpt", prompt=ids, max_tokens=3, echo=True)
        assert e.value.body["param"] == "prompt" and "token ids" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the characters of all prompts count: tokenizing is on the loop
        oai.completions.create(model="gpt", prompt=["x " * 30_000, "x " * 30_000], max_tokens=3)
    assert e.value.code == "prompt_too_long" and "the 2 prompts have 120000 characters" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # seed + j past 32 bits for the last choice
        oai.completions.create(model="gpt", prompt=["a", "b"], max_tokens=3, seed=2**32 - 1)
    assert e.value.body["param"] == "seed"


def test_stop_token_ids_and_include_stop_str_in_output_as_in_vllm(oai, bentoml_home):
    free = oai.completions.create(model="gpt", prompt="Hello", max_tokens=8, seed=2, logprobs=0,
                                  extra_body={"ignore_eos": True})
    tokens = free.choices[0].logprobs.tokens
    stop = free.choices[0].text[2:4]
    cut = free.choices[0].text.index(stop)
    both = [oai.completions.create(model="gpt", prompt="Hello", max_tokens=8, seed=2, stop=[stop],
                                   extra_body={"ignore_eos": True, "include_stop_str_in_output": flag})
            for flag in (False, True)]
    assert [r.choices[0].text for r in both] == [free.choices[0].text[:cut], free.choices[0].text[:cut + len(stop)]]
    assert all(r.choices[0].finish_reason == "stop" for r in both) and len(tokens) == 8
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt", prompt="Hello", max_tokens=3, extra_body={"stop_token_ids": [10**6]})
    assert e.value.body["param"] == "stop_token_ids"
    gpt = bentoml_home / "models" / "gpt"
    tok = Tokenizer.load(gpt / (gpt / "latest").read_text().strip() / "tokenizer.json")
    stop_id = {tok.token_name(i): i for i in range(tok.vocab_size)}[tokens[3]]
    first = tokens.index(tokens[3])  # its first appearance ends the choice; the token counts, its text does not
    r = oai.completions.create(model="gpt", prompt="Hello", max_tokens=8, seed=2,
                               extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (first + 1, "stop")
    assert r.choices[0].text == free.choices[0].text[:free.choices[0].logprobs.text_offset[first]]


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(oai):
    """vLLM's stream option: the usage counts, as they grow, in every chunk."""
    chunks = list(oai.completions.create(model="gpt", prompt="The", max_tokens=6, seed=4, stream=True,
                                         extra_body={"ignore_eos": True},
                                         stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == [] and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens >= 1
    plain = list(oai.completions.create(model="gpt", prompt="The", max_tokens=6, seed=4, stream=True,
                                        stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None


def test_completions_stream(oai):
    plain = oai.completions.create(model="gpt", prompt="The", max_tokens=8, seed=4)
    chunks = list(oai.completions.create(model="gpt", prompt="The", max_tokens=8, seed=4, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_images(oai):
    r = oai.images.generate(model="gan", prompt="a green triangle", n=2, response_format="b64_json",
                            extra_body={"seed": 77})
    assert len(r.data) == 2
    for i, d in enumerate(r.data):
        png = base64.b64decode(d.b64_json)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] == im.size[1] > 0
        assert png_parameters(png)["seed"] == 77 + i


def test_images_from_the_autoregressive_model(oai):
    r = oai.images.generate(model="ar_image", prompt="a red square", n=1, size=None,
                            extra_body={"seed": 5, "guidance_scale": 1.5})
    params = png_parameters(base64.b64decode(r.data[0].b64_json))
    assert params["model"].startswith("ar_image:") and params["seed"] == 5 and params["guidance_scale"] == 1.5


def test_best_of_answers_the_n_candidates_with_the_best_mean_logprob(oai):
    """OpenAI's best_of: best_of candidates (candidate j seeded seed + j, as choice j of a request
    for that many), of which the n with the highest mean token logprob come back, best first,
    and every candidate's tokens are counted in the usage."""
    reordered = False  # some seed must make the ranking matter (not simply keep the first two)
    for seed in range(20, 30):
        kwargs = dict(model="gpt", prompt=["The value", "Return"], max_tokens=8, seed=seed, temperature=1.5)
        everyone = oai.completions.create(n=4, logprobs=0, **kwargs)
        best = oai.completions.create(n=2, best_of=4, **kwargs)
        assert best.usage == everyone.usage and [c.index for c in best.choices] == [0, 1, 2, 3]
        assert all(c.logprobs is None for c in best.choices)  # ranked by them, but not asked for
        for i in range(2):  # each prompt's own candidates
            mine = everyone.choices[4 * i:4 * i + 4]
            ranked = sorted(mine, key=lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs),
                            reverse=True)
            assert [c.text for c in best.choices[2 * i:2 * i + 2]] == [c.text for c in ranked[:2]]
            reordered |= [c.index for c in ranked[:2]] != [c.index for c in mine[:2]]
    assert reordered
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(n=2, best_of=4, stream=True, **kwargs)
    assert e.value.body["param"] == "best_of"


def test_errors_raise_the_usual_exceptions(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="missing", prompt="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model="gan", prompt="x", n=17)
    assert e.value.body["param"] == "n"


def test_images_take_the_values_that_mean_what_the_service_does(oai):
    """OpenAI's neutral values are what this service does anyway (PNG, the model's one size, no
    moderation to tune); anything it cannot honour is refused, naming the field, not ignored."""
    plain = oai.images.generate(model="gan", prompt="a red circle", extra_body={"seed": 3})
    r = oai.images.generate(model="gan", prompt="a red circle", size="auto", quality="standard", output_format="png",
                            background="auto", moderation="low", extra_body={"seed": 3})
    assert r.data[0].b64_json == plain.data[0].b64_json
    assert oai.images.generate(model="gan", prompt="a red circle", quality="auto", moderation="auto").data
    for field, value in [("quality", "hd"), ("quality", "banana"), ("style", "vivid"), ("output_format", "jpeg"),
                         ("background", "transparent"), ("moderation", "strict"), ("size", "1024x1024")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.images.generate(model="gan", prompt="a red circle", **{field: value})
        assert e.value.body["param"] == field, (field, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model="gan", prompt="a red circle", quality="hd")
    assert "'auto'" in e.value.body["message"] and "'standard'" in e.value.body["message"]  # what it takes
