"""The learner's generations, asked of the serving engine through the service.

The learner only trains: every answer it needs (the gate's greedy answers, the parent's
judgments, canary and probe evaluations) is an internal request to the service, with the
version pinned (`strop@vN` also for a candidate the registry has not promoted, `base`), so
the engine that serves users (batched, or a vLLM on a GPU) does the decoding, and the
learner's own CPU or GPU stays on training. Internal requests are never logged.

Requests go out concurrently (the engine batches them); each call has a timeout, and a
service that cannot be reached raises `ServiceUnavailable`, which the caller treats as
"no evidence yet", never as a verdict.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai

from strop.headers import INTERNAL
from strop.versions import pinned_model


class ServiceUnavailable(RuntimeError):
    """The service did not answer (down, restarting, or its engine unavailable)."""


@dataclass(frozen=True)
class Answer:
    text: str
    finished: bool  # the model ended it (eos or a stop string), not the length limit


def connect_service(url: str, api_key: str | None, timeout_s: float = 120.0) -> openai.OpenAI:
    """An `openai` client for the service's internal requests (no retries of its own: the
    caller decides when to try again)."""
    return openai.OpenAI(
        base_url=url.rstrip("/") + "/v1",
        api_key=api_key or "none",
        max_retries=0,
        timeout=openai.Timeout(timeout_s, connect=5.0),
        default_headers={INTERNAL: "1"},
    )


def ask(
    client: openai.OpenAI,
    version: str,
    conversations: list[list[dict]],
    max_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
    concurrency: int = 16,
) -> list[list[Answer]]:
    """`n` answers of `version` (`base` or `vN`) to each conversation, in order."""

    def one(messages: list[dict]) -> list[Answer]:
        try:
            r = client.chat.completions.create(
                model=pinned_model(version),
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                n=n,
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise ServiceUnavailable(f"service unreachable: {e}") from e
        except openai.InternalServerError as e:  # 5xx, e.g. 503 while the engine is down
            raise ServiceUnavailable(f"service error {e.status_code}: {e}") from e
        choices = sorted(r.choices, key=lambda c: c.index)
        return [Answer(c.message.content or "", c.finish_reason == "stop") for c in choices]

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(conversations)))) as pool:
        return list(pool.map(one, conversations))
