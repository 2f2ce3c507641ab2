"""Sampling: n choices, seeds, and logprobs of the raw distribution."""

import asyncio

import torch

from service.engines.base import SamplingParams
from tests.service.engines.embedded.conftest import ask


def test_generate_n4_returns_four_choices(engine):
    gen = asyncio.run(engine.generate(ask("hi"), SamplingParams(n=4, max_tokens=5), None))
    assert [c.index for c in gen.choices] == [0, 1, 2, 3]
    assert gen.completion_tokens == sum(len(c.token_ids) for c in gen.choices)


def test_generate_same_seed_same_text(engine):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20)
    a = asyncio.run(engine.generate(ask("hi"), params, None))
    b = asyncio.run(engine.generate(ask("hi"), params, None))
    assert a.choices[0].text == b.choices[0].text


def test_generate_different_seed_different_text(engine):
    texts = {
        asyncio.run(
            engine.generate(ask("hi"), SamplingParams(temperature=1.0, seed=s, max_tokens=20), None)
        )
        .choices[0]
        .text
        for s in (1, 2)
    }
    assert len(texts) == 2


def test_generate_logprobs_match_forward_pass(engine):
    params = SamplingParams(
        temperature=0.8, top_p=0.9, seed=2, max_tokens=12, logprobs=True, top_logprobs=3
    )
    choice = asyncio.run(engine.generate(ask("hi"), params, None)).choices[0]
    lps = choice.logprobs
    assert len(lps) == len(choice.token_ids) == 12
    assert all(t.logprob <= 0 and len(t.top) == 3 for t in lps)
    assert all(t.top[0][1] >= t.logprob for t in lps)
    # Recompute under the raw model: log_softmax of the logits at temperature 1.
    prompt = engine.prompt_ids(ask("hi"))
    ids = torch.tensor([prompt + choice.token_ids])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    want = torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(prompt) :, None])[:, 0]
    assert torch.allclose(torch.tensor([t.logprob for t in lps]), want, atol=1e-4)
