"""The engine's front: streaming, a client going away, errors before the queue, health."""

import asyncio
import time

import pytest

from service.engines.base import (
    AdapterNotFound,
    ContextTooLong,
    Delta,
    SamplingParams,
    StreamEnd,
)
from service.engines.embedded import EmbeddedEngine
from tests.service.engines.embedded.conftest import ask


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def idle(engine: EmbeddedEngine) -> bool:
    h = await engine.health()
    return h["active_sequences"] == 0 and h["queued"] == 0


def test_stream_deltas_concatenate_to_generate_text(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=25, stop=["e"], logprobs=True)
    gen = asyncio.run(engine.generate(ask("hi"), params, None))

    async def collect():
        return [item async for item in engine.stream(ask("hi"), params, None)]

    items = asyncio.run(collect())
    assert isinstance(items[-1], StreamEnd)
    assert items[-1].completion_tokens == gen.completion_tokens
    deltas = [d for d in items if isinstance(d, Delta)]
    for c in gen.choices:
        mine = [d for d in deltas if d.index == c.index]
        assert "".join(d.text for d in mine) == c.text
        assert [d.finish_reason for d in mine if d.finish_reason] == [c.finish_reason]
        assert mine[-1].finish_reason == c.finish_reason
        assert sum(len(d.logprobs) for d in mine) == len(c.token_ids)


def test_stream_closed_early_leaves_batch(engine):
    async def scenario():
        agen = engine.stream(ask("hi"), SamplingParams(max_tokens=400), None)
        await anext(agen)
        await agen.aclose()
        await wait_until(lambda: idle(engine))
        task = asyncio.create_task(engine.generate(ask("hi"), SamplingParams(max_tokens=400), None))
        await wait_until(lambda: _active(engine))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: idle(engine))

    asyncio.run(scenario())


async def _active(engine: EmbeddedEngine) -> bool:
    return (await engine.health())["active_sequences"] > 0


def test_generate_prompt_too_long_raises_context_too_long(engine):
    prompt = ask("word " * 600)
    with pytest.raises(ContextTooLong):
        engine.count_prompt_tokens(prompt)
    with pytest.raises(ContextTooLong):
        asyncio.run(engine.generate(prompt, SamplingParams(), None))


def test_generate_unknown_adapter_raises_adapter_not_found(engine):
    with pytest.raises(AdapterNotFound):
        asyncio.run(engine.generate(ask("hi"), SamplingParams(), "nope"))


def test_health_reports_engine_state(engine):
    h = asyncio.run(engine.health())
    assert h["ok"] and h["engine"] == "embedded"
    assert {"model", "active_sequences", "queued", "adapters"} <= h.keys()
