"""OpenAI-compatible request and response models for /v1/completions and /v1/chat/completions.

Requests are strict (no "10" for 10, no true for 1) and closed: an unknown argument is a 400 naming it,
and an OpenAI argument this server does not implement (n > 1, logprobs, tools, best_of, ...) is a 400
saying so, rather than being silently ignored. Extensions: `top_k` and `speculative` (false turns
self-speculation off for the request; output is the same, only speed changes). Responses carry the usual
`usage` plus a `knnssd` object: the routed domain, draft config id, index version and acceptance stats.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.config import SamplingParams
from services.usage import UsageReport

MAX_STOP = 4
# Below these a float32 sampler divides by zero or keeps no token at all (5e-324 is 0 in float32):
# such values are refused with a 400 naming the parameter rather than decoded into NaNs.
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = 1e-6


def _unsupported(param: str, why: str = "") -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "'{param}' is not supported by this server{why}.",
        {"param": param, "why": f" ({why})" if why else ""},
    )


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk (empty choices) carrying the request's usage.")


class _SamplingRequest(_Request):
    """Fields shared by completions and chat."""

    model: str = Field(description="Model name, one of GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; server default when omitted.")
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description=f"0 is greedy; else at least {MIN_TEMPERATURE:g}; higher samples more randomly."
    )
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Extension: keep the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Sampling seed for reproducible output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation stops before the first one.")
    n: int = Field(1, description="Number of choices; only 1 is supported.")
    stream: bool = Field(False, description="Stream the output as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only with stream: true.")
    speculative: bool = Field(True, description="Extension: false decodes without self-speculation.")
    user: str | None = Field(None, description="End-user id; accepted and ignored.")
    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    logit_bias: dict[str, Any] | None = Field(None, description="Not supported (must be empty).")

    @field_validator("n", mode="before")
    @classmethod
    def _only_one(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v != 1:
            raise _unsupported("n", "only n=1; send separate requests for more choices")
        return v

    @field_validator("temperature", mode="after")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0.0 < v < MIN_TEMPERATURE:
            raise PydanticCustomError(
                "temperature_too_small", "must be 0 (greedy) or at least {min}", {"min": f"{MIN_TEMPERATURE:g}"}
            )
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v if v != "" else None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise PydanticCustomError("stop_type", "must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise PydanticCustomError("stop_too_many", "at most {n} stop sequences are allowed", {"n": MAX_STOP})
        if any(s == "" for s in v):
            raise PydanticCustomError("stop_empty", "stop sequences must not be empty")
        return v

    @field_validator("frequency_penalty", "presence_penalty", mode="after")
    @classmethod
    def _zero(cls, v: float, info) -> float:
        if v != 0:
            raise _unsupported(info.field_name, "only 0")
        return v

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise _unsupported("logit_bias")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "stream_options_without_stream",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                {"param": "stream_options"},
            )
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop_tuple(),
        )


def _reject_if_set(param: str, v: Any, allowed: tuple = (None,), why: str = "") -> Any:
    """Pass v through when it equals one of `allowed` (same type: False is not 0), else a clear 400."""
    if any(v is a or (type(v) is type(a) and v == a) for a in allowed):
        return v
    raise _unsupported(param, why)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str = Field(description="The prompt: a non-empty string (a list holding exactly one string is accepted).")
    logprobs: Any = Field(None, description="Not supported.")
    echo: Any = Field(False, description="Not supported (only false).")
    best_of: Any = Field(None, description="Only 1 is supported.")
    suffix: Any = Field(None, description="Not supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if v and isinstance(v[0], (int, list)) and not isinstance(v[0], bool):
                raise PydanticCustomError("token_prompt", "token-id prompts are not supported; send text")
            if len(v) != 1:
                raise PydanticCustomError(
                    "batched_prompt", "exactly one prompt per request is supported (got a list of {n})", {"n": len(v)}
                )
            v = v[0]
        if isinstance(v, str) and not v:
            raise PydanticCustomError("empty_prompt", "the prompt must not be empty")
        return v

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        return _reject_if_set("logprobs", v, (None, False))

    @field_validator("echo", mode="before")
    @classmethod
    def _echo(cls, v: Any) -> Any:
        return _reject_if_set("echo", v, (None, False))

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, v: Any) -> Any:
        return _reject_if_set("best_of", v, (None, 1), "only 1")

    @field_validator("suffix", mode="before")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        return _reject_if_set("suffix", v, (None,))


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    """One turn. Extra keys that clients echo back from responses (refusal, annotations...) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, description="Optional speaker name; ignored.")
    tool_calls: Any = Field(None, description="Not supported.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise PydanticCustomError(
                        "content_part", "only text content parts are supported (got '{t}')", {"t": part.get("type")}
                    )
        return v

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        return _reject_if_set("tool_calls", v, (None,)) if v != [] else None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, oldest first.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens; wins if both set.")
    logprobs: Any = Field(None, description="Not supported (only false).")
    top_logprobs: Any = Field(None, description="Not supported.")
    tools: Any = Field(None, description="Not supported.")
    tool_choice: Any = Field(None, description="Not supported (only 'none').")
    parallel_tool_calls: Any = Field(None, description="Accepted and ignored (no tools).")
    functions: Any = Field(None, description="Not supported.")
    function_call: Any = Field(None, description="Not supported.")
    response_format: Any = Field(None, description="Only {'type': 'text'}.")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        return _reject_if_set("logprobs", v, (None, False))

    @field_validator("top_logprobs", "functions", "function_call", mode="before")
    @classmethod
    def _none_only(cls, v: Any, info) -> Any:
        return _reject_if_set(info.field_name, v, (None,))

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        return None if v == [] else _reject_if_set("tools", v, (None,))

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        return _reject_if_set("tool_choice", v, (None, "none"))

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if v is None or v == {"type": "text"}:
            return v
        raise _unsupported("response_format", "only {'type': 'text'}")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def backend_messages(self) -> list[dict[str, str]]:
        """Plain {role, content} turns; "developer" is OpenAI's newer name for "system"."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ---------------------------------------------------------------- responses


class ErrorInfo(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="OpenAI error type: invalid_request_error, server_error, requests, tokens...")
    param: str | None = Field(None, description="The request parameter at fault, if one is.")
    code: str | None = Field(None, description="Machine-readable reason: invalid_value, rate_limit_exceeded...")


class ErrorResponse(BaseModel):
    """Every error this server sends: OpenAI's envelope."""

    error: ErrorInfo = Field(description="The error.")


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="'ok' when a model replica can serve.")
    models: list[str] = Field(description="Served model names.")
    detail: str | None = Field(None, description="Why not, when unavailable.")
    replica: dict[str, Any] | None = Field(
        None, description="One model replica's device, dtype and load (requests running and waiting, slots)."
    )


class UsageLimits(BaseModel):
    rpm: int = Field(description="Requests per window (0 unlimited).")
    tpm: int = Field(description="Tokens per window (0 unlimited).")
    window_s: float = Field(description="Window length in seconds.")


class UsageResponse(UsageReport):
    """GET /v1/usage: the calling tenant's own counters and limits."""

    limits: UsageLimits = Field(description="The tenant's rate limits.")


class UsageInfo(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class KnnssdInfo(BaseModel):
    """Extension: how the request was routed and how well its drafts were accepted."""

    domain: str | None = Field(None, description="Domain of the nearest centroid.")
    config_id: str | None = Field(None, description="Draft configuration used ('plain' when not speculative).")
    index_version: str | None = Field(None, description="Index artefact version that routed the request.")
    fallback: bool = Field(False, description="True when no centroid was near and the fallback config was used.")
    speculative: bool = Field(True, description="Whether self-speculation was on for this request.")
    acceptance_rate: float | None = Field(None, description="Accepted / drafted tokens (None before the end).")
    stats: dict[str, Any] | None = Field(None, description="The decode's stats (drafted, accepted, steps, times).")
    replica: str | None = Field(None, description="The model replica that decoded the request.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed completions chunk (object 'text_completion' in both, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    knnssd: KnnssdInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    knnssd: KnnssdInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    knnssd: KnnssdInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "knnssd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump_chunk(chunk: BaseModel) -> str:
    """One SSE event. Top-level None fields (usage, knnssd, fingerprint) are left out; choice fields stay."""
    data = chunk.model_dump(mode="json")
    for key in ("usage", "knnssd", "system_fingerprint"):
        if data.get(key) is None:
            data.pop(key, None)
    return "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"
