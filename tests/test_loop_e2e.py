"""The whole loop, with real parts only: prompts sent through the openai client to the
service are logged, a Celery worker turns them into scored groups, `strop learner` (a
subprocess) trains a version on them with GRPO, gates and promotes it, and the service
hot-swaps to it: the next response's `model` names it, and the next group is sampled by it.

The model is the worker tests' "voter" (tests/worker/voter.py): the tiny model rewired to
answer "1" or "2" at random, so TTRL groups carry a signal and builds take milliseconds.
Its decoder layers' output projections are zero (it is a bigram model), so LoRA targets
`o_proj` here: on q/v it could not change a single output. The gate runs every check, and
its outcome is deterministic: the voter's one-token "judgments" never parse as a score, so
the self-reward check is skipped (recorded as `gate/reward_skipped`), and the KL limit is
set far above what one optimizer step moves the model.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from celery.contrib.testing.worker import start_worker

from strop.records import Keys, ScoredGroup
from strop.registry import Registry
from strop.settings import Settings
from tests.conftest import MODEL_CACHE, REDIS_URL
from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread
from tests.worker.conftest import WORKER, voter_engine, voter_model_dir  # noqa: F401
from worker.app import create_app

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Pick one: 1 or 2?", "Again, 1 or 2?", "Heads (1) or tails (2)?", "1 or 2, now?"]


def _wait(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def loop_settings(redis_prefix, voter_model_dir, tmp_path) -> Settings:  # noqa: F811
    return Settings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        model=str(voter_model_dir),
        model_cache_dir=MODEL_CACHE,
        adapter_dir=tmp_path / "adapters",
        api_keys=[API_KEY],
        admin_key=ADMIN_KEY,
        max_n=16,
        max_context=512,
        adapter_poll_s=0.2,
        **WORKER,
    )


def _learner(settings: Settings) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "STROP_REDIS_URL": settings.redis_url,
        "STROP_REDIS_PREFIX": settings.redis_prefix,
        "STROP_MODEL": settings.model,
        "STROP_MODEL_CACHE_DIR": str(settings.model_cache_dir),
        "STROP_ADAPTER_DIR": str(settings.adapter_dir),
        "STROP_DEVICE": "cpu",
        "STROP_ALGORITHM": "grpo",
        "STROP_LEARNER_METRICS_PORT": "0",
        "STROP_BATCH_SIZE": "2",
        "STROP_STEPS_PER_VERSION": "1",
        "STROP_LEARNING_RATE": "1e-3",
        "STROP_LORA_TARGET_MODULES": "o_proj",
        "STROP_GATE_PROBE_SIZE": "2",
        "STROP_GATE_KL_LIMIT": "1.0",
        "STROP_GATE_REWARD_TOLERANCE": "0.5",
        # the gate's answers and judgments come from the service (internal, pinned)
        "STROP_SERVICE_URL": settings.service_url,
        "STROP_SERVICE_API_KEY": settings.service_api_key or "",
    }
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "learner", "--versions", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_loop_prompts_to_groups_to_promoted_version_served(
    loop_settings,
    voter_engine,  # noqa: F811
    redis_client,
):
    keys = Keys(loop_settings.redis_prefix)
    registry = Registry(redis_client, keys)
    with ServerThread(loop_settings, voter_engine) as server:
        worker_settings = loop_settings.model_copy(
            update={"service_url": server.url, "service_api_key": API_KEY}
        )
        app = create_app(worker_settings)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        def ask(text: str) -> str:
            r = client.chat.completions.create(
                model="strop", messages=[{"role": "user", "content": text}], max_tokens=1
            )
            return r.model

        def ingest_until(n_groups: int) -> None:
            def enough() -> bool:
                app.send_task("worker.ingest_prompts")
                return redis_client.xlen(keys.groups) >= n_groups

            assert _wait(enough, timeout=60, interval=0.5), "the worker built too few groups"

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            # --- traffic -> groups (the worker samples from the service as `strop` = base)
            assert {ask(p) for p in PROMPTS} == {"base"}
            ingest_until(2)
            groups = [(i, ScoredGroup.from_stream(f)) for i, f in redis_client.xrange(keys.groups)]
            assert all(g.version == "base" and g.method == "ttrl" for _, g in groups)

            # --- groups -> a trained, gated, promoted version
            learner = _learner(worker_settings)
            assert learner.returncode == 0, learner.stderr[-3000:]
            assert registry.promoted() == "v1", learner.stderr[-3000:]
            meta = registry.get("v1")
            assert meta.parent == "base" and meta.algorithm == "grpo"
            assert meta.consumed == {keys.groups: [i for i, _ in groups[:2]]}
            assert meta.gate["passed"] is True and meta.gate["gate/reward_skipped"] == 1.0
            assert 0.0 <= meta.gate["gate/kl"] < 1.0
            assert meta.gate["gate/probe_prompts"] == 2.0  # recent prompts from the log
            assert "loss/grpo" in meta.train_metrics and "reward/mean" in meta.train_metrics
            assert redis_client.xpending(keys.groups, keys.learner_group)["pending"] == 0
            assert (loop_settings.adapter_dir / "v1" / "adapter_config.json").exists()

            # --- the service swaps to it: the next request is answered by v1
            assert _wait(lambda: server.service.versions.promoted == "v1", timeout=2.0)
            after = ["Pick one more time: 1 or 2?", "And a last one: 1 or 2?"]
            assert [ask(p) for p in after] == ["strop@v1", "strop@v1"]

            # ... and the worker's groups of those prompts were sampled by v1: the loop is
            # closed (each prompt is dropped only if all 9 answers agree, p = 2/512)
            def later_groups() -> list[ScoredGroup]:
                app.send_task("worker.ingest_prompts")
                found = [ScoredGroup.from_stream(f) for _, f in redis_client.xrange(keys.groups)]
                return [g for g in found if g.messages[-1]["content"] in after]

            assert _wait(later_groups, timeout=60, interval=0.5)
            assert {g.version for g in later_groups()} == {"v1"}
        app.close()
