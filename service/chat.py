"""Chat completions: validate a request, run it on the engine, answer, and log it.

The route stays thin; everything a chat request does happens here, in order:
check limits -> resolve the model name -> generate (or stream) -> respond -> log.
"""

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from service.engines.base import (
    AdapterNotFound,
    ContextTooLong,
    Delta,
    Engine,
    Generation,
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

    # --- checks -----------------------------------------------------------------------

    def prepare(
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
        context = self.engine.max_context
        try:
            prompt_tokens = self.engine.count_prompt_tokens(messages)
        except ContextTooLong:
            prompt_tokens = context
        room = context - prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens or 1
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, "
                f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the "
                f"messages, {asked} in the completion).",
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

    # --- non-streaming ----------------------------------------------------------------

    async def complete(
        self, req: ChatCompletionRequest, key: str, log: bool, internal: bool = False
    ) -> ChatCompletion:
        messages, params, _ = self.prepare(req)
        start = time.perf_counter()
        for attempt in (1, 2):
            async with self.versions.lease(req.model, internal) as (version, adapter):
                try:
                    gen = await self._run(self.engine.generate(messages, params, adapter))
                    break
                except AdapterNotFound:
                    # The engine lost an adapter we loaded (a restarted vLLM): forget it so
                    # the lease loads it again, and try once more.
                    self.versions.forget(version)
                    if attempt == 2:
                        raise APIError(
                            503,
                            f"The engine lost adapter {adapter}; try again.",
                            type="server_error",
                            code="engine_unavailable",
                        ) from None
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
        self._done(req, response.id, version, gen, start, key, log, stream=False)
        return response

    # --- streaming --------------------------------------------------------------------

    async def stream(
        self, req: ChatCompletionRequest, key: str, log: bool, internal: bool = False
    ) -> AsyncIterator[str]:
        """Checks and name resolution run before the first byte (so errors get a status);
        then the SSE lines."""
        messages, params, _ = self.prepare(req)
        async with self.versions.lease(req.model, internal):
            pass
        return self._sse(req, messages, params, key, log, internal)

    async def _sse(self, req, messages, params, key, log, internal) -> AsyncIterator[str]:
        async with self.versions.lease(req.model, internal) as (version, adapter):
            async for line in self._sse_lines(req, messages, params, version, adapter, key, log):
                yield line

    async def _sse_lines(
        self, req, messages, params, version, adapter, key, log
    ) -> AsyncIterator[str]:
        start = time.perf_counter()
        rid, created, model = new_request_id(), int(time.time()), pinned_model(version)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        texts = [""] * params.n
        finish = ["length"] * params.n
        end = StreamEnd(0, 0)

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(
                id=rid, created=created, model=model, choices=choices, usage=usage
            )
            return f"data: {c.model_dump_json(exclude_none=not include_usage or usage is not None)}\n\n"

        try:
            yield chunk(
                [
                    ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in range(params.n)
                ]
            )
            async for item in self._run_stream(self.engine.stream(messages, params, adapter)):
                if isinstance(item, StreamEnd):
                    end = item
                    continue
                item: Delta
                texts[item.index] += item.text
                if item.finish_reason:
                    finish[item.index] = item.finish_reason
                if item.text or item.finish_reason:
                    lp = _logprobs_out(item.logprobs) if req.logprobs and item.logprobs else None
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
        except APIError as e:
            yield f"data: {json.dumps(e.response_body())}\n\n"
            self.metrics.requests.labels(version, str(e.status)).inc()
            return
        yield "data: [DONE]\n\n"
        gen = Generation(
            choices=[], prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens
        )
        self._done(req, rid, version, gen, start, key, log, stream=True, texts=texts, finish=finish)

    # --- shared -----------------------------------------------------------------------

    async def _run(self, coro):
        try:
            return await coro
        except (APIError, AdapterNotFound):
            raise
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except Exception as e:  # the engine failed: degrade to a 503, keep serving
            raise APIError(
                503,
                f"The engine could not serve this request: {e}",
                type="server_error",
                code="engine_unavailable",
            ) from e

    async def _run_stream(self, agen):
        try:
            async for item in agen:
                yield item
        except APIError:
            raise
        except Exception as e:
            raise APIError(
                503,
                f"The engine failed while streaming: {e}",
                type="server_error",
                code="engine_unavailable",
            ) from e

    def _done(
        self, req, rid, version, gen, start, key, log, stream, texts=None, finish=None
    ) -> None:
        latency = time.perf_counter() - start
        m = self.metrics
        m.requests.labels(version, "200").inc()
        m.latency.labels(version).observe(latency)
        m.prompt_tokens.inc(gen.prompt_tokens)
        m.completion_tokens.inc(gen.completion_tokens)
        if not log:
            return
        self.promptlog.append(
            PromptLogRecord(
                request_id=rid,
                messages=[{"role": x.role, "content": x.text()} for x in req.messages],
                sampling=SamplingRecord(
                    n=req.n,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=req.max_completion_tokens or req.max_tokens,
                    stop=req.stop_list(),
                    seed=req.seed,
                    logprobs=req.logprobs,
                ),
                responses=texts if texts is not None else [c.text for c in gen.choices],
                finish_reasons=finish
                if finish is not None
                else [c.finish_reason for c in gen.choices],
                model=req.model,
                version=version,
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                latency_ms=latency * 1000,
                key_id=key,
                stream=stream,
            )
        )


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
