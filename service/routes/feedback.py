"""POST /v1/strop/feedback: a caller rates one of its own chat completions.

Who owns a completion is read from its prompt-log marker (service/promptlog.py), so a
completion can be rated once its record is written (the log is buffered: feedback sent
within moments of the answer, or while Redis was away, may get a 404) and until the
marker expires (`feedback_window_s`). An unknown id and another caller's id get the same
404, so the answer never tells that an id exists.
"""

import asyncio
import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from service.auth import CallerKeyId
from service.promptlog import parse_marker
from service.protocol import APIError, RequestBody
from strop.records import FeedbackRecord

router = APIRouter(prefix="/v1/strop", tags=["feedback"])

MAX_ANSWER_CHARS = 1_000  # a final answer: a number, a word, a short phrase
MAX_PREFERRED_CHARS = 16_000  # a whole better reply
RATE_WINDOW_S = 60
REDIS_TIMEOUT_S = 2.0  # each Redis step; beyond it the caller gets a 503, not a hang


class FeedbackRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored

    id: str
    choice: int = 0
    score: float | None = None
    thumbs: Literal["up", "down"] | None = None
    answer: str | None = None
    preferred: str | None = None


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _redis_unavailable() -> APIError:
    return APIError(
        503,
        "Feedback cannot be stored right now (its store is unreachable); try again later.",
        type="server_error",
        code="redis_unavailable",
    )


async def _redis(coro: Any) -> Any:
    try:
        return await asyncio.wait_for(coro, timeout=REDIS_TIMEOUT_S)
    except (RedisError, OSError) as e:  # TimeoutError is an OSError
        raise _redis_unavailable() from e


async def rate_limited(request: Request, key: CallerKeyId) -> str:
    """The caller's key id; 429 once it sent more than `feedback_rate_limit` this minute."""
    service = request.app.state.service
    now = time.time()
    window = int(now // RATE_WINDOW_S)
    name = f"{service.keys.feedback_rate}{key}:{window}"
    async with service.redis.pipeline(transaction=True) as pipe:
        pipe.incr(name)
        pipe.expire(name, RATE_WINDOW_S)
        count, _ = await _redis(pipe.execute())
    limit = service.settings.feedback_rate_limit
    if count > limit:
        retry = max(1, math.ceil((window + 1) * RATE_WINDOW_S - now))
        raise APIError(
            429,
            f"Too many feedback requests: at most {limit} a minute per API key. "
            f"Retry after {retry} s.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
    return key


def _score(body: FeedbackRequest) -> float | None:
    """The score the body gives (thumbs up 1, down -1); 400 on a bad or missing verdict."""
    if body.score is not None and body.thumbs is not None:
        raise _bad("Send either `score` or `thumbs`, not both.", "score")
    if body.score is not None and not (math.isfinite(body.score) and -1.0 <= body.score <= 1.0):
        raise _bad(f"`score` must be between -1 and 1; got {body.score}.", "score")
    for name, cap in (("answer", MAX_ANSWER_CHARS), ("preferred", MAX_PREFERRED_CHARS)):
        value = getattr(body, name)
        if value is not None and not value.strip():
            raise _bad(f"`{name}` must not be empty.", name)
        if value is not None and len(value) > cap:
            raise _bad(f"`{name}` must be at most {cap} characters; got {len(value)}.", name)
    if body.thumbs is not None:
        return 1.0 if body.thumbs == "up" else -1.0
    if body.score is None and body.answer is None and body.preferred is None:
        raise _bad("Send at least one of `score`, `thumbs`, `answer` or `preferred`.", "score")
    return body.score


@router.post("/feedback")
async def feedback(
    body: FeedbackRequest, request: Request, key: Annotated[str, Depends(rate_limited)]
) -> dict[str, Any]:
    """Store the caller's verdict on one of its completions; a new one replaces the last."""
    service = request.app.state.service
    keys, settings = service.keys, service.settings
    score = _score(body)
    if body.choice < 0:
        raise _bad(f"`choice` must be 0 or more; got {body.choice}.", "choice")
    marker = parse_marker(await _redis(service.redis.get(keys.logged + body.id)))
    if marker is None or marker.key_id != key:
        opted_out = await _redis(service.redis.get(keys.nolog + body.id))
        if opted_out is not None and opted_out.decode() == key:
            raise APIError(
                409,
                f"Completion {body.id} was made with logging turned off, so it was never "
                "stored and cannot be rated.",
                param="id",
                code="not_logged",
            )
        raise APIError(
            404,
            f"No completion {body.id} of yours can be rated: the id is unknown, expired, "
            "or its log record is not written yet.",
            type="invalid_request_error",
            param="id",
            code="completion_not_found",
        )
    if body.choice >= marker.n:
        raise _bad(
            f"`choice` must be below the request's n ({marker.n}); got {body.choice}.", "choice"
        )
    record = FeedbackRecord(
        request_id=body.id,
        choice=body.choice,
        score=score,
        answer=body.answer,
        preferred=body.preferred,
        key_id=key,
        version=marker.version,
    )
    window = settings.feedback_window_s
    count_key = keys.feedback_count + body.id

    async def write(pipe: Pipeline) -> None:
        # WATCH the counter: a concurrent rating of the same id makes EXEC fail and this
        # runs again, so `revision` always matches the counter and the latest record wins.
        record.revision = int(await pipe.get(count_key) or 0) + 1
        pipe.multi()
        pipe.set(count_key, record.revision, ex=window)
        pipe.set(keys.feedback_of + body.id, record.model_dump_json(), ex=window)
        pipe.xadd(
            keys.feedback,
            record.to_stream(),
            maxlen=settings.log_stream_maxlen,
            approximate=True,
        )

    await _redis(service.redis.transaction(write, count_key))
    return {
        "object": "strop.feedback",
        "id": body.id,
        "choice": body.choice,
        "revision": record.revision,
    }
