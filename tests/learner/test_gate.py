"""The promotion gate on the tiny model: finite weights, KL to the parent, self-reward.

The answers and judgments come from a real service (internal requests, the candidate
pinned while only registered); the KL is computed here, on the learner's own weights."""

import math

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from learner.gate import BUILTIN_PROMPTS, probe_prompts, run_gate, verdict
from learner.policy import Policy
from learner.serving import connect_service
from strop.adapters import AdapterStore
from strop.labeled import LabeledQuestion
from strop.model import load_model
from strop.records import AdapterVersion, Keys, PromptLogRecord, SamplingRecord
from strop.registry import Registry
from tests.conftest import MODEL_CACHE
from tests.learner.harness import service_settings
from tests.service.harness import ServerThread, make_adapter

PROMPTS = ["What is 2 + 2?", "Name a colour."]
GATE = dict(kl_limit=0.05, reward_tolerance=0.5, max_tokens=6, judge_tokens=8, max_len=512)


@pytest.fixture
def policy(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), MODEL_CACHE, "cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return Policy(model, tokenizer, AdapterStore(tmp_path / "adapters"), lora)


@pytest.fixture
def service(tiny_model_dir, tiny_engine, redis_prefix, tmp_path):
    """A real service on the policy's adapter directory; yields the gate's client to it."""
    settings = service_settings(tiny_model_dir, redis_prefix, tmp_path / "adapters")
    with ServerThread(settings, tiny_engine) as server:
        client = connect_service(server.url, None, timeout_s=60)
        yield client
        client.close()


def _register_candidate(policy, redis_client, redis_prefix, version: str, parent: str):
    """Save the trainable adapter as `version` and register it, not promoted (as the
    learner does before its gate)."""
    meta = AdapterVersion(version=version, parent=parent, path="")
    policy.store.write(meta, policy.save)
    Registry(redis_client, Keys(redis_prefix)).add(meta)
    return policy.store.path(version)


def test_gate_candidate_equal_to_parent_passes_with_zero_kl(
    policy, service, tiny_model_dir, redis_client, redis_prefix
):
    # v1 on disk; the trainable adapter starts from it, so candidate == parent
    make_adapter(policy.store.path("v1"), tiny_model_dir, seed=1, scale=0.5)
    policy.reset("v1")
    path = _register_candidate(policy, redis_client, redis_prefix, "v2", parent="v1")

    result = run_gate(policy, service, "default", "v2", "v1", path, PROMPTS, **GATE)

    assert result.passed, result.reason
    assert result.metrics["gate/kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["gate/finite"] == 1.0
    assert result.metrics["gate/probe_prompts"] == 2.0


def test_gate_candidate_far_from_parent_rejected_on_kl(policy, service, tiny_model_dir):
    # The tiny random model's logits are nearly flat, so even a large adapter moves its
    # distributions little: the limit here is scaled down to match.
    make_adapter(policy.store.path("v2"), tiny_model_dir, seed=2, scale=30.0)

    result = run_gate(
        policy,
        service,
        "v2",
        "v2",
        "base",
        policy.store.path("v2"),
        PROMPTS,
        **(GATE | {"kl_limit": 1e-3}),
    )

    assert not result.passed
    assert result.metrics["gate/kl"] > 1e-3
    assert result.reason.startswith("KL to base ")
    assert result.record()["passed"] is False and "gate/kl" in result.record()


def test_gate_nan_weights_rejected_before_running(policy, tiny_model_dir):
    path = make_adapter(policy.store.path("v3"), tiny_model_dir, seed=3)
    weights = load_file(path / "adapter_model.safetensors")
    first = next(iter(weights))
    weights[first][0, 0] = math.nan
    save_file(weights, path / "adapter_model.safetensors")

    # no service at all: a candidate with broken weights never reaches one
    result = run_gate(policy, None, "v3", "v3", "base", path, PROMPTS, **GATE)

    assert not result.passed and result.reason.startswith("weights are not finite")
    assert result.metrics == {"gate/finite": 0.0}


def test_gate_verdict_reward_drop_beyond_tolerance_fails():
    assert verdict(0.01, 3.0, 3.5, kl_limit=0.1, reward_tolerance=0.6) is None
    reason = verdict(0.01, 2.0, 3.5, kl_limit=0.1, reward_tolerance=0.6)
    assert reason.startswith("self-reward dropped 1.500 (3.500 -> 2.000)")
    # unjudged (no parseable score on one side): no evidence of a drop
    assert verdict(0.01, None, 3.5, kl_limit=0.1, reward_tolerance=0.6) is None
    assert verdict(float("nan"), 3.0, 3.0, kl_limit=0.1, reward_tolerance=0.6) is not None


def test_probe_prompts_latest_distinct_user_prompts_or_builtin(redis_client, redis_prefix):
    keys = Keys(redis_prefix)
    assert probe_prompts(redis_client, keys, 3) == BUILTIN_PROMPTS[:3]

    for i, text in enumerate(["old", "a", "b", "a", "c"]):
        record = PromptLogRecord(
            request_id=f"r{i}",
            messages=[
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "first turn"},
                {"role": "user", "content": text},
            ],
            sampling=SamplingRecord(),
            responses=["x"],
            model="strop",
            version="base",
            prompt_tokens=3,
            completion_tokens=1,
            latency_ms=1.0,
            key_id="k",
        )
        redis_client.xadd(keys.prompt_log, record.to_stream())

    assert probe_prompts(redis_client, keys, 3) == ["c", "a", "b"]


def test_gate_kl_is_finite_for_greedy_eos_answers(policy):
    # KL over full distributions is >= 0 and zero for identical adapters, also when the
    # parent's greedy answer ends at eos straight away (one-token completions).
    from learner.gate import mean_kl

    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    eos = policy.tokenizer.eos_token_id
    kl = mean_kl(policy, "default", "base", msgs, [[eos], [eos]], max_len=512)
    assert kl == pytest.approx(0.0, abs=1e-6) and not torch.isnan(torch.tensor(kl))


# --- the canary, on the real default model ---------------------------------------------------

CANARY = [
    LabeledQuestion(f"What is {a} + {b}?", str(a + b), "arithmetic")
    for a, b in ((2, 3), (4, 4), (5, 1), (3, 6), (7, 2), (1, 8), (6, 3), (2, 2), (9, 1), (4, 5))
]
CANARY_GATE = dict(kl_limit=1e9, reward_tolerance=10.0, max_tokens=4, judge_tokens=4)


@pytest.fixture(scope="module")
def smol_engine(default_model_dir):
    from service.engines.embedded import EmbeddedEngine
    from tests.service.harness import start_engine

    return start_engine(EmbeddedEngine(str(default_model_dir), MODEL_CACHE, device="cpu"))


@pytest.mark.slow
def test_gate_damaged_adapter_fails_canary_undamaged_passes(
    default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path
):
    model, tokenizer = load_model(str(default_model_dir), MODEL_CACHE, "cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    policy = Policy(model, tokenizer, AdapterStore(tmp_path / "adapters"), lora)
    registry = Registry(redis_client, Keys(redis_prefix))
    settings = service_settings(default_model_dir, redis_prefix, tmp_path / "adapters")
    # v1: large random LoRA weights, the model's answers turn to noise
    damaged = AdapterVersion(version="v1", parent="base", path="")
    policy.store.write(damaged, lambda tmp: make_adapter(tmp, default_model_dir, seed=1, scale=8.0))
    registry.add(damaged)
    # v2: a fresh LoRA (B = 0), the base model's answers exactly
    path2 = _register_candidate(policy, redis_client, redis_prefix, "v2", parent="base")

    with ServerThread(settings.model_copy(update={"max_context": None}), smol_engine) as server:
        client = connect_service(server.url, None, timeout_s=300)
        bad = run_gate(
            policy,
            client,
            "v1",
            "v1",
            "base",
            policy.store.path("v1"),
            PROMPTS,
            canary=CANARY,
            canary_tolerance=0.05,
            canary_tokens=24,
            **CANARY_GATE,
        )
        good = run_gate(
            policy,
            client,
            "default",
            "v2",
            "base",
            path2,
            PROMPTS,
            canary=CANARY,
            canary_tolerance=0.05,
            canary_tokens=24,
            **CANARY_GATE,
        )

    assert bad.metrics["gate/canary_parent"] > 0.05, "base must get some canary answers right"
    assert bad.metrics["gate/canary_candidate"] < bad.metrics["gate/canary_parent"]
    assert not bad.passed and bad.reason.startswith("canary accuracy dropped")
    assert good.passed, good.reason
    assert good.metrics["gate/canary_candidate"] == good.metrics["gate/canary_parent"]
