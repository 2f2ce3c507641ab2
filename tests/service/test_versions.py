"""Versions the learner has registered but not promoted: served to the gate's internal
requests when pinned, never to users, never listed, never routed to by `strop`."""

import time

import openai
import pytest

from strop.adapters import AdapterStore
from strop.headers import INTERNAL
from strop.records import AdapterVersion, Keys
from strop.registry import Registry
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread, make_adapter

MESSAGES = [{"role": "user", "content": "Hello?"}]


@pytest.fixture
def candidate_server(settings, tiny_engine, tiny_model_dir, redis_client, tmp_path):
    """A service whose adapter directory holds v21, written and registered by the learner
    (metadata on disk, registry status `candidate`)."""
    store = AdapterStore(tmp_path / "adapters")
    meta = AdapterVersion(version="v21", parent="base", path="")
    store.write(meta, lambda tmp: make_adapter(tmp, tiny_model_dir, seed=21))
    registry = Registry(redis_client, Keys(settings.redis_prefix))
    registry.add(meta)
    with ServerThread(settings.model_copy(update={"adapter_dir": store.root}), tiny_engine) as s:
        yield s, registry


def _models(client: openai.OpenAI) -> set[str]:
    return {m.id for m in client.models.list().data}


def test_versions_candidate_hidden_from_users_served_to_internal_requests(candidate_server):
    server, _ = candidate_server
    user = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    gate = openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=API_KEY,
        max_retries=0,
        default_headers={INTERNAL: "1"},
    )

    assert "strop@v21" not in _models(user)
    with pytest.raises(openai.NotFoundError) as e:
        user.chat.completions.create(model="strop@v21", messages=MESSAGES, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"

    r = gate.chat.completions.create(model="strop@v21", messages=MESSAGES, max_tokens=2)
    assert r.model == "strop@v21"
    # `strop` still serves the base model: a candidate is never routed to
    assert user.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=2).model == (
        "base"
    )


def test_versions_candidate_promoted_then_listed_and_pinnable_by_users(candidate_server):
    server, registry = candidate_server
    user = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        user.chat.completions.create(model="strop@v21", messages=MESSAGES, max_tokens=2)

    registry.promote("v21")
    # pinned at once: the service asks the registry rather than wait for the event
    r = user.chat.completions.create(model="strop@v21", messages=MESSAGES, max_tokens=2)
    assert r.model == "strop@v21"
    deadline = time.time() + 5
    while "strop@v21" not in _models(user) and time.time() < deadline:
        time.sleep(0.1)
    assert "strop@v21" in _models(user)

    registry.rollback(to="base")  # a version once released stays pinnable
    time.sleep(0.5)
    r = user.chat.completions.create(model="strop@v21", messages=MESSAGES, max_tokens=2)
    assert r.model == "strop@v21"
