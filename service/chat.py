"""POST /v1/chat/completions: a conversation, turned into one prompt by a chat template.

The text model is a plain language model: it continues text. A chat template (Jinja2, in
Hugging Face's convention, named by CONDGEN_CHAT_TEMPLATE as vLLM's --chat-template names one)
writes the messages out as the text the model was trained on, and that prompt then runs
exactly as a /v1/completions prompt does (service.app). What is chat's own lives here: the
request body, the template, and the answer's shape (a message or deltas; logprobs per token,
with its bytes). Without a template the route does not exist (a 404 that says how to enable
it: service.security).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from models.engine import MAX_LOGPROBS, Completion, StreamEvent, TokenLogprob
from models.errors import InvalidParameter
from models.tokenizer import EOT, Tokenizer
from service.encode import openai_finish_reason, usage
from service.env import ConfigError
from service.schemas import (MAX_TOKENS_LIMIT, ApiError, ForeignFields, ModelName, OpenAICompletionBody,
                             StreamOptions, TextSampling, _Body, _NullIsDefault, from_validation_error)

TEMPLATE_ENV = "CONDGEN_CHAT_TEMPLATE"


class TemplateRefused(Exception):
    """The template's own refusal (`raise_exception`, as Hugging Face's templates call it)."""


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face's: Jinja2's own escapes HTML characters, which a prompt must keep as they are.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment Hugging Face renders chat templates in (transformers' apply_chat_template):
    sandboxed, trimmed blocks, loop controls, and its helpers, so their templates work unchanged."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    template: jinja2.Template
    path: str

    @classmethod
    def load(cls, path: str) -> "ChatTemplate":
        """Read and compile the template once, at start-up: a missing file or a syntax error
        stops the start-up, naming the variable, rather than failing every chat request."""
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{TEMPLATE_ENV}={path!r}: cannot read the chat template ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{TEMPLATE_ENV}={path!r}: the chat template is not UTF-8 text") from None
        try:
            return cls(_environment().from_string(source), path)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{TEMPLATE_ENV}={path!r}: line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The prompt; a template that raises for these messages is the client's 400, naming them.
        bos_token and eos_token are the end-of-text token's text (GPT-2's convention: one token
        for both); like any text in a prompt here, they are tokenized as text, not as that token."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=EOT, eos_token=EOT)
        except Exception as e:  # the template is the operator's code: whatever it raises is about these messages
            raise ApiError(400, f"messages: the chat template refused them: {e}", "messages") from None


def template_path(environ: Mapping[str, str]) -> str:
    """The file CONDGEN_CHAT_TEMPLATE names; empty when unset (no chat route)."""
    return environ.get(TEMPLATE_ENV, "").strip()


def template_from_env(environ: Mapping[str, str]) -> ChatTemplate | None:
    """The template CONDGEN_CHAT_TEMPLATE names, compiled; None when unset or empty."""
    return ChatTemplate.load(path) if (path := template_path(environ)) else None


# ---- the request ----------------------------------------------------------------------------

TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


def _text_of(content: Any) -> Any:
    """A message's content as one string: a string, or OpenAI's list of text parts joined with
    newlines (as vLLM joins them). Any other part (an image, audio, a file) is refused, naming
    the part: the model reads text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"type {json.dumps(kind)[:40]}" if isinstance(part, dict) else "not an object"
            raise ValueError(f"part {i} ({what}) is not supported: the text model reads only text parts, "
                             "{\"type\": \"text\", \"text\": ...}")
        if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
            raise ValueError(f"part {i}: a text part is {{\"type\": \"text\", \"text\": <string>}} and nothing else")
        texts.append(part["text"])
    return "\n".join(texts)


MessageContent = Annotated[str, BeforeValidator(_text_of),
                           WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]})]


class ChatMessage(_Body, _NullIsDefault):
    """One message. No tools here, so no `tool` role, and an assistant message has no tool calls."""
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="passed to the template as it is: the template decides what each role becomes")
    content: MessageContent
    name: str | None = Field(None, description="passed to the template (as `name`), which may use it")
    tool_calls: list[Any] | None = Field(None, description="only empty: no tools here",
                                         json_schema_extra={"maxItems": 0})

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool calls are not supported: this server has no tools")
        return v

    def for_template(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content, **({"name": self.name} if self.name is not None else {})}


# Messages per request: more than the presets' contexts hold (each takes a token or more), and few
# enough to check on the event loop: 27,000 one-letter messages (a 0.9 MB body) held it 0.35 s.
MAX_MESSAGES = 2048

# OpenAI's features that this model cannot have (tools, structured output, audio, web search,
# reasoning, stored completions): taken at the values that leave them off, refused otherwise.
CHAT_FIELDS = ForeignFields(
    "OpenAI's", "an OpenAI chat completions field", "by this server's text model (no tools, structured output, "
    "audio, predicted outputs, web search, reasoning or stored completions)",
    {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
     "response_format": ({"type": "text"},), "audio": (), "modalities": (["text"],), "prediction": (),
     "web_search_options": (), "reasoning_effort": ("none",), "store": (False,), "moderation": (),
     "service_tier": ("auto", "default"), "verbosity": ("medium",)},
    # OpenAI's bookkeeping, which means nothing to this server: no stored completions to tag, no
    # prompt cache to key, and a caller's id is no more use than `user`
    {"metadata": "object", "prompt_cache_key": "string", "prompt_cache_options": "object",
     "prompt_cache_retention": "string", "safety_identifier": "string"}, "accepted, no effect here")


class ChatCompletionBody(TextSampling):
    """POST /v1/chat/completions: OpenAI's chat request (with vLLM's extras, as /v1/completions
    takes them); the fields of CHAT_FIELDS only at their neutral values."""
    model_config = ConfigDict(extra="allow", json_schema_extra=CHAT_FIELDS.list_in)  # checked by `unsupported`
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT,
                                   description="default: what the context leaves after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT,
                                              description="OpenAI's newer name for max_tokens: either")
    logprobs: bool = Field(False, description="each generated token's logprob and bytes")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (with logprobs)")
    stream_options: StreamOptions | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = Field(None, description="accepted either way: no tools, so none in parallel")
    add_generation_prompt: bool = Field(True, description="vLLM's: the template opens the assistant's turn")
    continue_final_message: bool = Field(False, description="vLLM's: the prompt ends inside the last message, which "
                                                            "the answer continues (add_generation_prompt false)")

    def unsupported(self) -> ApiError | None:
        if (err := CHAT_FIELDS.error(self.model_extra or {})) is not None:
            return err
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            return ApiError(400, "max_completion_tokens and max_tokens differ: send one of them",
                            "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:  # as OpenAI and vLLM answer
            return ApiError(400, "top_logprobs needs logprobs true", "top_logprobs")
        if self.stream_options is not None and not self.stream:
            return ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.continue_final_message and self.add_generation_prompt:  # as vLLM answers
            return ApiError(400, "continue_final_message continues the last message: send add_generation_prompt "
                                 "false with it", "continue_final_message")
        return None

    def max_tokens_field(self) -> str:
        """The name the client gave the length limit, for the errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def completion(self, prompt_ids: list[int], context: int) -> OpenAICompletionBody:
        """The same request as /v1/completions takes it, with the rendered prompt's ids; without a
        limit, up to what the context leaves after the prompt (as vLLM does; at least one token,
        so that a prompt that fills the context is refused as /v1/completions refuses it)."""
        limit = self.max_completion_tokens or self.max_tokens
        if limit is None and len(prompt_ids) >= context:  # (the engine's message would name a max_tokens of 1)
            raise ApiError(400, f"messages: This model's maximum context length is {context} tokens. However, the "
                                f"prompt the chat template made is {len(prompt_ids)} tokens, which leaves none to "
                                "generate. Please reduce the length of the messages.", "messages",
                           code="context_length_exceeded")
        limit = limit or min(MAX_TOKENS_LIMIT, context - len(prompt_ids))
        shared = {name: getattr(self, name) for name in TextSampling.model_fields}
        # Constructed, not validated: every field was checked here, and a prompt's ids may
        # outnumber the token arrays a client may send (MAX_TOKENS_LIMIT).
        return OpenAICompletionBody.model_construct(
            **shared, model=self.model, prompt=prompt_ids, max_tokens=limit, echo=False,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None, stream_options=self.stream_options)


def parse(data: dict[str, Any]) -> ChatCompletionBody:
    """The body, checked: a 400 names the field down to the message ("messages.2.role")."""
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e, depth=3) from None
    if (err := body.unsupported()) is not None:
        raise err
    return body


def prompt(template: ChatTemplate, body: ChatCompletionBody) -> str:
    """The messages as the template writes them. With continue_final_message, the prompt stops
    where the last message's content ends (what the template closes it with is cut off), as
    transformers and vLLM do it, so that the answer continues that message."""
    text = template.render([m.for_template() for m in body.messages], body.add_generation_prompt)
    if not body.continue_final_message:
        return text
    last = body.messages[-1].content
    if not last:  # nothing to continue from: the prompt as made (transformers' rindex("") is its end)
        return text
    for final in (last, last.strip()):  # a template may trim the content
        if final and (at := text.rfind(final)) >= 0:
            return text[:at + len(final)]
    raise ApiError(400, "continue_final_message: the last message's content is not in the prompt the chat template "
                        "made", "continue_final_message")


@contextlib.contextmanager
def chat_names(body: ChatCompletionBody) -> Iterator[None]:
    """Errors of the completion path, named as the chat request names the fields: its prompt is
    the messages, its max_tokens what the client called it, or, where it sent none, what the
    context leaves after the prompt (min_tokens' bound), in the message as in `param`."""
    sent = body.max_tokens is not None or body.max_completion_tokens is not None
    names = {"prompt": "messages", "max_tokens": body.max_tokens_field()}
    try:
        yield
    except InvalidParameter as e:
        if e.param not in names and "max_tokens" not in e.message:
            raise
        message = (e.message.replace("max_tokens", body.max_tokens_field()) if sent
                   else e.message.replace("max_tokens=", "what the context leaves after the prompt, "))
        raise InvalidParameter(names.get(e.param, e.param), message, e.code) from None


# ---- the answer -----------------------------------------------------------------------------

def token_logprobs(items: list[TokenLogprob], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """OpenAI's chat layout of logprobs: per token its text, logprob and UTF-8 bytes (which
    rebuild a character that several tokens share), and its alternatives likewise."""
    def entry(token_id: int, name: str, logprob: float) -> dict[str, Any]:
        return {"token": name, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}

    return [{**entry(lp.token_id, lp.token, lp.logprob),
             "top_logprobs": [entry(i, name, v) for i, (name, v) in zip(lp.top_ids, (lp.top or {}).items())]}
            for lp in items]


def response(head: dict[str, Any], result: Completion, tokenizer: Tokenizer) -> dict[str, Any]:
    """A chat.completion: each choice as the assistant's message."""
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": token_logprobs(c.logprobs, tokenizer)} if c.logprobs is not None else None,
                "finish_reason": openai_finish_reason(c.finish_reason)} for c in result.choices]
    return {**head, "choices": choices, "usage": usage(result.prompt_tokens, result.completion_tokens)}


@dataclass
class ChatChunks:
    """A stream's choices in chat.completion.chunk's layout (service.app's `_stream` sends them):
    each choice opens with the assistant's role, then its text as content deltas, the last with
    its finish_reason."""
    n: int
    tokenizer: Tokenizer
    logprobs: bool

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def choice(self, ev: StreamEvent) -> dict[str, Any] | None:
        if not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        return {"index": ev.choice, "delta": {"content": ev.text} if ev.text or ev.finish_reason is None else {},
                "logprobs": {"content": token_logprobs(ev.logprobs, self.tokenizer)} if self.logprobs else None,
                "finish_reason": openai_finish_reason(ev.finish_reason)}
