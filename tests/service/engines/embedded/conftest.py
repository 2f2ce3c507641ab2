"""Shared by the embedded engine's tests: one engine on the tiny model, and `ask`.

All but one test run on the tiny random model (its text is gibberish, but token ids,
logprobs and batching behave as on a real model); one asks the real default model.
"""

import asyncio

import pytest

from service.engines.embedded import EmbeddedEngine
from tests.conftest import MODEL_CACHE


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="package")
def engine(tiny_model_dir):
    eng = EmbeddedEngine(
        str(tiny_model_dir), MODEL_CACHE, device="cpu", max_batch_size=16, max_context=512
    )
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())
