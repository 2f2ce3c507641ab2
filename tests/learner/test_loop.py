"""The learner loop on the tiny model: training, acknowledgement, staleness, recovery.

The last test runs `strop learner` as a subprocess and SIGKILLs it during a step, during a
save and right after a save, then checks that no record is lost or trained on twice.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from learner.loop import PAUSE_ENV
from strop.adapters import AdapterStore
from strop.records import AdapterVersion, Keys, PreferencePair, ScoredGroup
from strop.registry import Registry
from strop.series import Obs, write_series
from tests.conftest import MODEL_CACHE, REDIS_URL, free_port
from tests.learner.harness import group, pair, service_settings
from tests.service.harness import ServerThread, make_adapter

ROOT = Path(__file__).resolve().parents[2]


def test_learner_dpo_version_saved_then_acked_and_promoted(make_learner):
    learner = make_learner(steps_per_version=2)
    ids = [learner.r.xadd(learner.keys.pairs, pair(i).to_stream()) for i in range(4)]
    learner.start()
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}

    assert learner.run(max_versions=1) == ["v1"]

    meta = learner.store.read("v1")
    assert meta.parent == "base" and meta.status == "promoted" and meta.algorithm == "dpo"
    assert meta.consumed == {learner.keys.pairs: ids}
    assert meta.train_metrics["data/records"] == 4.0
    for key in ("loss/dpo", "reward/mean", "rewards/margin", "grad/norm"):
        assert key in meta.train_metrics
    assert meta.gate["passed"] is True and "gate/kl" in meta.gate
    assert meta.hyperparameters["dpo_beta"] == 0.1
    assert learner.feed.pending_ids() == set()
    assert learner.registry.promoted() == "v1"
    assert [e.kind for e in learner.registry.events()] == ["candidate", "promoted"]
    # the LoRA really trained: B started at zero and moved
    changed = [
        n for n, p in learner.policy.model.named_parameters() if not torch.equal(p, before[n])
    ]
    assert changed and all("lora_" in n for n in changed)


def test_learner_average_steps_saves_the_mean_of_its_steps_weights(make_learner):
    # STROP_AVERAGE_STEPS: the version written is the mean of the LoRA weights after each
    # step, not the last step's; and training goes on from what was saved.
    learner = make_learner(steps_per_version=2, average_steps=True)
    for i in range(4):
        learner.r.xadd(learner.keys.pairs, pair(i).to_stream())
    learner.start()
    after_step: list[dict[str, torch.Tensor]] = []
    step = learner.optimizer.step

    def step_and_snapshot(*args, **kwargs):  # a spy: the real step, then a copy
        out = step(*args, **kwargs)
        after_step.append(
            {
                n: p.detach().clone()
                for n, p in learner.policy.model.named_parameters()
                if p.requires_grad
            }
        )
        return out

    learner.optimizer.step = step_and_snapshot

    assert learner.run(max_versions=1) == ["v1"]

    assert len(after_step) == 2
    live = {n: p for n, p in learner.policy.model.named_parameters() if p.requires_grad}
    moved = [n for n in live if not torch.equal(after_step[0][n], after_step[1][n])]
    assert moved  # the two steps differ, so the mean is neither of them
    for n, p in live.items():
        torch.testing.assert_close(p, (after_step[0][n] + after_step[1][n]) / 2)
    # what was saved is that mean (PEFT names the weights without the adapter's name)
    saved = load_file(str(learner.store.path("v1") / "adapter_model.safetensors"))
    for n in moved:
        torch.testing.assert_close(saved[n.replace(".default", "")], live[n])
    assert learner.store.read("v1").hyperparameters["average_steps"] is True


def test_learner_metrics_scraped_over_http_after_a_version(make_learner):
    learner = make_learner(steps_per_version=2)
    long_pair = pair(9).model_copy(update={"messages": [{"role": "user", "content": "hi " * 400}]})
    learner.r.xadd(learner.keys.pairs, long_pair.to_stream())  # over max_len: dropped
    for i in range(4):
        learner.r.xadd(learner.keys.pairs, pair(i).to_stream())
    port = free_port()
    assert learner.metrics.serve(port, "127.0.0.1")
    assert not learner.metrics.serve(port, "127.0.0.1")  # port taken: logged, not fatal
    learner.start()
    assert learner.run(max_versions=1) == ["v1"]

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("strop_learner_steps_total", ())] == 2
    assert samples[("strop_learner_records_total", ())] == 4
    assert samples[("strop_learner_dropped_total", (("reason", "too_long"),))] == 1
    assert samples[("strop_learner_versions_total", (("status", "promoted"),))] == 1
    assert samples[("strop_learner_promoted_version", ())] == 1
    assert samples[("strop_learner_step_seconds_count", ())] == 2
    gate = learner.store.read("v1").gate
    assert samples[("strop_learner_gate_kl", ())] == pytest.approx(gate["gate/kl"])
    assert samples[("strop_learner_loss", ())] > 0  # DPO's loss is -log sigmoid(...) > 0
    phase = {k[1][0][1]: v for k, v in samples.items() if k[0] == "strop_learner_phase"}
    assert phase["stopped"] == 1 and sum(phase.values()) == 1


def test_learner_rejected_version_next_starts_again_from_promoted(make_learner):
    learner = make_learner(gate_kl_limit=-1.0)  # no candidate can pass
    for i in range(4):
        learner.r.xadd(learner.keys.pairs, pair(i).to_stream())
    learner.start()

    assert learner.run(max_versions=2) == ["v1", "v2"]

    v1, v2 = learner.store.read("v1"), learner.store.read("v2")
    assert v1.status == v2.status == "rejected"
    assert v1.reason.startswith("KL to base ") and v1.reason.endswith("> limit -1.0")
    assert learner.registry.get("v1").reason == v1.reason
    assert learner.registry.promoted() is None
    # v2 trained from the base model again, not from the rejected v1: at its first (and
    # only) step the policy still equalled the reference, so the DPO margin was exactly 0
    assert v2.parent == "base"
    assert v2.train_metrics["rewards/margin"] == 0.0
    assert v1.train_metrics["rewards/margin"] == 0.0


def test_learner_grpo_stale_and_unknown_groups_dropped_and_acked(make_learner, tiny_model_dir):
    learner = make_learner(algorithm="grpo", max_staleness=2)
    make_adapter(learner.store.path("v3"), tiny_model_dir, seed=3, scale=0.3)
    learner.registry.add(AdapterVersion(version="v3", parent="base", path="x"))
    learner.registry.promote("v3")
    add = lambda g: learner.r.xadd(learner.keys.groups, g.to_stream())  # noqa: E731
    stale = add(group(0, "base"))  # 3 versions behind v3
    unknown = add(group(3, "v9"))  # no such adapter on disk
    fresh = [add(group(1, "v3")), add(group(2, "v2"))]  # v2: one version behind
    make_adapter(learner.store.path("v2"), tiny_model_dir, seed=2, scale=0.3)
    learner.start()

    assert learner.run(max_versions=1) == ["v4"]

    meta = learner.store.read("v4")
    assert meta.parent == "v3"
    assert meta.consumed == {learner.keys.groups: fresh}
    assert meta.train_metrics["data/dropped_stale"] == 1.0
    assert meta.train_metrics["data/dropped_unknown_version"] == 1.0
    assert meta.train_metrics["data/staleness"] == 0.5
    assert "loss/grpo" in meta.train_metrics and "reward/mean" in meta.train_metrics
    assert learner.feed.pending_ids() == set()  # dropped ones acked too
    assert stale not in sum(meta.consumed.values(), []) and unknown not in fresh


def _train_on_a_group_v1_sampled(learner, model_dir) -> None:
    """Promote an adapter v1, give the learner one group v1 sampled, train v2 on it."""
    make_adapter(learner.store.path("v1"), model_dir, seed=1, scale=0.5)
    learner.registry.add(AdapterVersion(version="v1", parent="base", path="x"))
    learner.registry.promote("v1")
    learner.r.xadd(learner.keys.groups, group(5, "v1").to_stream())
    learner.start()
    learner.run(max_versions=1)


def test_learner_grpo_on_policy_group_ratio_is_exactly_one(make_learner, tiny_model_dir):
    # The behaviour log-probs are recomputed under the group's version: for a group the
    # parent itself sampled, the first step's importance ratio is 1 on every token.
    learner = make_learner(algorithm="grpo", batch_size=1)
    _train_on_a_group_v1_sampled(learner, tiny_model_dir)

    m = learner.store.read("v2").train_metrics
    assert m["policy/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert m["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["policy/clip_fraction"] == 0.0


def test_learner_grpo_iterations_step_each_batch_mu_times(make_learner, tiny_model_dir):
    # With mu = 3 the first step on an on-policy group has ratio 1; the next two start from
    # weights that already moved, so the ratio to the sampling version leaves 1.
    learner = make_learner(algorithm="grpo", batch_size=1, grpo_iterations=3)
    _train_on_a_group_v1_sampled(learner, tiny_model_dir)

    meta = learner.store.read("v2")
    assert meta.hyperparameters["grpo_iterations"] == 3
    assert meta.train_metrics["data/records"] == 1.0  # one group, used three times
    # the mean over the 3 steps: 1 for the first, off 1 for the others
    assert meta.train_metrics["policy/ratio_max"] > 1.0 + 1e-4
    assert meta.train_metrics["policy/ratio_min"] < 1.0 - 1e-4


def _written(learner, g: ScoredGroup, n: int) -> None:
    """`n` copies of group `g` written as the worker writes them: to the groups stream, and
    their rewards to the live-reward series the rollback check reads."""
    with learner.r.pipeline(transaction=True) as pipe:
        for _ in range(n):
            pipe.xadd(learner.keys.groups, g.to_stream())
        obs = [Obs("reward", g.version, sum(g.rewards), len(g.rewards))] * n
        write_series(pipe, learner.keys, obs, time.time())
        pipe.execute()


def test_learner_housekeeping_live_reward_drop_rolls_back_and_rebases(make_learner, tiny_model_dir):
    learner = make_learner(algorithm="grpo", rollback_check_s=0.0, rollback_min_samples=8)
    make_adapter(learner.store.path("v1"), tiny_model_dir, seed=1)
    learner.registry.add(AdapterVersion(version="v1", parent="base", path="x"))
    # base answered well before the promotion ...
    _written(learner, group(1, "base").model_copy(update={"rewards": [1.0, 1.0, 1.0, 0.0]}), 3)
    learner.registry.promote("v1")
    learner.start()
    assert learner.policy.parent == "v1"
    # ... and v1 answers badly after it
    _written(learner, group(2, "v1").model_copy(update={"rewards": [0.0, 0.0, 1.0, 0.0]}), 3)

    learner.housekeeping()

    assert learner.registry.promoted() is None
    assert learner.registry.get("v1").status == "rolled_back"
    learner.rebase()  # the next version trains on top of what `strop` serves now
    assert learner.policy.parent == "base"


def test_feed_pending_of_another_consumer_claimed_and_reread(redis_client, redis_prefix):
    from learner.feed import Feed

    keys = Keys(redis_prefix)
    ids = [redis_client.xadd(keys.pairs, pair(i).to_stream()) for i in range(3)]
    old = Feed(redis_client, keys.pairs, keys.learner_group, "learner-old", PreferencePair)
    old.setup()
    assert [sid for sid, _ in old.read(2, 100)] == ids[:2]  # then it died, unacknowledged

    feed = Feed(redis_client, keys.pairs, keys.learner_group, "learner-0", PreferencePair)
    feed.setup()

    assert [sid for sid, _ in feed.read(5, 100)] == ids  # its pending ones first, then new
    assert feed.pending_ids() == set(ids)
    feed.ack(ids)
    assert feed.pending_ids() == set()


# --- the real process, killed ------------------------------------------------------------


def _spawn(env: dict, pause: str | None, versions: int | None = None) -> subprocess.Popen:
    env = dict(env)
    if pause:
        env[PAUSE_ENV] = pause
    argv = [sys.executable, "-m", "ops.cli", "learner"]
    if versions:
        argv += ["--versions", str(versions)]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _wait_phase(r: redis.Redis, keys: Keys, proc: subprocess.Popen, phase: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if r.hget(keys.learner_state, "phase") == phase:
            return
        if proc.poll() is not None:
            raise AssertionError(f"learner exited ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"learner never reached {phase}")


def _kill(r, keys, proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    r.delete(keys.learner_state)


@pytest.fixture
def gate_service(tiny_model_dir, tiny_engine, redis_prefix, tmp_path):
    """The service a learner process gates through, on the test's prefix and adapters."""
    settings = service_settings(tiny_model_dir, redis_prefix, tmp_path / "adapters")
    with ServerThread(settings, tiny_engine) as server:
        yield server


def test_learner_killed_during_step_and_save_resumes_without_losing_records(
    tiny_model_dir, redis_prefix, redis_client, tmp_path, gate_service
):
    keys, adapters = Keys(redis_prefix), tmp_path / "adapters"
    store, registry = AdapterStore(adapters), Registry(redis_client, keys)
    env = {
        **os.environ,
        "STROP_SERVICE_URL": gate_service.url,
        "STROP_REDIS_URL": REDIS_URL,
        "STROP_REDIS_PREFIX": redis_prefix,
        "STROP_MODEL": str(tiny_model_dir),
        "STROP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "STROP_ADAPTER_DIR": str(adapters),
        "STROP_DEVICE": "cpu",
        "STROP_ALGORITHM": "dpo",
        "STROP_BATCH_SIZE": "2",
        "STROP_STEPS_PER_VERSION": "2",
        "STROP_GATE_PROBE_SIZE": "1",
        "STROP_GATE_KL_LIMIT": "1.0",
        "STROP_LORA_TARGET_MODULES": "q_proj,v_proj",
        "STROP_LOG_LEVEL": "INFO",
        "STROP_LEARNER_METRICS_PORT": "0",
    }
    ids = {redis_client.xadd(keys.pairs, pair(i).to_stream()) for i in range(8)}

    # 1. killed during an optimizer step: nothing on disk, what it read stays pending
    proc = _spawn(env, "step")
    _wait_phase(redis_client, keys, proc, "paused:step")
    _kill(redis_client, keys, proc)
    assert not adapters.exists() or list(adapters.iterdir()) == []
    assert len(redis_client.xpending(keys.pairs, keys.learner_group)["consumers"]) == 1
    assert redis_client.xpending(keys.pairs, keys.learner_group)["pending"] == 2

    # 2. killed while writing v1: a temporary directory, no v1
    proc = _spawn(env, "save")
    _wait_phase(redis_client, keys, proc, "paused:save")
    _kill(redis_client, keys, proc)
    assert [p.name.startswith(".tmp-v1-") for p in adapters.iterdir()] == [True]
    assert store.versions() == [] and registry.all() == []

    # 3. killed after v2 was renamed into place, before it was registered or acknowledged
    proc = _spawn(env, "saved")
    _wait_phase(redis_client, keys, proc, "paused:saved")
    _kill(redis_client, keys, proc)
    assert store.versions() == ["v2"] and registry.get("v2") is None
    assert [p.name for p in adapters.iterdir()] == ["v2"]  # the restart removed v1's debris
    assert redis_client.xpending(keys.pairs, keys.learner_group)["pending"] == 4

    # 4. a clean run: reconciles v2, then trains the rest into v3 and exits
    proc = _spawn(env, None, versions=1)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr

    assert store.versions() == ["v2", "v3"]  # v1's number died with its save: never reused
    assert [p.name for p in adapters.iterdir() if p.name.startswith(".")] == []
    consumed = [store.read(v).consumed[keys.pairs] for v in ("v2", "v3")]
    assert len(consumed[0]) == len(consumed[1]) == 4
    assert set(consumed[0]) | set(consumed[1]) == ids
    assert set(consumed[0]).isdisjoint(consumed[1])  # every record in exactly one version
    assert redis_client.xpending(keys.pairs, keys.learner_group)["pending"] == 0
    assert store.read("v3").parent == "v2"
    assert [v.status for v in registry.all()] == ["promoted", "promoted"]
    assert registry.promoted() == "v3"
    assert "v2 is on disk but not in the registry" in stderr
    state = redis_client.hgetall(keys.learner_state)
    assert state["phase"] == "stopped" and json.loads(state["dropped"]) == {}
