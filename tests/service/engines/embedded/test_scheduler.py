"""The scheduler: continuous batching, a failing prefill, and adapters changed between steps."""

import asyncio

import pytest
import torch

from service.engines.base import (
    AdapterNotFound,
    Delta,
    EngineError,
    SamplingParams,
    StreamEnd,
)
from service.engines.embedded import EmbeddedEngine
from tests.conftest import MODEL_CACHE
from tests.service.engines.embedded.conftest import ask

PROMPTS = [
    "hi",
    "Tell me a long story about a dragon who guards a library high up in the mountains.",
    "What is the capital of France?",
]


async def gather(*coros):
    return await asyncio.gather(*coros)


def logprobs(gen) -> torch.Tensor:
    """The sampled tokens' logprobs of a generation's first choice."""
    return torch.tensor([t.logprob for t in gen.choices[0].logprobs])


def make_adapter(path, model_dir, seed: int) -> str:
    """A LoRA adapter whose random B matrices really change the model's output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_engine(tiny_model_dir, tmp_path_factory):
    """A separate engine, so loading adapters cannot disturb the other tests' model."""
    root = tmp_path_factory.mktemp("adapters")
    eng = EmbeddedEngine(
        str(tiny_model_dir), MODEL_CACHE, device="cpu", max_batch_size=16, max_context=512
    )
    asyncio.run(eng.start())
    eng.paths = {
        name: make_adapter(root / name, tiny_model_dir, seed)
        for name, seed in [("a1", 1), ("a2", 2)]
    }
    yield eng
    asyncio.run(eng.close())


# --- batching ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_batched_matches_alone(engine, temperature):
    # Sampling with a seed too: the tiny model's greedy text is one repeated token, while
    # seeded samples walk through varied tokens, positions and padding.
    params = SamplingParams(temperature=temperature, seed=5, max_tokens=24, logprobs=True)
    alone = [asyncio.run(engine.generate(ask(p), params, None)) for p in PROMPTS]
    engine.stats["max_batch_seen"] = 0
    batched = asyncio.run(gather(*(engine.generate(ask(p), params, None) for p in PROMPTS)))
    assert engine.stats["max_batch_seen"] > 1
    for a, b in zip(alone, batched, strict=True):
        assert b.choices[0].token_ids == a.choices[0].token_ids
        assert torch.allclose(logprobs(b), logprobs(a), atol=1e-4)


def test_generate_joining_running_batch_matches_alone(engine):
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=24)
    alone = [
        asyncio.run(engine.generate(ask(p), params, None)).choices[0].token_ids for p in PROMPTS
    ]

    async def staggered():
        first = engine.stream(ask(PROMPTS[0]), params, None)
        await anext(first)  # the first request is decoding when the others arrive
        rest = asyncio.gather(*(engine.generate(ask(p), params, None) for p in PROMPTS[1:]))
        async for _ in first:
            pass
        return await rest

    later = asyncio.run(staggered())
    assert [g.choices[0].token_ids for g in later] == alone[1:]


def test_generate_eight_concurrent_requests_are_batched(engine):
    engine.stats["max_batch_seen"] = 0
    params = SamplingParams(temperature=1.0, seed=8, max_tokens=16)  # seeded: no EOS drawn
    gens = asyncio.run(gather(*(engine.generate(ask(f"q{i}"), params, None) for i in range(8))))
    assert all(g.completion_tokens == 16 for g in gens)
    assert engine.stats["max_batch_seen"] > 1


# --- errors -----------------------------------------------------------------------------


def test_generate_failed_prefill_fails_only_that_request(engine, monkeypatch):
    scheduler = engine._scheduler
    real_prefill = scheduler._prefill

    def broken_once(reqs):
        monkeypatch.setattr(scheduler, "_prefill", real_prefill)
        raise RuntimeError("injected")

    async def scenario():
        # Seeded: an unseeded sample may draw the end-of-text token and stop short of 30.
        running = engine.stream(ask("hi"), SamplingParams(max_tokens=30, seed=3), None)
        await anext(running)
        monkeypatch.setattr(scheduler, "_prefill", broken_once)
        with pytest.raises(EngineError):
            await engine.generate(ask("boom"), SamplingParams(max_tokens=5), None)
        items = [item async for item in running]
        return items[-1], await engine.generate(ask("again"), SamplingParams(max_tokens=5), None)

    end, after = asyncio.run(scenario())
    assert end.completion_tokens == 30
    assert after.completion_tokens == 5
    assert asyncio.run(engine.health())["ok"]


# --- adapters ---------------------------------------------------------------------------


def test_generate_adapter_changes_greedy_output(adapter_engine):
    eng = adapter_engine
    asyncio.run(eng.load_adapter("a1", eng.paths["a1"]))
    assert "a1" in eng.loaded_adapters()
    params = SamplingParams(temperature=0, max_tokens=16)
    base = asyncio.run(eng.generate(ask(PROMPTS[2]), params, None)).choices[0].token_ids
    tuned = asyncio.run(eng.generate(ask(PROMPTS[2]), params, "a1")).choices[0].token_ids
    assert tuned != base


def test_generate_mixed_adapter_batch_matches_alone(adapter_engine):
    eng = adapter_engine
    asyncio.run(eng.load_adapter("a1", eng.paths["a1"]))
    asyncio.run(eng.load_adapter("a2", eng.paths["a2"]))
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=16, logprobs=True)
    runs = [(PROMPTS[0], None), (PROMPTS[1], "a1"), (PROMPTS[2], "a2"), (PROMPTS[0], "a1")]
    alone = [asyncio.run(eng.generate(ask(p), params, a)) for p, a in runs]
    eng.stats["max_batch_seen"] = 0
    mixed = asyncio.run(gather(*(eng.generate(ask(p), params, a) for p, a in runs)))
    assert eng.stats["max_batch_seen"] > 1
    for a, m in zip(alone, mixed, strict=True):
        assert m.choices[0].token_ids == a.choices[0].token_ids
        assert torch.allclose(logprobs(m), logprobs(a), atol=1e-4)
    # Same prompt and seed, base row vs adapter row: each row got its own weights.
    assert not torch.allclose(logprobs(alone[0]), logprobs(alone[3]), atol=1e-2)


def test_unload_adapter_during_request_completes_it(adapter_engine):
    eng = adapter_engine
    asyncio.run(eng.load_adapter("a1", eng.paths["a1"]))
    params = SamplingParams(temperature=0, max_tokens=40)
    want = asyncio.run(eng.generate(ask("hi"), params, "a1")).choices[0].token_ids

    async def scenario():
        agen = eng.stream(ask("hi"), params, "a1")
        first = await anext(agen)
        await eng.unload_adapter("a1")
        assert "a1" not in eng.loaded_adapters()
        with pytest.raises(AdapterNotFound):
            await eng.generate(ask("hi"), params, "a1")
        rest = [item async for item in agen]
        return first, rest

    first, rest = asyncio.run(scenario())
    assert isinstance(rest[-1], StreamEnd) and rest[-1].completion_tokens == len(want)
    # The adapter's weights stayed until the request ended: its output is the adapter's.
    text = first.text + "".join(d.text for d in rest if isinstance(d, Delta))
    assert text == eng.tokenizer.decode(want, skip_special_tokens=True)


def test_load_adapter_missing_directory_raises_adapter_not_found(adapter_engine, tmp_path):
    with pytest.raises(AdapterNotFound):
        asyncio.run(adapter_engine.load_adapter("ghost", str(tmp_path / "nothing")))
    with pytest.raises(AdapterNotFound):
        asyncio.run(adapter_engine.unload_adapter("ghost"))


# --- the real model ---------------------------------------------------------------------


@pytest.mark.slow
def test_generate_default_model_answers_arithmetic(default_model_dir):
    # Greedy in a batch with longer prompts must still give the answer it gives alone: on
    # a real model, near-tied logits would expose any padding or position error.
    eng = EmbeddedEngine(str(default_model_dir), MODEL_CACHE, device="cpu")
    asyncio.run(eng.start())
    params = SamplingParams(temperature=0, max_tokens=30)
    others = ["Name three primary colors.", "Write a haiku about autumn leaves on a pond."]
    try:
        alone = asyncio.run(eng.generate(ask("What is 2+3?"), params, None))
        batched = asyncio.run(
            gather(*(eng.generate(ask(p), params, None) for p in ["What is 2+3?", *others]))
        )
    finally:
        asyncio.run(eng.close())
    assert "5" in alone.choices[0].text
    assert batched[0].choices[0].token_ids == alone.choices[0].token_ids
