"""A worker killed mid-task loses no prompt and duplicates no group: `strop worker`
processes, SIGKILLed while the build task waits on the service, then a second worker."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from strop.queues import queue_length
from strop.records import Keys, PreferencePair, ScoredGroup
from tests.conftest import free_port
from tests.service.conftest import API_KEY
from tests.worker.conftest import wait_until
from worker.app import create_app
from worker.build import group_id

# Sampling 15 answers of 150 tokens takes the voter model a few seconds on this machine:
# time enough to kill the worker inside its service call. The 15 coin flips all agree
# (no signal, no group) with p = 2 / 2^15.
SLOW = {"n_votes": 15, "n_train": 15, "sample_max_tokens": 150}
# The broker delivers the dead worker's task again after this. It is shorter than B's
# build on a loaded machine (production keeps it above the time limit), so the broker
# may also hand B a second copy of its own live task: the built marker makes that a no-op.
VISIBILITY_S = 5


def worker_env(settings, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_REDIS_URL=settings.redis_url,
        STROP_REDIS_PREFIX=settings.redis_prefix,
        STROP_SERVICE_URL=settings.service_url,
        STROP_SERVICE_API_KEY=API_KEY,
        STROP_REWARD_METHOD="ttrl",
        STROP_N_VOTES=str(SLOW["n_votes"]),
        STROP_N_TRAIN=str(SLOW["n_train"]),
        STROP_SAMPLE_MAX_TOKENS=str(SLOW["sample_max_tokens"]),
        STROP_MAX_N=str(settings.max_n),
        STROP_INGEST_INTERVAL_S="0.5",
        STROP_TASK_TIME_LIMIT_S="60",
        STROP_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        STROP_WORKER_METRICS_PORT=str(metrics_port),
        STROP_LOG_LEVEL="INFO",
    )
    return env


def start(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    """`strop <args>` in a session of its own, so the whole worker (pool children and
    embedded beat) can be killed at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_worker_killed_mid_task_redelivered_writes_one_group(service, worker_settings, r, tmp_path):
    settings = worker_settings.model_copy(update=SLOW)
    keys = Keys(settings.redis_prefix)
    oa = openai.OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0)
    oa.chat.completions.create(
        model="strop", messages=[{"role": "user", "content": "Pick: 1 or 2?"}], max_tokens=1
    )
    assert wait_until(lambda: r.xlen(keys.prompt_log) == 1, timeout=10)
    log_id = r.xrange(keys.prompt_log)[0][0]
    marker = keys.built + group_id(log_id, settings)

    # worker A, beat embedded: ingests the prompt, starts its build, and is killed in it
    log_a = tmp_path / "worker-a.log"
    a = start(["worker", "--concurrency", "1"], worker_env(settings, 0), log_a, tmp_path)
    try:
        assert wait_until(lambda: f"build {log_id}: sampling" in log_a.read_text(), timeout=60), (
            log_a.read_text()
        )
        time.sleep(0.3)
        # mid-task: the task is delivered and unacknowledged, and nothing is written yet
        assert r.hlen(keys.prefix + "unacked") == 1
        assert not r.exists(marker) and r.xlen(keys.groups) == 0
    finally:
        stop(a, signal.SIGKILL)
    # A dies sweeping for unacknowledged messages once in a few hundred runs, holding
    # kombu's sweep lock; too rare to time, so here A is made to hold it (simulated):
    # B must still get the task within the lock's expiry, not kombu's default 5 minutes.
    expire = create_app(settings).conf.broker_transport_options["unacked_mutex_expire"]
    assert r.lock(keys.prefix + "unacked_mutex", timeout=expire).acquire(blocking=False)

    # worker B, no beat: after the visibility timeout the broker hands it the same task
    port = free_port()
    log_b = tmp_path / "worker-b.log"
    b = start(
        ["worker", "--no-beat", "--concurrency", "1"], worker_env(settings, port), log_b, tmp_path
    )
    try:
        assert wait_until(lambda: r.exists(marker), timeout=90), log_b.read_text()

        # acknowledged after it ran, and no copy left anywhere to run again (checked twice:
        # a worker pops a message before it marks it unacknowledged)
        def drained() -> bool:
            unacked = r.hlen(keys.prefix + "unacked")
            return unacked == 0 and queue_length(r, settings.redis_prefix) == 0

        assert wait_until(drained, timeout=30)
        time.sleep(1.5)
        assert drained()
        assert r.get(marker) == "built", "all 15 answers agreed: p = 6e-5"
        groups = [ScoredGroup.from_stream(f) for _, f in r.xrange(keys.groups)]
        assert [g.log_id for g in groups] == [log_id]
        assert len(groups[0].completions) == 15
        pairs = [PreferencePair.from_stream(f) for _, f in r.xrange(keys.pairs)]
        assert [p.group_id for p in pairs] == [groups[0].group_id]
        # B's Prometheus metrics, summed over its pool processes
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'strop_worker_groups_built_total{method="ttrl",version="base"} 1.0' in metrics
        assert f"build {log_id}: built" in log_b.read_text()
    finally:
        stop(b)
