"""text-generation-inference's API on the text model: POST /generate_stream, POST / (TGI's
compat route, `stream` chooses) and POST /generate with TGI's body (`inputs`; a body with
`prompt` there asks for images). What huggingface_hub's `InferenceClient.text_generation`
sends (and LangChain's `HuggingFaceEndpoint` through it).

TGI's conventions, kept: greedy unless `do_sample` or a sampling parameter is set; a stop
sequence stays in the generated text; finish reasons `length`, `eos_token`, `stop_sequence`;
each token comes with its id, text and logprob; a stream's last event carries the whole text
and the details. The request's fields: `service.schemas.TGIBody`.
"""
from __future__ import annotations

from typing import Any

from models.engine import MAX_LOGPROBS, MAX_STOP, CompletionRequest, StreamEvent, TokenLogprob
from models.sampling import MAX_SEED, SamplingParams
from models.tokenizer import Tokenizer
from service.schemas import ApiError, TGIParameters

# The routes that answer only TGI's requests (/generate and /tokenize answer TGI's when the body
# has `inputs` and no `prompt`): their errors come in TGI's shape (`error`), the overload and
# deadline limits' included (the API key's 401 keeps the service's shape).
ROUTES = frozenset({"/generate_stream", "/", "/info"})
# What TGI's own clients send as `model` to a TGI server, which ignores it: huggingface_hub's
# InferenceClient, given the server's URL, sends "dummy"; TGI's docs and LiteLLM's huggingface/tgi,
# "tgi". On the text routes they name the default text model (unless a served model has the name).
PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's, when the context leaves that much
FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
# The engine's field names, as a TGI request calls them (for the `param` of a 400).
PARAM = {"prompt": "inputs", "max_tokens": "parameters.max_new_tokens", "logprobs": "parameters.top_n_tokens",
         "seed": "parameters.seed", "stop": "parameters.stop", "top_k": "parameters.top_k",
         "top_p": "parameters.top_p", "temperature": "parameters.temperature",
         "repetition_penalty": "parameters.repetition_penalty", "frequency_penalty": "parameters.frequency_penalty",
         "n": "parameters.best_of"}  # the engine's n: best_of's candidates


def error(err: ApiError) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error in TGI's shape, `{"error": message, "error_type": kind}`, which
    huggingface_hub raises as its ValidationError, OverloadedError or GenerationError: a bad
    request is a 422 there (other 4xx keep their status). `param` and `code` stay, as this
    service's other errors name the field."""
    kind = "overloaded" if err.status == 429 else "generation" if err.status >= 500 else "validation"
    status = 422 if err.status == 400 else err.status
    return status, {"error": err.message, "error_type": kind, "param": err.param, "code": err.code}


def samples(p: TGIParameters) -> bool:
    """TGI samples when asked to, or when any sampling parameter is set; else it is greedy."""
    return p.do_sample or (p.temperature is not None and p.temperature != 1) or p.top_k is not None \
        or (p.top_p is not None and p.top_p < 1) or (p.typical_p is not None and p.typical_p < 1)


def check_best_of(p: TGIParameters, stream: bool) -> None:
    """TGI's rules for what a stream cannot carry (the prompt's details, best_of above 1: the
    best is known only once all are done), and for best_of's sampled candidates (greedy ones
    would all be the same)."""
    if stream and p.decoder_input_details:
        raise ApiError(400, "parameters.decoder_input_details: true is not supported when streaming tokens, as in "
                            "TGI", "parameters.decoder_input_details")
    if (p.best_of or 1) == 1:
        return
    if stream:
        raise ApiError(400, "parameters.best_of: above 1 cannot be streamed (the best is known at the end), as in "
                            "TGI", "parameters.best_of")
    if not samples(p):
        raise ApiError(400, "parameters.best_of: above 1 needs sampling (do_sample, or a sampling parameter), as in "
                            "TGI: greedy candidates would all be the same", "parameters.best_of")
    if p.seed is not None and p.seed + p.best_of - 1 > MAX_SEED:
        raise ApiError(400, f"parameters.seed: at most {MAX_SEED - p.best_of + 1} with best_of {p.best_of} "
                            f"(candidate j uses seed + j, at most {MAX_SEED})", "parameters.seed")


def check_truncate(p: TGIParameters, context: int) -> None:
    """TGI's bound on `truncate`: at most the input's limit (`/info`'s max_input_tokens); a
    larger value keeps every token, and the length check would blame `inputs` for it."""
    if p.truncate is not None and p.truncate > context - 1:
        raise ApiError(400, f"parameters.truncate: must be at most the model's max_input_tokens, {context - 1} "
                            f"(its context of {context} tokens less one to generate); given {p.truncate}",
                       "parameters.truncate")


def check_length(ids: list[int], p: TGIParameters, context: int) -> None:
    """TGI's length check, in its words: the input leaves room for max_new_tokens (or one)."""
    if len(ids) >= context:
        raise ApiError(400, f"inputs: {len(ids)} tokens, and the model's context is {context} tokens with at "
                            "least one to generate (send parameters.truncate to keep the input's end)", "inputs",
                       code="context_length_exceeded")
    if p.max_new_tokens is not None and len(ids) + p.max_new_tokens > context:
        raise ApiError(400, f"parameters.max_new_tokens: inputs ({len(ids)} tokens) + max_new_tokens "
                            f"({p.max_new_tokens}) must be at most the model's context of {context} tokens",
                       "parameters.max_new_tokens", code="context_length_exceeded")


def info(tag: str, context: int, dtype: str, device: str, max_requests: int, max_best_of: int) -> dict[str, Any]:
    """GET /info, as TGI describes itself (huggingface_hub's `get_endpoint_info`)."""
    return {"model_id": tag, "model_sha": tag.split(":", 1)[1], "model_dtype": dtype, "model_device_type": device,
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": max_requests,
            "max_best_of": max_best_of, "max_stop_sequences": MAX_STOP, "max_input_tokens": context - 1, "max_total_tokens": context,
            "max_top_n_tokens": MAX_LOGPROBS, "router": "condgen", "version": "1"}


def completion_request(inputs: str, ids: list[int], p: TGIParameters, seed: int, context: int) -> CompletionRequest:
    """The engine's request for a TGI request whose input is `ids` (already tokenized, and cut
    to `truncate`, and within the context: `check_length`). Without max_new_tokens: 100, or what
    the context leaves."""
    max_new = p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, context - len(ids))
    sampling = SamplingParams(temperature=(p.temperature or 1.0) if samples(p) else 0.0, top_k=p.top_k or 0,
                              top_p=p.top_p or 1.0, typical_p=p.typical_p or 1.0,
                              repetition_penalty=p.repetition_penalty or 1.0,
                              frequency_penalty=p.frequency_penalty or 0.0)
    return CompletionRequest(prompt=inputs, prompt_ids=ids, seed=seed, max_tokens=max_new, sampling=sampling,
                             stop=list(p.stop), include_stop_str_in_output=True, logprobs=p.top_n_tokens or 0,
                             prompt_logprobs=p.details and p.decoder_input_details, n=p.best_of or 1)


class TokenSplitter:
    """Gives each of a choice's tokens, as the engine releases its logprob entry (an entry
    waits with its text while that text may begin a stop sequence), its share of the text:
    from where the text given out so far ends to where the token's own text ends (the
    released text's end, for the text a stop sequence cut), so that the tokens' texts add up
    to the text and a token that ends inside a character gets nothing, the one completing it
    the character."""

    def __init__(self) -> None:
        self.text = ""  # released so far
        self.given = 0  # characters of it handed to tokens

    def add(self, ev: StreamEvent) -> list[tuple[TokenLogprob, str]]:
        self.text += ev.text
        out = []
        for entry, after in zip(ev.logprobs, [*ev.logprobs[1:], None]):
            # The tokens of one character share its span (and are released together): all but
            # the last end inside it. Different tokens with one non-empty span are nothing else.
            shared = after is not None and (after.offset, after.end) == (entry.offset, entry.end)
            if shared and entry.end > entry.offset:
                out.append((entry, ""))
                continue
            end = min(max(entry.end, self.given), len(self.text))
            out.append((entry, self.text[self.given:end]))
            self.given = end
        return out


def token_json(tokenizer: Tokenizer, token_id: int, logprob: float | None, text: str) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id == tokenizer.eot_id}


def top_tokens_json(tokenizer: Tokenizer, entry: TokenLogprob) -> list[dict[str, Any]]:
    """A token's likeliest alternatives, as TGI lists them (top_n_tokens)."""
    return [token_json(tokenizer, t, lp, tokenizer.decode([t])) for t, lp in zip(entry.top_ids, (entry.top or {}).values())]


def prefill_json(tokenizer: Tokenizer, ids: list[int], entries: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    """The input's tokens with their logprobs given those before (decoder_input_details); the
    first has none."""
    return [{"id": t, "text": tokenizer.decode([t]), "logprob": e.logprob} for t, e in zip(ids, entries or [])]


class Generated:
    """A TGI answer built from a request's events: its tokens (each with its text, logprob and,
    with top_n_tokens, alternatives), the input's tokens (decoder_input_details), the finish."""

    def __init__(self, tokenizer: Tokenizer, p: TGIParameters, input_ids: list[int], prefix: str, seed: int | None):
        self.tokenizer, self.p, self.input_ids, self.prefix, self.seed = tokenizer, p, input_ids, prefix, seed
        self.splitter = TokenSplitter()
        self.tokens: list[dict[str, Any]] = []
        self.top_tokens: list[list[dict[str, Any]]] = []
        self.prefill: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None

    def add(self, ev: StreamEvent) -> list[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """The tokens this event gives out (with their alternatives when asked for)."""
        if ev.prompt_logprobs is not None:
            self.prefill = ev.prompt_logprobs
        if ev.finish_reason:
            self.finish_reason = FINISH[ev.finish_reason]
        new = []
        for entry, text in self.splitter.add(ev):
            token = token_json(self.tokenizer, entry.token_id, entry.logprob, text)
            top = top_tokens_json(self.tokenizer, entry) if self.p.top_n_tokens else None
            self.tokens.append(token)
            self.top_tokens.append(top or [])
            new.append((token, top))
        return new

    @property
    def generated_text(self) -> str:
        return self.prefix + self.splitter.text

    @property
    def score(self) -> float:
        """What best_of ranks candidates by, as TGI does: the mean of their tokens' logprobs
        (a sum would favour the short ones)."""
        if not self.tokens:
            return float("-inf")
        return sum(token["logprob"] for token in self.tokens) / len(self.tokens)

    def sequence(self) -> dict[str, Any]:
        """The details of one sequence (of the answer, or one of its best_of_sequences)."""
        return {"generated_text": self.generated_text, "finish_reason": self.finish_reason,
                "generated_tokens": len(self.tokens), "seed": self.seed,
                "prefill": prefill_json(self.tokenizer, self.input_ids, self.prefill), "tokens": self.tokens,
                **({"top_tokens": self.top_tokens} if self.p.top_n_tokens else {})}

    def response(self, others: list[Generated] | None = None) -> dict[str, Any]:
        """/generate's answer: the text, and the details when asked for (with best_of, the other
        candidates' in best_of_sequences)."""
        out: dict[str, Any] = {"generated_text": self.generated_text}
        if self.p.details:
            details = self.sequence()
            del details["generated_text"]
            out["details"] = {**details, "best_of_sequences": [g.sequence() for g in others] if others else None}
        return out

    def stream_event(self, index: int, token: dict[str, Any], top: list[dict[str, Any]] | None,
                     last: bool) -> dict[str, Any]:
        """One stream event per token (index from 1); the last also carries the text, and the
        details when asked for (TGI sends them only then)."""
        details = {"finish_reason": self.finish_reason, "generated_tokens": len(self.tokens), "seed": self.seed,
                   "input_length": len(self.input_ids)} if last and self.p.details else None
        return {"index": index, "token": token, **({"top_tokens": top} if top is not None else {}),
                "generated_text": self.generated_text if last else None, "details": details}
