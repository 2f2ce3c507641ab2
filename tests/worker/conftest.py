"""Worker fixtures: the service on the voter model, a Celery app per test, a real worker.

Isolation: every test has its own Redis key prefix (`redis_prefix`), and the Celery app
puts its broker keys (queues, unacked messages, bindings) under that prefix too, so two
tests never see each other's tasks. The prefix fixture deletes them all afterwards.
"""

import time

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from service.engines.embedded import EmbeddedEngine
from strop.records import Keys, PromptLogRecord, SamplingRecord
from strop.settings import Settings
from tests.conftest import MODEL_CACHE, REDIS_URL
from tests.service.conftest import *  # noqa: F403  (tiny_engine, settings, adapter_root)
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread, start_engine
from tests.worker.voter import build_voter_model
from worker.app import create_app
from worker.context import make_context, release_contexts

# The worker settings of most tests: TTRL over N = G = 9 one-token answers. The voter
# model answers "1" or "2" at random, so with an odd N there is a strict majority, and
# a group has no signal only if all nine agree (p = 2/512).
WORKER = dict(
    reward_method="ttrl",
    n_votes=9,
    n_train=9,
    sample_max_tokens=1,
    sample_temperature=1.0,
    min_majority_ratio=0.3,
    ingest_interval_s=0.5,
    task_time_limit_s=60,
    worker_metrics_port=0,
)


@pytest.fixture(scope="session")
def voter_model_dir(tmp_path_factory, tiny_model_dir):
    return build_voter_model(tmp_path_factory.mktemp("voter"), tiny_model_dir)


@pytest.fixture(scope="session")
def voter_engine(voter_model_dir):
    """One embedded engine on the voter model, shared by the servers of the worker tests."""
    return start_engine(
        EmbeddedEngine(
            str(voter_model_dir), MODEL_CACHE, device="cpu", max_batch_size=32, max_context=512
        )
    )


@pytest.fixture
def service(settings, voter_engine):
    """The real chat service (uvicorn in a thread) on the voter model."""
    with ServerThread(settings, voter_engine) as server:
        yield server


@pytest.fixture
def worker_settings(settings, service) -> Settings:
    """The service's settings plus the worker's: the worker reads the same settings."""
    return settings.model_copy(
        update={**WORKER, "service_url": service.url, "service_api_key": API_KEY}
    )


@pytest.fixture
def celery_app(worker_settings):
    app = create_app(worker_settings)
    yield app
    release_contexts(app)
    app.close()


@pytest.fixture
def celery_worker(celery_app):
    """A real Celery worker (solo pool, in a thread) consuming this test's queues."""
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30) as w:
        yield w


@pytest.fixture
def ctx(worker_settings):
    """A worker context (clients, metrics) for calling ingest and build directly."""
    c = make_context(worker_settings)
    yield c
    c.redis.close()
    c.service.close()


@pytest.fixture
def r():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


# --- helpers ----------------------------------------------------------------------------


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def log_record(text: str, prompt_tokens: int = 10, **extra) -> dict[str, str]:
    """A prompt-log stream entry, as the service writes one."""
    rec = PromptLogRecord(
        request_id=f"chatcmpl-test-{abs(hash(text))}",
        messages=[{"role": "user", "content": text}],
        sampling=SamplingRecord(),
        responses=["1"],
        model="strop",
        version="base",
        prompt_tokens=prompt_tokens,
        completion_tokens=1,
        latency_ms=1.0,
        key_id="test",
        **extra,
    )
    return rec.to_stream()


def log_ids(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """Prompt text -> log entry id, for every entry in the prompt log."""
    out = {}
    for eid, fields in r.xrange(keys.prompt_log):
        rec = PromptLogRecord.from_stream(fields)
        out[rec.messages[-1]["content"]] = eid
    return out
