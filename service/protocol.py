"""The OpenAI wire format: requests, responses, stream chunks and the error envelope.

Fields follow the OpenAI API reference order; strop's own extras sit below a marker.
Unknown request fields are accepted and ignored (as OpenAI-compatible servers do), except
the ones that would change the answer's shape, which strop refuses (`UNSUPPORTED`).
"""

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant")
RESERVED_MODEL_NAMES = ("strop", "base")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the API reports to the caller in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers  # e.g. Retry-After on a 429
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def response_body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


# --- requests ---------------------------------------------------------------------------


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a lone UTF-16 surrogate sits (`messages.0.content`), or None.

    JSON's `\\ud800` escapes parse to such code points; they are not text, and nothing
    downstream (tokenizer, log, response) can encode them.
    """
    if isinstance(value, str):
        return path or "body" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            return path or "body"
        found = lone_surrogate_at(item, here)
        if found:
            return found
    return None


class RequestBody(BaseModel):
    """A request body: lone surrogates anywhere in it are refused with a 400."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            # An APIError (not a ValueError) passes through pydantic untouched, so the
            # caller gets the exact `param`; the value itself is never echoed back.
            raise APIError(
                400,
                f"`{where}` holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                "valid Unicode text.",
                param=where,
                code="invalid_value",
            )
        return data


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(ROLES)}")
        return v

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields OpenAI defines whose effect strop does not implement: ignoring them would answer
# in a shape the caller did not ask for. None (and `response_format` text) change nothing.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format")
_HARMLESS = [
    ("tool_choice", "none"),
    ("function_call", "none"),
    ("response_format", {"type": "text"}),
]


class ChatCompletionRequest(RequestBody):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionRequest":
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            value = extra.get(name)
            if value is None or (name, value) in _HARMLESS:
                continue
            raise APIError(
                400,
                f"`{name}` is not supported by this server; send the request without it.",
                param=name,
                code="unsupported_parameter",
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wants_log(self) -> bool:
        """False if the caller opted out with metadata {"strop_log": false}."""
        flag = (self.metadata or {}).get("strop_log", True)
        return str(flag).lower() not in ("false", "0", "no", "off")


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_path: str = Field(min_length=1)

    @field_validator("lora_name")
    @classmethod
    def _servable_name(cls, v: str) -> str:
        # The name becomes a model name in /v1/models and in every response: keep it short,
        # printable, and clear of the names strop itself serves.
        if not ADAPTER_NAME.fullmatch(v):
            raise ValueError("must be 1 to 64 characters of letters, digits, `.`, `_` or `-`")
        if v in RESERVED_MODEL_NAMES:
            raise ValueError(f"`{v}` is a reserved model name; choose another")
        return v


class UnloadLoraAdapterRequest(RequestBody):
    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


# --- responses --------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "strop"
    root: str | None = None
    parent: str | None = None
    # strop-specific fields
    version: str | None = None
    status: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
