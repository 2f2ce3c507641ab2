"""A sequence's text: finish reasons, stop strings (also across tokens), whole characters."""

import asyncio
from types import SimpleNamespace

import torch

from service.engines.base import Delta, SamplingParams
from service.engines.embedded.scheduler import BASE
from service.engines.embedded.sequence import Sequence
from tests.service.engines.embedded.conftest import ask


def test_generate_max_tokens_finishes_with_length(engine):
    gen = asyncio.run(engine.generate(ask("hi"), SamplingParams(temperature=0, max_tokens=7), None))
    assert gen.choices[0].finish_reason == "length"
    assert gen.completion_tokens == 7 == len(gen.choices[0].token_ids)


def test_generate_full_context_finishes_with_length(engine):
    prompt = ask("word " * 400)
    room = engine.max_context - engine.count_prompt_tokens(prompt)
    assert 0 < room < 100
    gen = asyncio.run(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=100), None))
    assert gen.choices[0].finish_reason == "length"
    assert gen.completion_tokens == room


def test_generate_stop_string_truncates_text(engine):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30)
    full = asyncio.run(engine.generate(ask("hi"), params, None)).choices[0].text
    stop = full[10:13]
    params.stop = [stop]
    gen = asyncio.run(engine.generate(ask("hi"), params, None))
    assert gen.choices[0].text == full[: full.index(stop)]
    assert gen.choices[0].finish_reason == "stop"


def test_stream_stop_string_across_tokens_is_held_back(engine):
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=30, logprobs=True)
    tokens = [
        t.token for t in asyncio.run(engine.generate(ask("hi"), params, None)).choices[0].logprobs
    ]
    i = next(i for i in range(5, len(tokens) - 1) if len(tokens[i]) > 1 and len(tokens[i + 1]) > 1)
    stop = tokens[i][-2:] + tokens[i + 1][:2]  # begins in one step's text, ends in the next
    full = "".join(tokens)
    params.stop = [stop]

    async def collect():
        return [d async for d in engine.stream(ask("hi"), params, None) if isinstance(d, Delta)]

    deltas = asyncio.run(collect())
    assert "".join(d.text for d in deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_generate_text_equals_decoding_all_tokens(engine):
    # Byte-level tokens of the gibberish split multi-byte characters now and then.
    params = SamplingParams(n=4, temperature=1.0, seed=8, max_tokens=64)
    gen = asyncio.run(engine.generate(ask("hi"), params, None))
    for c in gen.choices:
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_sequence_split_multibyte_characters_stream_whole(engine):
    text = "naïve 😀 世界!"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert any(engine.tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # really split
    req = SimpleNamespace(
        params=SamplingParams(temperature=0), prompt_ids=[1], adapter=BASE, stream=True
    )
    seq = Sequence(req, 0, torch.device("cpu"), engine.max_context)
    sched = engine._scheduler
    deltas = [d for i in ids for d in seq.add(i, None, sched.tok, sched.eos)]
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
