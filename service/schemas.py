"""Request bodies (pydantic, with the limits enforced by type) and the one error shape.

Every client mistake becomes `ApiError` and is answered as OpenAI does:
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, so the official
client raises its usual `BadRequestError` / `NotFoundError` and `param` names the field.
The engines check the rest (prompt length in tokens, model-specific ranges) and raise
`models.errors.InvalidParameter`, which maps to the same shape.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

from models.ar_image import MAX_GUIDANCE
from models.engine import MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_TOKENS  # MAX_N: images per image request too
from models.sampling import (MAX_LOGIT_BIAS_TOKENS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_SEED, MAX_TEMPERATURE,
                             MAX_TOP_K, MIN_REPETITION_PENALTY, SamplingParams)

MAX_TOKENS_LIMIT = 4096  # a hard cap; the engine enforces the model's own context length

# -1 means "pick one", as in AUTOMATIC1111 and ComfyUI (the same as leaving it out).
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED), AfterValidator(lambda v: None if v == -1 else v)]
# -1 turns top-k off, as in vLLM (the same as 0).
TopK = Annotated[int, Field(ge=-1, le=MAX_TOP_K), AfterValidator(lambda v: max(v, 0))]
# A store name, optionally with `:version` (BentoML's tag alphabet). Anything else, such as
# a path ("../x", "a/b"), spaces or control characters, is refused before any lookup.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(:[A-Za-z0-9._-]{1,64})?$"
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ImagePrompt = Annotated[str, Field(min_length=1, description="what to draw; not empty, nor only whitespace")]


class ApiError(Exception):
    """A response that is not a success: status, OpenAI-style type, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type,
                                 "param": self.param, "code": self.code}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


MAX_SHOWN_NAME = 100  # characters of a client's field name an error message repeats
MAX_SHOWN_PROBLEMS = 20


def shown_name(name: str) -> str:
    """A field name from the client (or a value: a model's name, a token id), as an error
    repeats it: cut short, so that a 900,000-character key is not sent back twice (message and
    param) in a 1.8 MB answer."""
    return name if len(name) <= MAX_SHOWN_NAME else name[:MAX_SHOWN_NAME] + "…"


def from_validation_error(exc: ValidationError, depth: int = 1) -> ApiError:
    """Name the offending field in `param` (its top-level name, or `depth` levels of its path:
    "parameters.top_p"); list the problems in the message (the first MAX_SHOWN_PROBLEMS)."""
    errors = _one_union_member(exc.errors(include_url=False, include_context=False, include_input=False))

    def path(err: dict[str, Any]) -> list[str]:
        return [shown_name(str(p)) for p in err["loc"] if not _is_member(p)]

    problems = list(dict.fromkeys(f"{'.'.join(path(e)) or 'body'}: {e['msg']}" for e in errors))
    if len(problems) > MAX_SHOWN_PROBLEMS:
        problems[MAX_SHOWN_PROBLEMS:] = [f"and {len(problems) - MAX_SHOWN_PROBLEMS} more"]
    first = path(errors[0]) if errors else []
    return ApiError(400, "; ".join(problems), param=".".join(first[:depth]) or None)


def _is_member(part: Any) -> bool:
    """Union members appear in an error's `loc` as type names ("list[constrained-str]"): not fields."""
    return not isinstance(part, int) and not str(part).isidentifier()


def _one_union_member(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A value of a union field (`stop`: a string or a list of them) is tried against each
    member, and pydantic reports every member's failure: `{"stop": ""}` was "String should
    have at least 1 character; Input should be a valid list". Keep the failures of the members
    whose type the value has; when it has none of them, one line: "Input should be a valid
    string or a valid list"."""
    def member_at(err: dict[str, Any]) -> int | None:
        return next((i for i, part in enumerate(err["loc"]) if _is_member(part)), None)

    def wrong_type(err: dict[str, Any]) -> bool:  # the value is not of this member's type at all
        i = member_at(err)
        return i is not None and len(err["loc"]) == i + 1 and err["type"].endswith("_type")

    kept: list[dict[str, Any]] = []
    for err in errors:
        i = member_at(err)
        if i is None:
            kept.append(err)
            continue
        field = err["loc"][:i]
        others = [e for e in errors if member_at(e) is not None and e["loc"][:member_at(e)] == field]
        if not wrong_type(err):
            kept.append(err)
        elif all(wrong_type(e) for e in others) and err is others[0]:
            wants = [e["msg"].removeprefix("Input should be ") for e in others]
            kept.append({**err, "msg": "Input should be " + " or ".join(dict.fromkeys(wants))})
    return kept


class _Body(BaseModel):
    # Unknown fields are mistakes (a typo such as `max_token` would otherwise be ignored
    # silently); NaN/inf never reach the samplers; types are strict, as OpenAI's are: "4",
    # true or 4.0 is not an integer, 1 or "yes" not a boolean (an integer is a fine float).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class _NullIsDefault(BaseModel):
    """OpenAI's API takes null for an optional field, meaning its default, and its official
    client sends such nulls (`temperature=None`); every route here does the same. A required
    field's null stays, to be refused as the wrong type (not as a missing field)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        required = {name for name, f in cls.model_fields.items() if f.is_required()}
        return {k: v for k, v in data.items() if v is not None or k in required}


class TextSampling(_Body, _NullIsDefault):
    """What every text-generation body shares with the engine: sampling, stops, n, seed, stream
    (POST /complete, /v1/completions and /v1/chat/completions)."""
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description="0 means greedy")
    top_k: TopK = Field(0, description="0 (or -1) turns it off")
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                    description="subtracted from tokens the completion holds")
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                     description="subtracted per occurrence in the completion")
    # The limits the validators below check, also in the JSON schema, for schema-driven clients
    # (keywords for objects and arrays, beside the union: null and a string pass them).
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (a string of digits) -> bias in [-100, 100], added to its logit",
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS_TOKENS, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                           "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
    stop: StopString | list[StopString] | None = Field(None, validate_default=True,
                                                       json_schema_extra={"maxItems": MAX_STOP})
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKENS, description="token ids that end a choice as a stop string does (vLLM's)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string or stop token in the text "
                                                                "(vLLM's)")
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT, description="neither end-of-text nor a stop token is "
                                                                      "drawn, nor a stop string checked, before this "
                                                                      "many tokens (vLLM's); at most max_tokens")
    ignore_eos: bool = Field(False, description="end-of-text is never drawn: every choice runs to max_tokens or a "
                                                "stop string (vLLM's; for load tests)")
    skip_special_tokens: bool = Field(True, description="false: a choice that draws end-of-text ends with its text, "
                                                        "<|endoftext|> (vLLM's)")
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Seed | None = Field(None, description="picked by the server when absent or -1; always reported")
    stream: bool = False

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _few_enough(cls, v: Any) -> Any:
        """Counted before each entry is checked: 70,000 took 0.1 s of the event loop."""
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key):
                raise ValueError(f"keys are token ids (strings of 1 to 9 digits), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100], got {bias:g} for {key}")
        return v

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty,
                              logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()))


class CompletionBody(TextSampling):
    """POST /complete."""
    model: ModelName | None = Field(None, description="model name or tag; default: the served text model")
    prompt: str
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS_LIMIT, description="0 only with echo: the prompt back (scored "
                                                                     "with logprobs), nothing generated")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    echo: bool = False

    def candidates(self) -> int:
        """Completions generated per prompt (OpenAI's best_of); the n best are answered."""
        return self.n

    def prompts(self) -> list[str | list[int]]:
        return [self.prompt]


class StreamOptions(_Body, _NullIsDefault):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, the usage so far in every chunk
    # OpenAI pads stream events with random characters against length side channels unless
    # this is false; this service does not pad, so either value gets no `obfuscation` field.
    include_obfuscation: bool = True


MAX_PROMPTS = 16  # prompts in one /v1/completions request
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TOKENS_LIMIT)]


class OpenAICompletionBody(CompletionBody):
    """POST /v1/completions: the OpenAI legacy completions request (the fields we honour)."""
    model: ModelName
    # OpenAI's four forms: a string, several, a token array, several (LangChain's OpenAI LLM
    # sends its prompts in batches; scorers send token ids)
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]  # type: ignore[assignment]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's: best_of candidates per prompt, of which the n with the highest mean token logprob
    # are answered (not streamed).
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    # Accepted for compatibility, but only at its neutral value (not implemented).
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_of_four_forms(cls, v: Any) -> Any:
        """One clear message for the usual mistakes, instead of the union's error for each form
        (the union's own limits stay, for the schema /openapi.json shows)."""
        forms = "a string, a list of strings, a token array or a list of token arrays"
        if not isinstance(v, (str, list)) or v == [] or (isinstance(v, list) and (
                len({type(x) for x in v}) > 1 or not isinstance(v[0], (str, int, list)))):
            raise ValueError(f"must be {forms} (each non-empty, one kind)")
        if isinstance(v, str):
            return v
        if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        arrays = [v] if isinstance(v[0], int) else v if isinstance(v[0], list) else []  # token arrays
        for ids in arrays:
            if not (isinstance(ids, list) and 1 <= len(ids) <= MAX_TOKENS_LIMIT
                    and all(type(t) is int and t >= 0 for t in ids)):
                raise ValueError(f"a token array holds 1 to {MAX_TOKENS_LIMIT} integers >= 0")
        return v

    def candidates(self) -> int:
        """Completions generated per prompt, of which the n best are answered."""
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else list(p)

    def unsupported(self) -> ApiError | None:
        if self.best_of is not None and self.best_of < self.n:  # OpenAI refuses it too
            return ApiError(400, f"best_of must be at least n ({self.n}), got {self.best_of}", "best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:  # OpenAI refuses it too
            return ApiError(400, "best_of above n cannot be streamed: the best are known once all are done",
                            "best_of")
        if self.suffix:
            return ApiError(400, "suffix is not supported", "suffix")
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer
            return ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        return None


AR_ONLY = "autoregressive image models only; a GAN answers 400"
GUIDANCE_DOC = "classifier-free guidance, 1 = off; default: the model's; " + AR_ONLY
TEMPERATURE_DOC = "0 is greedy; default: the model's; " + AR_ONLY
IMAGE_TOP_K_DOC = "0 (the default) or -1: off; " + AR_ONLY


class ImageBody(_Body, _NullIsDefault):
    """POST /generate."""
    model: ModelName | None = Field(None, description="model name or tag; default: the served image model")
    prompt: ImagePrompt
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Seed | None = Field(None, description="image i uses seed + i; picked by the server when absent or -1")
    truncation: float = Field(1.0, gt=0, le=1, description="latent truncation psi: smaller is tamer")
    response_format: Literal["b64_json", "png"] = "b64_json"
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description=GUIDANCE_DOC)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description=TEMPERATURE_DOC)
    top_k: TopK | None = Field(None, description=IMAGE_TOP_K_DOC)
    negative_prompt: str = Field("", description="what guidance steers away from (empty: nothing); " + AR_ONLY)


class OpenAIImageBody(_Body, _NullIsDefault):
    """POST /v1/images/generations (b64_json only: this service keeps no files to link to).
    OpenAI's options are taken at the values that mean what the service does anyway (PNG, an
    opaque image, no moderation to tune); any other value is refused, naming the field, rather
    than ignored. `style` has no such value: it is refused whenever it is set."""
    model: ModelName | None = None
    prompt: ImagePrompt
    n: int = Field(1, ge=1, le=MAX_N)
    response_format: Literal["b64_json", "url"] | None = None
    size: str | None = None  # "auto" or the model's "SxS", checked against the model
    quality: Literal["auto", "standard"] | None = None
    style: str | None = None
    output_format: Literal["png"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: str | None = None
    seed: Seed | None = None
    truncation: float = Field(1.0, gt=0, le=1)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description=GUIDANCE_DOC)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description=TEMPERATURE_DOC)
    top_k: TopK | None = Field(None, description=IMAGE_TOP_K_DOC)
    negative_prompt: str = Field("", description="what guidance steers away from (empty: nothing); " + AR_ONLY)


# AUTOMATIC1111's settings of a diffusion process (steps, sampler, noise schedule, saving):
# these models draw an image in one pass or one token at a time, so nothing here has them.
# A1111 itself ignores fields it does not know; these are taken and have no effect.
A1111_MAX_CFG_SCALE = 30  # its UI's slider goes this far; an AR model takes up to MAX_GUIDANCE
A1111_NO_EFFECT: dict[str, str] = {  # name -> its JSON type in A1111's API (types are strict here too)
    **dict.fromkeys(("steps", "subseed", "firstphase_width", "firstphase_height", "hr_second_pass_steps",
                     "hr_resize_x", "hr_resize_y"), "integer"),
    **dict.fromkeys(("eta", "s_churn", "s_tmax", "s_tmin", "s_noise", "s_min_uncond", "denoising_strength",
                     "refiner_switch_at", "hr_scale"), "number"),
    **dict.fromkeys(("sampler_name", "sampler_index", "scheduler", "force_task_id", "hr_upscaler",
                     "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"),
                    "string"),
    **dict.fromkeys(("do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
                     "disable_extra_networks"), "boolean"),
    "comments": "object", "hr_additional_modules": "array",
}
JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
}
# A1111's options that would change the image in ways these models cannot: taken only at
# the value that leaves them off, otherwise refused (400) rather than ignored.
A1111_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "styles": ([],), "subseed_strength": (0,), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "restore_faces": (False,), "tiling": (False,), "enable_hr": (False,), "save_images": (False,),
    "script_name": ("",), "script_args": ([],), "alwayson_scripts": ({},), "refiner_checkpoint": ("",),
    "infotext": ("",),
}


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere inside (Python's JSON parser takes them; JSON has none)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return all(_finite(v) for v in value) if isinstance(value, list) else True


@dataclass(frozen=True)
class ForeignFields:
    """Another API's fields that a body takes beyond those it honours (its model_config has
    extra="allow"): some have no effect here (but keep their types: a client's mistake is still
    named), some are taken only at the values that leave them off and refused otherwise, naming
    them, rather than ignored; any other field is refused as unknown, as everywhere here."""
    api: str  # whose fields, as the schema describes them: "AUTOMATIC1111's"
    body: str  # what an unknown field is not: "an AUTOMATIC1111 txt2img field"
    refused: str  # why an option left on is refused: "by these models"
    off_values: dict[str, tuple[Any, ...]]
    no_effect: dict[str, str] = field(default_factory=dict)  # name -> its JSON type in that API
    no_effect_why: str = ""

    def list_in(self, schema: dict[str, Any]) -> None:
        """The schema names these fields, as `error` takes them, instead of allowing any extra
        property (a body's json_schema_extra)."""
        for name, kind in self.no_effect.items():
            schema["properties"][name] = {"type": [kind, "null"], "description": f"{self.api}; {self.no_effect_why}"}
        for name, values in self.off_values.items():
            only = ({"enum": list(values), "description": f"{self.api}; only these values"} if values
                    else {"type": "null", "description": f"{self.api}; only null (leave it out)"})
            schema["properties"][name] = only
        schema["additionalProperties"] = False

    def error(self, extra: dict[str, Any]) -> ApiError | None:
        """The refusal of the first of a body's extra fields that cannot be taken; None when all can."""
        for key, value in extra.items():
            name = shown_name(key)
            if not _finite(value):  # the typed fields refuse NaN and infinities; these are free-form
                return ApiError(400, f"{name}: NaN and infinite numbers are not valid JSON values", name)
            if key in self.off_values:
                offs = self.off_values[key]
                # a boolean only as a boolean: to Python, 0 == False (0.0 == 0 is fine)
                if value is not None and not any(value == off and isinstance(value, bool) == isinstance(off, bool)
                                                 for off in offs):
                    send = f" or send {json.dumps(offs[0])}" if offs else ""
                    shown = json.dumps(value)
                    shown = shown if len(shown) <= 60 else shown[:60] + "…"
                    return ApiError(400, f"{name} {shown} is not supported {self.refused}; leave it out{send}", name)
            elif key not in self.no_effect:
                return ApiError(400, f"{name}: extra inputs are not permitted (not {self.body})", name)
            elif value is not None and not JSON_TYPES[kind := self.no_effect[key]](value):
                return ApiError(400, f"{name}: must be {'an' if kind[0] in 'aio' else 'a'} {kind}, as in {self.api} "
                                     "API (it has no effect here)", name)
        return None


A1111_FIELDS = ForeignFields("AUTOMATIC1111's", "an AUTOMATIC1111 txt2img field", "by these models", A1111_OFF_VALUES,
                             A1111_NO_EFFECT, "no effect here (no diffusion process)")


class Txt2ImgBody(_Body, _NullIsDefault):
    """POST /sdapi/v1/txt2img: AUTOMATIC1111's web UI request. Honoured: prompt,
    negative_prompt, seed, batch_size × n_iter images, width and height (the model's size),
    cfg_scale (an AR model's guidance), send_images and the model in
    override_settings.sd_model_checkpoint. The rest of A1111's fields: see A1111_NO_EFFECT
    and A1111_OFF_VALUES; a field A1111 does not have is refused, as everywhere here."""
    model_config = ConfigDict(extra="allow", json_schema_extra=A1111_FIELDS.list_in)  # checked by `unsupported`
    prompt: str = Field(min_length=1)
    negative_prompt: str = Field("", description="what guidance steers away from; autoregressive image models only")
    seed: Seed | None = Field(None, description="image i uses seed + i; -1 (the default) = picked")
    batch_size: int = Field(1, ge=1, le=MAX_N, description="images per batch; batch_size × n_iter at most 16")
    n_iter: int = Field(1, ge=1, le=MAX_N, description="batches; batch_size × n_iter at most 16")
    width: int | None = Field(None, description="the model's image size (or leave it out)")
    height: int | None = Field(None, description="the model's image size (or leave it out)")
    cfg_scale: float | None = Field(None, ge=0, le=A1111_MAX_CFG_SCALE,
                                    description="autoregressive models' guidance scale (at most "
                                                f"{MAX_GUIDANCE:g} there); a GAN has none and ignores it")
    send_images: bool = True
    override_settings: dict[str, Any] = Field({}, description="only sd_model_checkpoint: the model's name or tag")

    @property
    def n(self) -> int:
        return self.batch_size * self.n_iter

    def unsupported(self) -> ApiError | None:
        """A field A1111 does not have, an option left on that these models cannot honour, or
        too many images; None when the request can run."""
        if (err := A1111_FIELDS.error(self.model_extra or {})) is not None:
            return err
        for key, value in self.override_settings.items():
            if key != "sd_model_checkpoint":
                return ApiError(400, f"override_settings.{shown_name(key)} is not supported: only sd_model_checkpoint "
                                     "(the model) can be set here", "override_settings")
            if not isinstance(value, str) or not re.fullmatch(MODEL_NAME_PATTERN, value):
                return ApiError(400, "override_settings.sd_model_checkpoint must be a model name or tag "
                                     "(see GET /sdapi/v1/sd-models)", "override_settings")
        if self.n > MAX_N:
            return ApiError(400, f"batch_size × n_iter is {self.n}; at most {MAX_N} images per request",
                            "batch_size")
        return None


class TGIParameters(_Body, _NullIsDefault):
    """text-generation-inference's `parameters` (see service/tgi.py for how they map)."""
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT,
                                       description="default: 100, or what the context leaves after the input")
    do_sample: bool = Field(False, description="sample; greedy otherwise, unless a sampling parameter is set")
    temperature: float | None = Field(None, gt=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, gt=0, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1, description="locally typical sampling's mass")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                            description="subtracted per occurrence in the generated text")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="32-bit here (TGI takes 64-bit seeds)")
    stop: list[StopString] = Field([], max_length=MAX_STOP, description="stop sequences (kept in the text, as "
                                                                        "TGI does)")
    details: bool = Field(False, description="also finish reason, seed, every token with its logprob")
    decoder_input_details: bool = Field(False, description="with details: the input's tokens too (prefill)")
    return_full_text: bool = Field(False, description="the input before the generated text")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the likeliest alternatives per token")
    truncate: int | None = Field(None, ge=1, description="keep only the input's last tokens")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="candidates sampled, of which the one with the "
                                "highest mean token logprob is answered (not streamed; the others in details)")
    # TGI's, taken only at the values that leave them off (refused otherwise, naming them)
    watermark: bool = Field(False, description="only false: watermarking is not implemented")
    grammar: Any = Field(None, description="not implemented: leave it out")
    adapter_id: str | None = Field(None, description="not implemented: the model has no adapters")

    def unsupported(self) -> ApiError | None:
        for name, off in (("watermark", False), ("grammar", None), ("adapter_id", None)):
            if getattr(self, name) != off:
                return ApiError(400, f"parameters.{name} is not supported by this server; leave it out",
                                f"parameters.{name}")
        return None


class TGIBody(_Body, _NullIsDefault):
    """text-generation-inference's request: POST /generate (with `inputs`; `prompt` there asks
    for images), /generate_stream, and / (its compat route, where `stream` chooses)."""
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = Field(False, description="POST / only: stream the tokens (Server-Sent Events)")


class TokenizeBody(_Body, _NullIsDefault):
    """POST /tokenize, vLLM's: a prompt's token ids as the model sees them (an empty prompt is
    the end-of-text token, as a completion starts from it). POST /tokenize with TGI's body
    (`inputs`) answers as TGI does."""
    model: ModelName | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="accepted either way: this tokenizer adds none")
    return_token_strs: bool = Field(False, description="also each token's text (`bytes:` for part of a character)")


class TGITokenizeBody(_Body, _NullIsDefault):
    """POST /tokenize with TGI's body: each token with the characters of the input it covers."""
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)  # taken, as TGI takes them, and unused


class DetokenizeBody(_Body, _NullIsDefault):
    """POST /detokenize, vLLM's: token ids back to text."""
    model: ModelName | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=100_000)
