"""The promotion gate on the tiny model: finite weights, KL to the parent, self-reward.

The answers and judgments come from a real service (internal requests, the candidate
pinned while only registered); the KL is computed here, on the learner's own weights."""

import math
import threading
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from learner.gate import (
    BUILTIN_PROMPTS,
    agrees,
    judge_scores,
    labelled_prompts,
    probe_prompts,
    run_gate,
    trained_prompts,
    verdict,
    vote_labels,
    vote_verdict,
)
from learner.policy import Policy
from learner.serving import connect_service
from strop.adapters import AdapterStore
from strop.labeled import LabeledQuestion
from strop.model import load_model
from strop.records import AdapterVersion, Keys, PromptLogRecord, SamplingRecord
from strop.registry import Registry
from tests.conftest import MODEL_CACHE
from tests.learner.harness import group, pair, service_settings
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
    # no canary: the label-free vote check ran, but the tiny model's gibberish has no
    # majority answer anywhere, so it passed for want of evidence, and says so
    assert result.metrics["gate/vote_prompts"] == 0.0
    assert result.metrics["gate/vote_skipped"] == 1.0
    assert result.record()["notes"] == ["vote check skipped: too few voted prompts (0 < 3)"]


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


class JudgeStub:
    """Stands in for a service whose model can follow the judge rubric: the tiny random
    models (and SmolLM2-135M, bench/results) never write a parseable `Score: N`. Replies
    `reply(answer)` and records what it was asked."""

    def __init__(self, reply):
        self.reply, self.asked, self.lock = reply, [], threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, max_tokens, temperature, n):
        text = messages[0]["content"].split("<response>\n")[1].split("\n</response>")[0]
        with self.lock:
            self.asked.append(text)
        message = SimpleNamespace(content=self.reply(text))
        return SimpleNamespace(
            choices=[SimpleNamespace(index=0, message=message, finish_reason="stop")]
        )


def test_judge_scores_a_judge_that_cannot_score_is_asked_only_the_scouts():
    answers = [f"answer {i}" for i in range(16)]
    mute = JudgeStub(lambda answer: "This response is relevant and helpful.")

    scores = judge_scores(mute, "v1", ["q"] * 16, answers, max_tokens=8, scouts=2)

    assert scores == [None] * 16
    assert sorted(mute.asked) == ["answer 0", "answer 1"]


def test_judge_scores_a_judge_that_scores_is_asked_every_answer_in_order():
    answers = [f"answer {i}" for i in range(16)]
    # parses on the second scout only: one parseable judgment is enough to ask the rest
    judge = JudgeStub(
        lambda answer: (
            f"Fine. Score: {int(answer.split()[1]) % 6}" if answer != "answer 0" else "no score"
        )
    )

    scores = judge_scores(judge, "v1", ["q"] * 16, answers, max_tokens=8, scouts=2)

    assert scores == [None] + [float(i % 6) for i in range(1, 16)]
    assert sorted(judge.asked) == sorted(answers)


def test_gate_verdict_reward_drop_beyond_tolerance_fails():
    assert verdict(0.01, 3.0, 3.5, kl_limit=0.1, reward_tolerance=0.6) is None
    reason = verdict(0.01, 2.0, 3.5, kl_limit=0.1, reward_tolerance=0.6)
    assert reason.startswith("self-reward dropped 1.500 (3.500 -> 2.000)")
    # unjudged (no parseable score on one side): no evidence of a drop
    assert verdict(0.01, None, 3.5, kl_limit=0.1, reward_tolerance=0.6) is None
    assert verdict(float("nan"), 3.0, 3.0, kl_limit=0.1, reward_tolerance=0.6) is not None


def test_vote_verdict_drop_beyond_tolerance_in_prompts_fails():
    # 5 prompts with a label; the parent's greedy answers match 4 of them
    assert vote_verdict(5, 4, 3, tolerance=1, min_prompts=3) == (None, None)
    reason, skipped = vote_verdict(5, 4, 2, tolerance=1, min_prompts=3, parent="v3")
    assert skipped is None
    assert reason == (
        "vote agreement dropped by 2 prompts: 2/5 of the candidate's greedy answers match "
        "v3's majority vote, 4/5 of v3's own (tolerance 1)"
    )
    # a candidate that matches more often than its parent is never refused
    assert vote_verdict(5, 1, 5, tolerance=0, min_prompts=3) == (None, None)


def test_vote_verdict_too_few_voted_prompts_passes_with_note():
    # even a candidate that matches nothing: two labels are not evidence enough
    assert vote_verdict(2, 2, 0, tolerance=1, min_prompts=3) == (
        None,
        "vote check skipped: too few voted prompts (2 < 3)",
    )


def test_vote_labels_tie_weak_or_chatty_votes_have_no_label():
    q = "What is 2 + 3?"
    labels = vote_labels(
        [q, q, q, q, "Write a haiku about the sea."],
        [
            ["2 + 3 = 5", "2 + 3 = 5.", "So 2 + 3 = 6", "The answer is 5."],  # 5 wins
            ["2 + 3 = 5", "3 - 2 = 1", "2 + 3 = 5", "3 - 2 = 1"],  # tie
            ["2 + 3 = 5", "2 + 3 = 6", "2 + 3 = 5", "2 + 3 = 6"],  # false working: no votes
            ["2 + 3 = 5", "hmm"],  # a "majority" of one sample
            ["Waves roll in 3 lines", "Sea of 5 winds", "Blue 7", "Salt 3"],  # not a vote
        ],
    )
    assert labels == ["5", None, "5", None, None]
    # a greedy answer agrees when it says the label, as the vote reads it
    greedy = ["2 + 3 = 5. Then add 4 more.", "2 + 3 = 5", "The answer is 6.", "Waves"]
    assert agrees([q, q, q, q], ["5", None, "5", "5"], greedy) == [True, False, False]


def test_probe_prompts_candidates_trained_prompts_held_back(redis_client, redis_prefix):
    keys = Keys(redis_prefix)
    for text in ["What is 1 + 1?", "Question number 1?", "What is 2 + 2?", "fresh"]:
        record = PromptLogRecord(
            request_id=text,
            messages=[{"role": "user", "content": text}],
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
    # the candidate consumed one pair and one group (and a record trimmed since)
    consumed = {
        keys.pairs: [redis_client.xadd(keys.pairs, pair(1).to_stream())],
        keys.groups: [redis_client.xadd(keys.groups, group(1, "base").to_stream()), "1-0"],
    }
    redis_client.xadd(keys.groups, group(2, "base").to_stream())  # not consumed by it

    trained = trained_prompts(redis_client, consumed)

    assert trained == {"Question number 1?", "What is 1 + 1?"}
    assert probe_prompts(redis_client, keys, 8, exclude=trained) == ["fresh", "What is 2 + 2?"]


def test_decide_without_canary_vote_figures_reach_the_registry(make_learner):
    learner = make_learner()
    learner.start()
    meta = AdapterVersion(version="v1", parent="base", path="", algorithm="dpo")
    learner.store.write(meta, learner.policy.save)
    learner.registry.add(meta)

    learner.lifecycle.decide(meta, candidate="default")

    gate = learner.registry.get("v1").gate
    assert gate["gate/vote_prompts"] == 0.0 and gate["gate/vote_skipped"] == 1.0
    assert gate["notes"] == ["vote check skipped: too few voted prompts (0 < 3)"]
    assert learner.registry.get("v1").status == "promoted"


def test_labelled_prompts_newest_labelled_groups_the_candidate_did_not_train_on(
    redis_client, redis_prefix
):
    keys = Keys(redis_prefix)

    def built(i: int, label: str | None, method: str = "ttrl") -> str:
        g = group(i, "base").model_copy(update={"majority_label": label, "method": method})
        return redis_client.xadd(keys.groups, g.to_stream())

    assert labelled_prompts(redis_client, keys, 8) == []
    built(1, "2")
    built(2, "4")
    built(3, None, "gold")  # gold rewards: no vote label to probe with
    built(4, "8")
    built(2, "4")  # the same prompt built again

    assert labelled_prompts(redis_client, keys, 8, exclude={"What is 4 + 4?"}) == [
        ("What is 2 + 2?", "4"),
        ("What is 1 + 1?", "2"),
    ]
    assert labelled_prompts(redis_client, keys, 2) == [
        ("What is 2 + 2?", "4"),
        ("What is 4 + 4?", "8"),
    ]


def test_decide_without_canary_votes_on_the_labels_of_groups_not_trained_on(make_learner):
    learner = make_learner(gate_probe_size=8)
    learner.start()
    ids = [
        learner.r.xadd(
            learner.keys.groups,
            group(i, "base").model_copy(update={"majority_label": str(2 * i)}).to_stream(),
        )
        for i in range(1, 5)
    ]
    meta = AdapterVersion(
        version="v1",
        parent="base",
        path="",
        algorithm="dpo",
        consumed={learner.keys.groups: ids[:1]},  # it trained on "What is 1 + 1?"
    )
    learner.store.write(meta, learner.policy.save)
    learner.registry.add(meta)

    learner.lifecycle.decide(meta, candidate="default")

    gate = learner.registry.get("v1").gate
    # three labelled prompts left: the check ran (the tiny model's gibberish matches none
    # of the labels, on either side, so it passes)
    assert gate["gate/probe_prompts"] == 3.0
    assert gate["gate/vote_prompts"] == 3.0 and gate["gate/vote_from_groups"] == 1.0
    assert gate["gate/vote_skipped"] == 0.0 and "notes" not in gate
    assert learner.registry.get("v1").status == "promoted"


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


def _damaged_v1_and_fresh_v2(default_model_dir, redis_client, redis_prefix, tmp_path):
    """A policy on the default model with two registered versions of base: v1 damaged,
    v2 a fresh LoRA; returns (policy, the service's settings, v2's path)."""
    model, tokenizer = load_model(str(default_model_dir), MODEL_CACHE, "cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    policy = Policy(model, tokenizer, AdapterStore(tmp_path / "adapters"), lora)
    registry = Registry(redis_client, Keys(redis_prefix))
    # v1: large random LoRA weights, the model's answers turn to noise
    damaged = AdapterVersion(version="v1", parent="base", path="")
    policy.store.write(damaged, lambda tmp: make_adapter(tmp, default_model_dir, seed=1, scale=8.0))
    registry.add(damaged)
    # v2: a fresh LoRA (B = 0), the base model's answers exactly
    path2 = _register_candidate(policy, redis_client, redis_prefix, "v2", parent="base")
    return policy, service_settings(default_model_dir, redis_prefix, tmp_path / "adapters"), path2


@pytest.mark.slow
def test_gate_damaged_adapter_fails_canary_undamaged_passes(
    default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path
):
    policy, settings, path2 = _damaged_v1_and_fresh_v2(
        default_model_dir, redis_client, redis_prefix, tmp_path
    )

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


# --- the label-free vote check, on the real default model -------------------------------------

# Eight questions, as many as the default probe: six whose samples SmolLM2-135M agrees on
# and whose greedy answer says the same (its vote and greedy answer matched on each, in two
# draws of 16 votes), and two it is unsure of. No canary is configured.
SUMS = ((1, 1), (1, 2), (1, 4), (2, 3), (4, 2), (1, 8), (3, 6), (4, 5))
VOTE_PROMPTS = [f"What is {a} + {b}?" for a, b in SUMS]
VOTE_GATE = dict(kl_limit=1e9, reward_tolerance=10.0, max_tokens=32, judge_tokens=4)


def _gate_damaged_and_undamaged(
    default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path, gate: dict
):
    """The gate's results, on VOTE_PROMPTS, for the damaged v1 and the undamaged v2."""
    policy, settings, path2 = _damaged_v1_and_fresh_v2(
        default_model_dir, redis_client, redis_prefix, tmp_path
    )
    with ServerThread(settings.model_copy(update={"max_context": None}), smol_engine) as server:
        client = connect_service(server.url, None, timeout_s=900)
        bad = run_gate(
            policy, client, "v1", "v1", "base", policy.store.path("v1"), VOTE_PROMPTS, **gate
        )
        good = run_gate(policy, client, "default", "v2", "base", path2, VOTE_PROMPTS, **gate)
    return bad, good


@pytest.mark.slow
def test_gate_no_canary_damaged_adapter_refused_on_vote_agreement_undamaged_passes(
    default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path
):
    # 16 samples per prompt: about 40 s a gate here, but ten times that on a busy CPU
    bad, good = _gate_damaged_and_undamaged(
        default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path, VOTE_GATE
    )
    print(f"vote agreement, base -> damaged v1: {bad.record()}")
    print(f"vote agreement, base -> undamaged v2: {good.record()}")

    # the KL and self-reward checks cannot refuse here: the vote check alone does
    assert bad.metrics["gate/vote_prompts"] >= 3, "base must reach a clear majority on some"
    assert bad.metrics["gate/vote_parent"] > 0.3
    assert bad.metrics["gate/vote_candidate"] == 0.0
    assert not bad.passed and bad.reason.startswith("vote agreement dropped by ")
    assert "of base's own (tolerance 1)" in bad.reason
    assert {"gate/vote_parent", "gate/vote_candidate"} <= bad.record().keys()
    assert good.passed, good.reason
    assert good.metrics["gate/vote_prompts"] >= 3
    assert good.metrics["gate/vote_candidate"] == good.metrics["gate/vote_parent"]


@pytest.mark.slow
def test_gate_no_canary_group_labels_refuse_damaged_adapter_without_sampling_votes(
    default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path
):
    labels = [str(a + b) for a, b in SUMS]  # what the worker's groups voted
    # votes of more answers than the service allows: asking for them would fail the gate
    max_n = service_settings(default_model_dir, redis_prefix, tmp_path / "adapters").max_n
    gate = VOTE_GATE | {"vote_n": max_n + 1, "labels": labels}
    bad, good = _gate_damaged_and_undamaged(
        default_model_dir, smol_engine, redis_client, redis_prefix, tmp_path, gate
    )
    print(f"group labels, base -> damaged v1: {bad.record()}")
    print(f"group labels, base -> undamaged v2: {good.record()}")

    assert bad.metrics["gate/vote_prompts"] == len(SUMS)  # a label on every prompt
    assert bad.metrics["gate/vote_from_groups"] == 1.0
    assert bad.metrics["gate/vote_parent"] >= 0.5
    assert bad.metrics["gate/vote_candidate"] == 0.0
    assert not bad.passed
    assert bad.reason.startswith("vote agreement dropped by ")
    assert "match the groups' vote labels" in bad.reason
    assert good.passed, good.reason
    assert good.metrics["gate/vote_candidate"] == good.metrics["gate/vote_parent"]
