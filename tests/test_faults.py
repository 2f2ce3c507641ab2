"""Fault injection with real processes: what survives a frozen or killed Redis, a worker
killed mid-build and a learner killed mid-training.

(a) The service under steady traffic while its own redis-server (never the shared one) is
    frozen (SIGSTOP ... SIGCONT) and then killed and restarted on the same port: every
    request is answered and every one of them is in the prompt log afterwards.
(b) `strop worker` SIGKILLed while it builds, then a fresh worker: every logged prompt is
    built exactly once (one group, one pair at most, per prompt).
(c) `strop learner` SIGKILLed while it trains, then restarted: no version number is used
    twice, every record trains exactly one version, and the registry matches the disk.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from strop.adapters import AdapterStore
from strop.queues import queue_length
from strop.records import Keys, PreferencePair, PromptLogRecord, ScoredGroup
from strop.registry import Registry
from strop.settings import Settings
from strop.versions import version_number
from tests.conftest import MODEL_CACHE, REDIS_URL, RedisServer
from tests.learner.harness import pair, service_settings
from tests.service.conftest import API_KEY, adapter_root, settings  # noqa: F401
from tests.service.harness import ServerThread
from tests.worker.conftest import (  # noqa: F401
    service,
    voter_engine,
    voter_model_dir,
    worker_settings,
)
from worker.build import group_id

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --- (a) Redis frozen, then killed, under traffic -------------------------------------


class DurableRedis(RedisServer):
    """A private redis-server that fsyncs every write (AOF, `appendfsync always`), so that
    killing it loses nothing it acknowledged: whatever goes missing was lost by strop."""

    persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)


class Traffic:
    """Client threads asking one question after another until stopped; each question is
    unique, so the prompt log can be checked question by question."""

    def __init__(self, url: str, clients: int = 3):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        self.sent: list[str] = []
        self.answered: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            text = f"client {i} question {n}"
            n += 1
            self.sent.append(text)
            try:
                r = self.client.chat.completions.create(
                    model="strop",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=2,
                    timeout=60,
                )
                assert r.choices[0].message.content is not None
                self.answered.append(text)
            except Exception as e:  # recorded, asserted on by the test
                self.failed.append((text, repr(e)))

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def count(self) -> int:
        return len(self.sent)


def logged_texts(url: str, stream: str) -> list[str]:
    r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    try:
        return [
            PromptLogRecord.from_stream(fields).messages[0]["content"]
            for _, fields in r.xrange(stream)
        ]
    finally:
        r.close()


@dataclass
class Outage:
    """What the service and its Redis went through, and what the prompt log holds after."""

    sent: list[str]
    answered: list[str]
    failed: list[tuple[str, str]]
    health: dict[str, str]
    logged: list[str]
    writer: str  # the prompt-log writer's own counts (from /health)


@pytest.fixture(scope="module")
def outage(tiny_model_dir, tiny_engine, adapter_root, tmp_path_factory) -> Outage:  # noqa: F811
    """Steady traffic from three clients while the service's Redis is frozen for 4 s, then
    killed for 4 s and restarted; once the clients stop, what the prompt log holds."""
    durable = DurableRedis(tmp_path_factory.mktemp("redis"))
    durable.start()
    prefix = f"strop-test-{uuid.uuid4().hex[:10]}:"
    cfg = Settings(
        redis_url=durable.url,
        redis_prefix=prefix,
        model=str(tiny_model_dir),
        model_cache_dir=MODEL_CACHE,
        adapter_dir=adapter_root,
        api_keys=[API_KEY],
        max_context=512,
    )
    stream = Keys(prefix).prompt_log
    health: dict[str, str] = {}
    try:
        with ServerThread(cfg, tiny_engine) as server:
            with Traffic(server.url) as traffic:

                def more_requests(n: int, seconds: float = 0.0) -> None:
                    """At least `n` more requests sent, and at least `seconds` gone by."""
                    start, until = traffic.count(), time.time() + seconds
                    assert wait_until(lambda: traffic.count() >= start + n, 60), traffic.failed
                    time.sleep(max(0.0, until - time.time()))

                def status() -> str:
                    return httpx.get(server.url + "/health", timeout=10).json()["status"]

                more_requests(5)
                # frozen: connections hang and nothing answers, for longer than the
                # service's Redis timeouts (1-2 s)
                durable.signal(signal.SIGSTOP)
                try:
                    more_requests(10, seconds=4)
                    health["frozen"] = status()
                finally:
                    durable.signal(signal.SIGCONT)
                more_requests(5)
                durable.kill()  # gone: connections refused
                more_requests(10, seconds=4)
                health["killed"] = status()
                durable.start()  # same port, same data (the fsynced AOF)
                more_requests(5)
                wait_until(lambda: status() == "ok", timeout=10)
                health["restarted"] = status()

            # the service writes what it buffered once Redis is back
            wait_until(
                lambda: set(traffic.sent) <= set(logged_texts(durable.url, stream)), timeout=30
            )
            logged = logged_texts(durable.url, stream)
            writer = str(httpx.get(server.url + "/health", timeout=10).json()["redis"])
    finally:
        durable.stop()
    return Outage(traffic.sent, traffic.answered, traffic.failed, health, logged, writer)


def test_redis_frozen_then_killed_under_traffic_every_request_answered_and_logged(outage):
    assert outage.health == {"frozen": "degraded", "killed": "degraded", "restarted": "ok"}
    assert outage.failed == []
    assert sorted(outage.answered) == sorted(outage.sent)
    missing = set(outage.sent) - set(outage.logged)
    assert not missing, f"{len(missing)} of {len(outage.sent)} never logged ({outage.writer})"


def test_redis_frozen_then_killed_under_traffic_every_request_logged_once(outage):
    records, requests = len(outage.logged), len(outage.sent)
    duplicated = sorted({t for t in outage.logged if outage.logged.count(t) > 1})
    assert records == requests, f"logged more than once: {duplicated} ({outage.writer})"


# --- (b) a worker killed mid-build ------------------------------------------------------

# 15 answers of 150 tokens take the voter model seconds to sample: time enough to kill the
# worker inside a build. A prompt's 15 coin flips all agree (no group) with p = 2 / 2^15.
SLOW_BUILD = {"n_votes": 15, "n_train": 15, "sample_max_tokens": 150}
VISIBILITY_S = 5  # the broker hands a dead worker's task to another after this


def strop_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`strop <args>` in a session of its own, so that it and its children (Celery's pool,
    embedded beat) can be killed at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def worker_env(cfg) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_REDIS_URL=cfg.redis_url,
        STROP_REDIS_PREFIX=cfg.redis_prefix,
        STROP_SERVICE_URL=cfg.service_url,
        STROP_SERVICE_API_KEY=API_KEY,
        STROP_REWARD_METHOD="ttrl",
        STROP_N_VOTES=str(SLOW_BUILD["n_votes"]),
        STROP_N_TRAIN=str(SLOW_BUILD["n_train"]),
        STROP_SAMPLE_MAX_TOKENS=str(SLOW_BUILD["sample_max_tokens"]),
        STROP_MAX_N=str(cfg.max_n),
        STROP_INGEST_INTERVAL_S="0.5",
        STROP_TASK_TIME_LIMIT_S="60",
        STROP_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        STROP_WORKER_METRICS_PORT="0",
        STROP_LOG_LEVEL="INFO",
    )
    return env


def test_worker_killed_mid_build_restarted_every_prompt_built_once(
    service,  # noqa: F811
    worker_settings,  # noqa: F811
    redis_client,
    tmp_path,
):
    cfg = worker_settings.model_copy(update=SLOW_BUILD)
    keys = Keys(cfg.redis_prefix)
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0)
    prompts = [f"Pick one, round {i}: 1 or 2?" for i in range(4)]
    for text in prompts:
        client.chat.completions.create(
            model="strop", messages=[{"role": "user", "content": text}], max_tokens=1
        )
    assert wait_until(lambda: redis_client.xlen(keys.prompt_log) == len(prompts), 10)
    log_ids = [eid for eid, _ in redis_client.xrange(keys.prompt_log)]
    markers = {eid: keys.built + group_id(eid, cfg) for eid in log_ids}

    def finished() -> list[str]:
        return [eid for eid, m in markers.items() if redis_client.exists(m)]

    # worker A (beat embedded) builds one prompt, and is SIGKILLed inside the next build
    log_a = tmp_path / "worker-a.log"
    a = strop_process(["worker", "--concurrency", "1"], worker_env(cfg), log_a)
    try:

        def inside_a_build() -> bool:
            done = finished()
            started = [e for e in log_ids if f"build {e}: sampling" in log_a.read_text()]
            return len(done) >= 1 and any(e not in done for e in started)

        assert wait_until(inside_a_build, timeout=120, interval=0.05), log_a.read_text()
    finally:
        kill_group(a, signal.SIGKILL)
    assert len(finished()) < len(prompts), "worker A finished everything: nothing was killed"

    # worker B: the killed build comes back after the visibility timeout, the rest as well
    log_b = tmp_path / "worker-b.log"
    b = strop_process(["worker", "--concurrency", "1"], worker_env(cfg), log_b)
    try:
        assert wait_until(lambda: len(finished()) == len(prompts), timeout=180), log_b.read_text()[
            -3000:
        ]
        assert wait_until(lambda: redis_client.hlen(keys.prefix + "unacked") == 0, timeout=20)
        assert queue_length(redis_client, cfg.redis_prefix) == 0
    finally:
        kill_group(b, signal.SIGTERM)

    groups = [ScoredGroup.from_stream(f) for _, f in redis_client.xrange(keys.groups)]
    pairs = [PreferencePair.from_stream(f) for _, f in redis_client.xrange(keys.pairs)]
    assert sorted(g.log_id for g in groups) == sorted(log_ids), "a prompt lost or built twice"
    assert sorted(p.group_id for p in pairs) == sorted(g.group_id for g in groups)
    assert {redis_client.get(m) for m in markers.values()} == {"built"}
    assert sorted(g.messages[-1]["content"] for g in groups) == sorted(prompts)


# --- (c) a learner killed mid-training ----------------------------------------------------

RECORDS_PER_VERSION = 8  # STROP_BATCH_SIZE x STROP_STEPS_PER_VERSION below


@pytest.fixture
def gate_service(tiny_model_dir, tiny_engine, redis_prefix, tmp_path):
    """The service the learner's gate asks, on the test's prefix and adapter directory."""
    cfg = service_settings(tiny_model_dir, redis_prefix, tmp_path / "adapters")
    with ServerThread(cfg, tiny_engine) as server:
        yield server


def learner_env(tiny_model_dir, redis_prefix: str, adapters: Path, service_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_SERVICE_URL=service_url,
        STROP_REDIS_URL=REDIS_URL,
        STROP_REDIS_PREFIX=redis_prefix,
        STROP_MODEL=str(tiny_model_dir),
        STROP_MODEL_CACHE_DIR=str(MODEL_CACHE),
        STROP_ADAPTER_DIR=str(adapters),
        STROP_DEVICE="cpu",
        STROP_TORCH_THREADS="1",
        STROP_ALGORITHM="dpo",
        STROP_BATCH_SIZE="2",
        STROP_STEPS_PER_VERSION=str(RECORDS_PER_VERSION // 2),
        STROP_GATE_PROBE_SIZE="1",
        STROP_GATE_KL_LIMIT="1.0",
        STROP_LORA_TARGET_MODULES="q_proj,v_proj",
        STROP_LOG_LEVEL="INFO",
        STROP_LEARNER_METRICS_PORT="0",
    )
    return env


def test_learner_killed_mid_training_restarted_no_version_twice_registry_matches_disk(
    tiny_model_dir, redis_prefix, redis_client, tmp_path, gate_service
):
    keys, adapters = Keys(redis_prefix), tmp_path / "adapters"
    store, registry = AdapterStore(adapters), Registry(redis_client, keys)
    env = learner_env(tiny_model_dir, redis_prefix, adapters, gate_service.url)
    ids = [
        redis_client.xadd(keys.pairs, pair(i).to_stream()) for i in range(4 * RECORDS_PER_VERSION)
    ]

    def state() -> dict:
        return redis_client.hgetall(keys.learner_state)

    # 1. the first learner writes v1, and is SIGKILLed once it trains on top of it (in a
    # step, or a little later under load: saving or gating v2; any point must be safe)
    log_1 = tmp_path / "learner-1.log"
    first = strop_process(["learner"], env, log_1)
    try:

        def training_on_v1() -> bool:
            assert first.poll() is None, log_1.read_text()[-3000:]
            return " from v1 |" in log_1.read_text()

        assert wait_until(training_on_v1, timeout=180, interval=0.02), log_1.read_text()
    finally:
        kill_group(first, signal.SIGKILL)
    killed_at = state()
    before = sum(len(v.consumed.get(keys.pairs, [])) for v in registry.all())
    assert before < len(ids), "the learner had trained on everything: nothing was killed"
    redis_client.delete(keys.learner_state)

    # 2. a restarted learner trains on until every record is in a version, then is stopped
    log_2 = tmp_path / "learner-2.log"
    second = strop_process(["learner"], env, log_2)
    try:

        def all_trained() -> bool:
            assert second.poll() is None, log_2.read_text()[-3000:]
            versions = registry.all()
            done = sum(len(v.consumed.get(keys.pairs, [])) for v in versions)
            return done == len(ids) and all(v.status != "candidate" for v in versions)

        assert wait_until(all_trained, timeout=240, interval=0.2), log_2.read_text()[-3000:]
    finally:
        kill_group(second, signal.SIGTERM)

    # no version number used twice, and the registry holds exactly what is on disk
    on_disk = store.versions()
    assert sorted(on_disk, key=version_number) == on_disk and len(set(on_disk)) == len(on_disk)
    assert [p.name for p in adapters.iterdir() if p.name.startswith(".")] == []
    versions = registry.all()
    assert sorted(v.version for v in versions) == sorted(on_disk), killed_at
    for v in versions:
        assert store.read(v.version).consumed == v.consumed
        assert v.status in ("promoted", "rejected"), v
    # every record trained exactly one version: none lost with the killed process
    consumed = [i for v in versions for i in v.consumed[keys.pairs]]
    assert sorted(consumed) == sorted(ids), killed_at
    assert redis_client.xpending(keys.pairs, keys.learner_group)["pending"] == 0
    # each version builds on the version promoted before it; the pointer is the last one
    promoted = [v.version for v in versions if v.status == "promoted"]
    assert registry.promoted() == promoted[-1]
    for v in versions:
        earlier = [p for p in promoted if version_number(p) < version_number(v.version)]
        assert v.parent == (earlier[-1] if earlier else "base"), v
