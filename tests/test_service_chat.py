"""POST /v1/chat/completions on the real server (the session's, with docs/chat_template.jinja),
through the official openai client: the messages, rendered by the template, run exactly as
that prompt runs on /v1/completions."""
from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from service.chat import ChatTemplate
from tests_support import metric_value

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "chat_template.jinja"  # the server's (conftest)

MESSAGES = [{"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "module."}]}]
# What the template makes of MESSAGES: the text parts joined with a newline, as vLLM joins them.
RENDERED = "<|system|>\nYou answer in one line.\n<|user|>\nName a\nmodule.\n<|assistant|>\n"


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_example_template_renders_what_the_tests_expect():
    for_template = [{"role": "system", "content": "You answer in one line."},
                    {"role": "user", "content": "Name a\nmodule."}]
    assert ChatTemplate.load(str(CHAT_TEMPLATE)).render(for_template, add_generation_prompt=True) == RENDERED


def test_a_chat_completion_is_the_completion_of_the_rendered_prompt(oai):
    """Same seed, same parameters: the same text and usage as /v1/completions on the prompt
    the template made, and n choices seeded seed + i as there."""
    kw = dict(max_tokens=10, seed=7, temperature=0.9, top_p=0.95, n=2, extra_body={"top_k": 40})
    r = oai.chat.completions.create(model="gpt", messages=MESSAGES, **kw)
    plain = oai.completions.create(model="gpt", prompt=RENDERED, **kw)
    assert isinstance(r, ChatCompletion) and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model.startswith("gpt:") and r.model_extra["seed"] == 7
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.role == "assistant" for c in r.choices)
    assert [c.message.content for c in r.choices] == [c.text for c in plain.choices]
    assert [c.finish_reason for c in r.choices] == [c.finish_reason for c in plain.choices]
    assert r.usage.model_dump() == plain.usage.model_dump()
    assert all(c.logprobs is None for c in r.choices)
    newer = oai.chat.completions.create(model="gpt", messages=MESSAGES, **{**kw, "max_tokens": None},
                                        max_completion_tokens=10)
    assert [c.message.content for c in newer.choices] == [c.message.content for c in r.choices]


def test_tgi_clients_placeholder_model_names_the_served_model(oai):
    """huggingface_hub's InferenceClient (given the server's URL) sends model "dummy", TGI's docs
    and LiteLLM "tgi": TGI ignores it, and this server answered 404."""
    for placeholder in ("tgi", "dummy"):
        r = oai.chat.completions.create(model=placeholder, messages=MESSAGES, max_tokens=3, seed=1)
        assert r.model.startswith("gpt:") and r.choices[0].message.content is not None


def test_stop_and_the_default_length(oai):
    """Without a limit a choice may run to the end of the context (64 tokens here), as in vLLM."""
    free = oai.chat.completions.create(model="gpt", messages=MESSAGES, seed=3, extra_body={"ignore_eos": True})
    assert free.usage.total_tokens == 64 and free.choices[0].finish_reason == "length"
    text = free.choices[0].message.content
    stop = text[4:6]
    cut = oai.chat.completions.create(model="gpt", messages=MESSAGES, seed=3, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_in_the_chat_layout(oai):
    kw = dict(max_tokens=6, seed=11, extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(model="gpt", messages=MESSAGES, logprobs=True, top_logprobs=2, **kw)
    plain = oai.completions.create(model="gpt", prompt=RENDERED, logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == plain.choices[0].logprobs.tokens
    assert [t.logprob for t in content] == plain.choices[0].logprobs.token_logprobs
    assert bytes(b for t in content for b in t.bytes) == r.choices[0].message.content.encode()
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               and all(isinstance(top.bytes, list) for top in t.top_logprobs) for t in content)
    bare = oai.chat.completions.create(model="gpt", messages=MESSAGES, logprobs=True, **kw)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)


def test_streaming_adds_up_to_the_answer(oai):
    kw = dict(model="gpt", messages=MESSAGES, max_tokens=12, seed=5, n=2, logprobs=True)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    for i, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(ch.delta.content or "" for ch in mine) == choice.message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [choice.finish_reason]
        assert [t.token for ch in mine if ch.logprobs for t in ch.logprobs.content] == \
            [t.token for t in choice.logprobs.content]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_a_raw_stream_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "gpt", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"' in lines[-2]


TOO_LONG = "context_length_exceeded"


@pytest.mark.parametrize("change, param, code", [
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages.0.role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"response_format": {"type": "json_object"}}, "response_format", None),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"echo": True}, "echo", None),  # vLLM's chat echo: not taken (unknown fields are refused)
    ({"max_tokens": 64}, "max_tokens", TOO_LONG),
    ({"max_completion_tokens": 60}, "max_completion_tokens", TOO_LONG),
    ({"messages": [{"role": "user", "content": "word " * 100}]}, "messages", TOO_LONG),
])
def test_bad_requests_name_the_field(oai, server, change, param, code):
    def errors() -> float:
        return metric_value(httpx.get(f"{server.url}/metrics", timeout=30).text, "condgen_request_errors_total",
                            'endpoint="/v1/chat/completions",status="400"')

    before = errors()
    body = {"model": "gpt", "messages": MESSAGES, **change}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="gpt", messages=body.pop("messages"),
                                    extra_body={k: v for k, v in body.items() if k != "model"})
    assert (e.value.body["param"], e.value.code) == (param, code), e.value.body
    if code:
        assert "This model's maximum context length is 64 tokens" in e.value.message
    assert errors() == before + 1


def test_the_route_is_in_the_openapi_document(client):
    doc = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in doc["paths"] and "ChatCompletionBody" in doc["components"]["schemas"]
