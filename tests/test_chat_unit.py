"""The chat route's own parts, without a server: the template (loading, rendering, its
refusals), the request body (what is taken, what is refused and named), and the answer's
layout, checked against the openai client's types."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette

from models.engine import Choice, Completion, StreamEvent, TokenLogprob
from models.errors import InvalidParameter
from models.tokenizer import EOT, Tokenizer
from service.chat import MAX_MESSAGES, ChatChunks, ChatTemplate, chat_names, parse, prompt, response, template_from_env
from service.env import ConfigError
from service.limits import GENERATION_PATHS
from service.openapi import build_openapi
from service.schemas import ApiError
from service.security import JSONRoutingErrors

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "chat_template.jinja"


def _template(tmp_path: Path, source: str) -> ChatTemplate:
    path = tmp_path / "t.jinja"
    path.write_text(source)
    return ChatTemplate.load(str(path))


def _body(**fields) -> dict:
    return {"model": "gpt", "messages": [{"role": "user", "content": "Hi"}], **fields}


def test_a_template_that_cannot_be_read_or_compiled_stops_the_start_up(tmp_path):
    with pytest.raises(ConfigError, match="CONDGEN_CHAT_TEMPLATE='/nowhere/t.jinja': cannot read"):
        template_from_env({"CONDGEN_CHAT_TEMPLATE": "/nowhere/t.jinja"})
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n")
    with pytest.raises(ConfigError, match=r"CONDGEN_CHAT_TEMPLATE='.*bad.jinja': line \d+: "):
        template_from_env({"CONDGEN_CHAT_TEMPLATE": str(bad)})
    bad.write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(ConfigError, match="CONDGEN_CHAT_TEMPLATE=.*not UTF-8"):
        template_from_env({"CONDGEN_CHAT_TEMPLATE": str(bad)})
    assert template_from_env({}) is None and template_from_env({"CONDGEN_CHAT_TEMPLATE": " "}) is None


def test_the_example_template_writes_each_role_and_opens_the_answer():
    template = ChatTemplate.load(str(EXAMPLE))
    messages = [{"role": r, "content": f"{r} says"} for r in ("system", "developer", "user", "assistant")]
    assert template.render(messages, add_generation_prompt=True) == \
        "<|system|>\nsystem says\n<|developer|>\ndeveloper says\n<|user|>\nuser says\n<|assistant|>\nassistant says\n" \
        "<|assistant|>\n"
    assert template.render(messages[:1], add_generation_prompt=False) == "<|system|>\nsystem says\n"


def test_text_parts_are_joined_with_newlines_and_names_reach_the_template(tmp_path):
    template = _template(tmp_path, "{% for m in messages %}[{{ m.name or '-' }}:{{ m.content }}]{% endfor %}"
                                   "{{ bos_token }}{{ eos_token }}")
    body = parse(_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}], "name": "ann"},
                                 {"role": "assistant", "content": "c", "tool_calls": [], "refusal": None}]))
    assert prompt(template, body) == f"[ann:a\nb][-:c]{EOT}{EOT}"


def test_a_template_that_raises_is_a_400_naming_the_messages(tmp_path):
    template = _template(tmp_path, "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations start "
                                   "with the user') }}{% endif %}{{ messages[0].content }}")
    with pytest.raises(ApiError) as e:
        prompt(template, parse(_body(messages=[{"role": "system", "content": "x"}])))
    assert (e.value.status, e.value.param) == (400, "messages")
    assert "Conversations start with the user" in e.value.message
    for source in ("{{ 1 // 0 }}", "{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}"):  # a bug; the sandbox
        with pytest.raises(ApiError) as e:
            _template(tmp_path, source).render([{"role": "user", "content": "x"}], add_generation_prompt=True)
        assert e.value.param == "messages"


def test_continue_final_message_ends_the_prompt_inside_the_last_message():
    template = ChatTemplate.load(str(EXAMPLE))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    body = parse(_body(messages=messages, add_generation_prompt=False, continue_final_message=True))
    assert prompt(template, body) == "<|user|>\nHi\n<|assistant|>\nHel"
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]  # as transformers: uncut
    body = parse(_body(messages=empty, add_generation_prompt=False, continue_final_message=True))
    assert prompt(template, body) == "<|user|>\nHi\n<|assistant|>\n\n"
    with pytest.raises(ApiError) as e:  # vLLM's rule: not both
        parse(_body(messages=messages, continue_final_message=True))
    assert e.value.param == "continue_final_message"


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages.0.tool_calls"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "json_schema"}}, "response_format"), ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"prediction": {"type": "content"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"), ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"store": True}, "store"), ({"store": 0}, "store"), ({"best_of": 2}, "best_of"),
    ({"service_tier": "flex"}, "service_tier"), ({"verbosity": "low"}, "verbosity"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"), ({"metadata": "tag"}, "metadata"),
    ({"top_logprobs": 1}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"n": 17}, "n"),
    ({"messages": [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)}, "messages"),
])
def test_refused_fields_are_named(fields, param):
    with pytest.raises(ApiError) as e:
        parse(_body(**fields))
    assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_neutral_values_and_the_client_s_nulls_are_taken():
    body = parse(_body(tools=[], tool_choice="none", functions=[], function_call="none",
                       response_format={"type": "text"}, modalities=["text"], reasoning_effort="none", store=False,
                       parallel_tool_calls=True, user="u", audio=None, temperature=None, seed=-1, max_tokens=4,
                       max_completion_tokens=4, service_tier="auto", verbosity="medium", metadata={"run": "1"},
                       prompt_cache_key="k", safety_identifier="s", prompt_cache_retention="24h"))
    assert body.seed is None and body.temperature == 1.0  # (OpenAI's own fields were "not OpenAI's" before)


def test_the_completion_it_runs_as():
    body = parse(_body(logprobs=True, top_logprobs=3, n=2, seed=4, stop="x", extra_unused=None))
    as_completion = body.completion([5, 6, 7], context=64)
    assert as_completion.prompts() == [[5, 6, 7]] and as_completion.max_tokens == 61  # what the context leaves
    assert (as_completion.logprobs, as_completion.n, as_completion.seed, as_completion.stop) == (3, 2, 4, ["x"])
    assert not as_completion.echo and as_completion.candidates() == 2
    assert parse(_body(max_completion_tokens=9)).completion([5], 64).max_tokens == 9
    assert parse(_body(logprobs=True)).completion([5], 64).logprobs == 0
    assert parse(_body()).completion([5], 64).logprobs is None
    with pytest.raises(ApiError) as e:  # no limit sent: not "max_tokens (1)", which the client never sent
        parse(_body()).completion(list(range(64)), 64)
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")
    assert "the prompt the chat template made is 64 tokens" in e.value.message and "max_tokens" not in e.value.message
    assert parse(_body(max_tokens=3)).completion(list(range(64)), 64).max_tokens == 3  # the engine's check refuses


def test_errors_of_the_completion_path_name_the_chat_fields():
    body = parse(_body(max_completion_tokens=9))
    for inner, outer in (("prompt", "messages"), ("max_tokens", "max_completion_tokens"), ("seed", "seed")):
        with pytest.raises(InvalidParameter) as e, chat_names(body):
            raise InvalidParameter(inner, "bad", code="context_length_exceeded")
        assert (e.value.param, e.value.code, str(e.value)) == (outer, "context_length_exceeded", f"{outer}: bad")
    with pytest.raises(InvalidParameter) as e, chat_names(body):  # the message names the client's field too
        raise InvalidParameter("prompt", "prompt (60 tokens) + max_tokens (9) exceeds the context")
    assert str(e.value) == "messages: prompt (60 tokens) + max_completion_tokens (9) exceeds the context"
    with pytest.raises(InvalidParameter) as e, chat_names(parse(_body())):  # no limit sent: the default's bound
        raise InvalidParameter("min_tokens", "must be in [0, max_tokens=5], got 9")
    assert str(e.value) == "min_tokens: must be in [0, what the context leaves after the prompt, 5], got 9"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["héllo wörld, hello world"] * 20, vocab_size=300)


def _entries(tok: Tokenizer, text: str) -> list[TokenLogprob]:
    ids = tok.encode(text)
    return [TokenLogprob(tok.token_name(i), -0.5, {tok.token_name(i): -0.5, tok.token_name(tok.eot_id): -2.0}, 0, i,
                         (i, tok.eot_id)) for i in ids]


def test_the_answer_in_openai_s_chat_layout(tokenizer):
    head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt:v", "seed": 3}
    done = Completion([Choice(0, "héllo", "eos", [], _entries(tokenizer, "héllo")),
                       Choice(1, "wörld", "length", [], _entries(tokenizer, "wörld"))], 4, 7)
    answer = ChatCompletion.model_validate(response(head, done, tokenizer))
    assert [c.finish_reason for c in answer.choices] == ["stop", "length"]
    assert answer.choices[0].message.content == "héllo" and answer.usage.total_tokens == 11
    lp = answer.choices[1].logprobs.content
    assert bytes(b for t in lp for b in t.bytes) == "wörld".encode()
    assert lp[0].top_logprobs[1].token == EOT and lp[0].top_logprobs[1].bytes == list(EOT.encode())
    plain = response(head, Completion([Choice(0, "x", "stop", [], None)], 1, 1), tokenizer)
    assert plain["choices"][0]["logprobs"] is None


def test_stream_chunks_in_openai_s_chat_layout(tokenizer):
    chunks = ChatChunks(n=2, tokenizer=tokenizer, logprobs=True)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt:v"}
    opening = [ChatCompletionChunk.model_validate({**head, "choices": [c]}) for c in chunks.opening()]
    assert [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content) for c in opening] == \
        [(0, "assistant", ""), (1, "assistant", "")]
    text = StreamEvent(0, 1, "hé", 1, _entries(tokenizer, "hé"), None)
    last = StreamEvent(0, 1, "", 1, [], "eos")
    parsed = [ChatCompletionChunk.model_validate({**head, "choices": [chunks.choice(ev)]}).choices[0]
              for ev in (text, last)]
    assert (parsed[0].index, parsed[0].delta.content, parsed[0].finish_reason) == (1, "hé", None)
    assert bytes(b for t in parsed[0].logprobs.content for b in t.bytes) == "hé".encode()
    assert (parsed[1].delta.content, parsed[1].finish_reason) == (None, "stop")
    assert chunks.choice(StreamEvent(0, 0, "", 1, [], None)) is None  # nothing to send yet (a held token)


def test_without_a_template_the_route_says_how_to_enable_it():
    """What an OpenAI client tries first: a 404 that names the setting (as vLLM needs
    --chat-template for a model without one), in the JSON error shape."""
    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=JSONRoutingErrors(Starlette()))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json=_body())

    r = asyncio.run(scenario())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "CONDGEN_CHAT_TEMPLATE" in r.json()["error"]["message"]


def test_the_route_is_limited_and_documented_only_when_it_exists():
    assert "/v1/chat/completions" in GENERATION_PATHS  # in-flight limit and deadline
    assert "/v1/chat/completions" not in build_openapi()["paths"]
    doc = build_openapi(chat=True)
    assert "/v1/chat/completions" in doc["paths"]
    body = doc["components"]["schemas"]["ChatCompletionBody"]
    assert body["additionalProperties"] is False and body["properties"]["tools"]["anyOf"][0] == {"enum": [[]]}
    assert set(body["required"]) == {"model", "messages"}


def test_a_long_refused_value_is_shown_cut_and_marked():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(ApiError) as e:
        parse(_body(tools=tools))
    assert e.value.message.startswith('tools [{"type": "function", "function": {"name": "get_weather", "p… is not')
