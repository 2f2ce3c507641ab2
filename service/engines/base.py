"""The engine interface: what the API needs from whatever runs the model.

Two implementations: `embedded/` (transformers + PEFT in this process) and `remote.py`
(a vLLM-compatible server over HTTP). The API speaks only to this interface.
Adapter names are opaque strings to an engine; `None` means the base model.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class EngineError(RuntimeError):
    """The engine could not serve a request (unreachable, overloaded, failed)."""


class EngineRejected(ValueError):
    """The engine found the request itself invalid (a remote's 400): the caller's to fix."""


class ContextTooLong(ValueError):
    """The prompt plus the requested completion does not fit the model's context.

    `prompt_tokens` is the prompt's length where known: exact, or (`exact` False) a lower
    bound, for a prompt so long that counting it exactly is not worth the time."""

    def __init__(self, message: str, prompt_tokens: int | None = None, exact: bool = True):
        super().__init__(message)
        self.prompt_tokens, self.exact = prompt_tokens, exact


class AdapterNotFound(LookupError):
    """An adapter name or path the engine does not know."""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    """Log-probability of one sampled token under the model (temperature 1, before top_p)."""

    token: str
    logprob: float
    token_id: int
    top: list[tuple[str, float]] = field(default_factory=list)  # (token, logprob), best first


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" or "length"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Generation:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """A piece of one choice while streaming; the last one of a choice has `finish_reason`."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class StreamEnd:
    """Sent once after every choice finished: token counts for `usage`."""

    prompt_tokens: int
    completion_tokens: int


class Engine(Protocol):
    max_context: int

    async def start(self) -> None:
        """Load the model or connect; called once at service start."""

    async def close(self) -> None:
        """Stop background work and release resources."""

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the chat-templated prompt (raises ContextTooLong if it cannot fit).

        Blocking (rendering and tokenizing take a while for a long prompt): call it from a
        worker thread, never on the event loop; safe from several threads at once."""

    async def generate(
        self, messages: list[dict[str, Any]], params: SamplingParams, adapter: str | None
    ) -> Generation:
        """All `n` completions of one chat prompt."""

    def stream(
        self, messages: list[dict[str, Any]], params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[Delta | StreamEnd]:
        """Deltas as tokens are produced, then one StreamEnd."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make adapter `name` (PEFT directory `path`) servable; requests in flight go on."""

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` once requests using it are done."""

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters loaded now."""

    async def health(self) -> dict[str, Any]:
        """`{"ok": bool, ...}` without raising."""
