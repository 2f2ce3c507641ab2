"""Chat completions: validate a request, run it on the engine, answer, and log it.

The route stays thin; everything a chat request does happens here, in order:
check limits -> read the prompt (off the event loop) -> take room in the engine's queue ->
resolve the model name once -> generate (or stream) -> respond -> log.

A client that goes away cancels its request: its sequences leave the engine, and its
prompt-log record says `cancelled` for each choice that had not finished.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from service.engines.base import (
    AdapterNotFound,
    ContextTooLong,
    Delta,
    Engine,
    EngineRejected,
    SamplingParams,
    StreamEnd,
    TokenLogprob,
)
from service.metrics import ServiceMetrics
from service.promptlog import PromptLog
from service.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from service.versions import Versions
from strop.records import PromptLogRecord, SamplingRecord, new_request_id
from strop.settings import Settings
from strop.versions import pinned_model

CANCELLED = "cancelled"  # finish reason logged for a choice its client left before it ended
RETRY_AFTER_S = 1  # a full queue drains by whole requests; asking again soon is cheap
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks its client is still there

Disconnected = Callable[[], Awaitable[bool]]  # e.g. starlette's Request.is_disconnected


class QueueFull(APIError):
    """429: the engine holds as many sequences as allowed, overall or for this API key."""

    def __init__(self, message: str, code: str):
        super().__init__(
            429,
            message,
            type="rate_limit_error",
            code=code,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


class ClientGone(APIError):
    """The client disconnected before its answer was ready (nobody reads this error)."""

    def __init__(self) -> None:
        super().__init__(499, "The client closed the request.", code="client_closed_request")


def engine_error(e: Exception, failed: str) -> APIError:
    """The OpenAI-style error for an engine exception: a 400 where the engine refused the
    request itself, else a 503 (the engine failed: degrade, keep serving)."""
    if isinstance(e, EngineRejected):
        return APIError(400, f"The engine refused this request: {e}")
    return APIError(
        503, f"The engine {failed}: {e}", type="server_error", code="engine_unavailable"
    )


class EngineQueue:
    """Sequences (`n` per request) this service has in the engine, overall and per API key."""

    def __init__(self, max_total: int, max_per_key: int):
        self.max_total, self.max_per_key = max_total, max_per_key
        self.total = 0
        self.per_key: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str, n: int, internal: bool = False) -> Iterator[None]:
        """Count `n` sequences of `key` while the block runs; QueueFull if that passes a limit.

        A request larger than a limit still runs when nothing else is counted against it,
        so it is served eventually rather than refused for ever. Internal requests (the
        worker's, the gate's) count only against the overall limit."""
        mine = 0 if internal else self.per_key.get(key, 0)
        if self.total and self.total + n > self.max_total:
            raise QueueFull(
                f"The engine's queue is full: {self.total} sequences are running or waiting "
                f"(at most {self.max_total}; each of `n` counts). Retry after "
                f"{RETRY_AFTER_S} s.",
                code="engine_overloaded",
            )
        if mine and mine + n > self.max_per_key:
            raise QueueFull(
                f"This API key has {mine} sequences running or waiting (at most "
                f"{self.max_per_key}; each of `n` counts). Retry after {RETRY_AFTER_S} s.",
                code="rate_limit_exceeded",
            )
        self.total += n
        if not internal:
            self.per_key[key] = mine + n
        try:
            yield
        finally:
            self.total -= n
            if not internal:
                self.per_key[key] -= n
                if not self.per_key[key]:
                    del self.per_key[key]


class ChatService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        versions: Versions,
        promptlog: PromptLog,
        metrics: ServiceMetrics,
    ):
        self.settings, self.engine, self.versions = settings, engine, versions
        self.promptlog, self.metrics = promptlog, metrics
        self.queue = EngineQueue(settings.max_queued_sequences, settings.max_queued_per_key)

    # --- checks -----------------------------------------------------------------------

    async def prepare(
        self, req: ChatCompletionRequest
    ) -> tuple[list[dict[str, Any]], SamplingParams, int]:
        """Plain messages, sampling parameters and prompt token count; 400 on bad values."""
        s = self.settings
        if req.n > s.max_n:
            raise APIError(
                400, f"`n` must be at most {s.max_n}; got {req.n}.", param="n", code="invalid_value"
            )
        stop = req.stop_list()
        if len(stop) > s.max_stop_sequences or any(not x for x in stop):
            raise APIError(
                400,
                f"`stop` takes up to {s.max_stop_sequences} non-empty strings.",
                param="stop",
                code="invalid_value",
            )
        if req.top_logprobs and not req.logprobs:
            raise APIError(
                400,
                "`top_logprobs` needs `logprobs: true`.",
                param="top_logprobs",
                code="invalid_value",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            raise APIError(
                400,
                f"`max_tokens` must be at most {s.max_tokens_limit}; got {max_tokens}.",
                param="max_tokens",
                code="invalid_value",
            )
        context = self.engine.max_context
        # Reading a long prompt takes seconds (a 17 MB one took 14): off the event loop, so
        # other clients are served meanwhile.
        try:
            messages, prompt_tokens = await asyncio.to_thread(self._read_prompt, req)
            exact = True
        except ContextTooLong as e:
            messages = []
            # It does not fit even one more token, so it has at least `context` tokens.
            if e.prompt_tokens is not None and e.prompt_tokens >= context:
                prompt_tokens, exact = e.prompt_tokens, e.exact
            else:
                prompt_tokens, exact = context, False
        room = context - prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens or 1
            least = "" if exact else "at least "
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, "
                f"you requested {least}{prompt_tokens + asked} tokens ({least}{prompt_tokens} "
                f"in the messages, {asked} in the completion). Please reduce the length of "
                "the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        params = SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=max_tokens or min(s.default_max_tokens, room),
            stop=stop,
            seed=req.seed,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
        )
        return messages, params, prompt_tokens

    def _read_prompt(self, req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], int]:
        """Plain messages and their token count (blocking; ContextTooLong if they cannot fit)."""
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from e
        if not any(m["role"] == "user" for m in messages):
            raise APIError(
                400,
                "`messages` needs at least one user message.",
                param="messages",
                code="invalid_value",
            )
        return messages, self.engine.count_prompt_tokens(messages)

    # --- non-streaming ----------------------------------------------------------------

    async def complete(
        self,
        req: ChatCompletionRequest,
        key: str,
        log: bool,
        internal: bool = False,
        disconnected: Disconnected | None = None,
    ) -> ChatCompletion:
        """The whole answer. While it is made, `disconnected` is asked every
        DISCONNECT_POLL_S; once the client is gone the engine drops the request."""
        call = _Call(req, key, log, internal, *await self.prepare(req))
        with self.queue.hold(key, call.params.n, internal):
            for attempt in (1, 2):
                async with self.versions.lease(req.model, internal) as (version, adapter):
                    work = self.engine.generate(call.messages, call.params, adapter)
                    try:
                        gen = await self._run(_unless_gone(work, disconnected))
                        break
                    except ClientGone:
                        n = call.params.n
                        self._done(call, new_request_id(), version, [""] * n, [CANCELLED] * n)
                        raise
                    except AdapterNotFound:
                        self._lost(version, adapter, attempt)
        response = ChatCompletion(
            id=new_request_id(),
            model=pinned_model(version),
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=_logprobs_out(c.logprobs) if req.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in gen.choices
            ],
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                total_tokens=gen.prompt_tokens + gen.completion_tokens,
            ),
        )
        texts, finish = [c.text for c in gen.choices], [c.finish_reason for c in gen.choices]
        self._done(
            call,
            response.id,
            version,
            texts,
            finish,
            StreamEnd(gen.prompt_tokens, gen.completion_tokens),
        )
        return response

    # --- streaming --------------------------------------------------------------------

    async def stream(
        self, req: ChatCompletionRequest, key: str, log: bool, internal: bool = False
    ) -> AsyncIterator[str]:
        """The SSE lines. Checks, queue room and name resolution run before the first byte
        (so their errors get a status); the version resolved then serves every line."""
        lines = self._sse(_Call(req, key, log, internal, *await self.prepare(req)))
        # Runs _sse up to its first, empty line: queue room and the lease are taken (or
        # refused) here. A started generator dropped unread is closed by the event loop, so
        # what it holds is given back even if the response never starts.
        await anext(lines)
        return lines

    async def _sse(self, call: "_Call") -> AsyncIterator[str]:
        with self.queue.hold(call.key, call.params.n, call.internal):
            for attempt in (1, 2):
                async with self.versions.lease(call.req.model, call.internal) as (version, adapter):
                    engine = self.engine.stream(call.messages, call.params, adapter)
                    items = self._run_stream(engine)
                    async with contextlib.aclosing(items):
                        # The engine's first item before the first byte: an engine that
                        # refuses the request (vLLM's 400s) gets its status, not an error event.
                        try:
                            first = await anext(items, None)
                        except AdapterNotFound:
                            self._lost(version, adapter, attempt)
                            continue
                        yield ""  # taken by stream(), never sent
                        lines = self._sse_lines(call, version, _chain(first, items))
                        async with contextlib.aclosing(lines):
                            async for line in lines:
                                yield line
                        return

    async def _sse_lines(
        self, call: "_Call", version: str, items: AsyncIterator[Delta | StreamEnd]
    ) -> AsyncIterator[str]:
        req, n = call.req, call.params.n
        rid, created, model = new_request_id(), int(time.time()), pinned_model(version)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        texts = [""] * n
        finish: list[str | None] = [None] * n
        end = StreamEnd(call.prompt_tokens, 0)

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(
                id=rid, created=created, model=model, choices=choices, usage=usage
            )
            return f"data: {c.model_dump_json(exclude_none=not include_usage or usage is not None)}\n\n"

        try:
            yield chunk(
                [
                    ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in range(n)
                ]
            )
            async with contextlib.aclosing(items):
                async for item in items:
                    if isinstance(item, StreamEnd):
                        end = item
                        continue
                    item: Delta
                    texts[item.index] += item.text
                    if item.finish_reason:
                        finish[item.index] = item.finish_reason
                    if item.text or item.finish_reason:
                        lp = (
                            _logprobs_out(item.logprobs) if req.logprobs and item.logprobs else None
                        )
                        yield chunk(
                            [
                                ChunkChoice(
                                    index=item.index,
                                    delta=DeltaMessage(content=item.text or None),
                                    logprobs=lp,
                                    finish_reason=item.finish_reason,
                                )
                            ]
                        )
            if include_usage:
                yield chunk(
                    [],
                    Usage(
                        prompt_tokens=end.prompt_tokens,
                        completion_tokens=end.completion_tokens,
                        total_tokens=end.prompt_tokens + end.completion_tokens,
                    ),
                )
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.response_body())}\n\n"
            self.metrics.requests.labels(version, str(e.status)).inc()
            return
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: closing the engine's stream (above) dropped its
            # sequences; the log keeps what the client had received.
            self._done(call, rid, version, texts, [f or CANCELLED for f in finish], end)
            raise
        self._done(call, rid, version, texts, [f or "length" for f in finish], end)

    # --- shared -----------------------------------------------------------------------

    async def _run(self, coro):
        try:
            return await coro
        except (APIError, AdapterNotFound):
            raise
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except Exception as e:
            raise engine_error(e, "could not serve this request") from e

    def _lost(self, version: str, adapter: str | None, attempt: int) -> None:
        """The engine lost an adapter we loaded (a restarted vLLM): forget it so the next
        lease loads it again; a 503 if that was the second try."""
        self.versions.forget(version)
        if attempt == 2:
            raise APIError(
                503,
                f"The engine lost adapter {adapter}; try again.",
                type="server_error",
                code="engine_unavailable",
            )

    async def _run_stream(self, agen):
        # Closing this closes the engine's stream too, which drops its sequences at once
        # (`async for` alone would leave that to the garbage collector).
        async with contextlib.aclosing(agen):
            try:
                async for item in agen:
                    yield item
            except (APIError, AdapterNotFound):
                raise
            except Exception as e:
                raise engine_error(e, "failed while streaming") from e

    def _done(
        self,
        call: "_Call",
        rid: str,
        version: str,
        texts: list[str],
        finish: list[str],
        usage: StreamEnd | None = None,
    ) -> None:
        """Count the request in the metrics and write its prompt-log record (if asked).
        `usage` None: the engine never said (the client left first)."""
        usage = usage or StreamEnd(call.prompt_tokens, 0)
        latency = time.perf_counter() - call.start
        m = self.metrics
        if call.req.stream or CANCELLED not in finish:
            # (a non-streaming request that was cancelled ends as an error response, which
            # the app counts like every other error)
            m.requests.labels(version, "499" if CANCELLED in finish else "200").inc()
        m.latency.labels(version).observe(latency)
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.completion_tokens.inc(usage.completion_tokens)
        if not call.log:
            if not call.internal:  # so its feedback gets 409, not 404
                self.promptlog.mark_unlogged(rid, call.key)
            return
        req = call.req
        self.promptlog.append(
            PromptLogRecord(
                request_id=rid,
                messages=call.messages,
                sampling=SamplingRecord(
                    n=req.n,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=req.max_completion_tokens or req.max_tokens,
                    stop=req.stop_list(),
                    seed=req.seed,
                    logprobs=req.logprobs,
                ),
                responses=texts,
                finish_reasons=finish,
                model=req.model,
                version=version,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                latency_ms=latency * 1000,
                key_id=call.key,
                stream=req.stream,
            )
        )


@dataclass
class _Call:
    """One chat request on its way through the service: who asked, and what was read."""

    req: ChatCompletionRequest
    key: str
    log: bool
    internal: bool
    messages: list[dict[str, Any]]
    params: SamplingParams
    prompt_tokens: int
    start: float = field(default_factory=time.perf_counter)


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    """`first` (unless None), then the rest."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _unless_gone(coro: Awaitable[Any], disconnected: Disconnected | None) -> Any:
    """`coro`'s result; ClientGone (once `coro` is cancelled) if the client disconnects first."""
    if disconnected is None:
        return await coro
    work = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if done:
                return work.result()
            if await disconnected():
                raise ClientGone()
    finally:
        if not work.done():
            work.cancel()  # the engine drops the request's sequences
            await asyncio.wait({work})


def _logprobs_out(lps: list[TokenLogprob] | None) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode())) for tok, lp in t.top
                ],
            )
            for t in (lps or [])
        ]
    )
