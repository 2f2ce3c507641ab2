"""One step's gradients (learner/steps.py) on the tiny model: micro-batching, and a fresh
LoRA scoring exactly like the reference."""

import math
from dataclasses import replace

import pytest
import torch

from learner import steps
from learner.logprobs import build_batch, sequence_logps
from tests.learner.harness import group, pair


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_backward_micro_batches_same_gradient_as_whole_batch(make_learner, algorithm):
    learner = make_learner(algorithm=algorithm, batch_size=3)
    if algorithm == "dpo":
        records = [pair(i).model_copy(update={"chosen": "x " * (i + 1)}) for i in range(3)]
    else:  # groups of different sizes and lengths: the token weighting must hold
        records = [group(1, "base"), group(22, "base"), group(3, "base")]
        records[2] = records[2].model_copy(
            update={"completions": ["5", "a much longer answer"], "rewards": [1.0, 0.0]}
        )
    learner.start()
    params = learner.policy.trainable_parameters()
    with torch.no_grad():  # leave LoRA's zero start, so every gradient term shows
        for p in params:
            p.add_(0.01 * torch.randn_like(p))

    def grads(micro):
        for p in params:
            p.grad = None
        args = replace(learner.args, micro_batch_size=micro)
        metrics = steps.backward(learner.policy, records, args)
        return [p.grad.clone() for p in params], metrics

    whole, m_whole = grads(None)
    split, m_split = grads(1)

    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    loss_key = f"loss/{algorithm}"
    assert m_split[loss_key] == pytest.approx(m_whole[loss_key], rel=1e-5)
    assert m_split["reward/mean"] == m_whole["reward/mean"]


def test_dpo_step_fresh_lora_equals_reference_loss_log_two(make_learner):
    # LoRA's B starts at zero: the policy is the reference, so every implicit reward is 0
    learner = make_learner()
    pairs = [pair(i) for i in range(2)]

    loss, metrics, n = steps.dpo_step(
        learner.policy, pairs, max_len=256, beta=0.1, loss_type="sigmoid"
    )

    assert n == 2.0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    assert metrics["rewards/margin"] == 0.0


def test_grpo_step_base_groups_fresh_lora_ratio_one_and_token_count(make_learner):
    learner = make_learner(algorithm="grpo")
    groups = [group(1, "base"), group(2, "base")]

    loss, metrics, n = steps.grpo_step(
        learner.policy, groups, max_len=256, clip_eps=0.2, kl_coef=0.04
    )

    assert n > 8  # completion tokens (each answer, plus its eos), not completions
    assert metrics["policy/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert loss.requires_grad


def test_dpo_step_trains_no_eos_after_a_side_cut_at_max_tokens(make_learner):
    # as in GRPO: a side the engine cut off is scored without the eos it never sampled
    learner = make_learner()
    learner.start()
    with torch.no_grad():  # leave LoRA's zero start, so the implicit rewards are not 0
        for p in learner.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ended = pair(1)
    cut = ended.model_copy(update={"chosen_finished": False})

    def rewards(p):
        m = steps.dpo_step(learner.policy, [p], max_len=256, beta=0.1, loss_type="sigmoid")[1]
        return m["rewards/chosen"], m["rewards/rejected"]

    (c_ended, r_ended), (c_cut, r_cut) = rewards(ended), rewards(cut)
    assert abs(c_cut - c_ended) > 1e-6  # the chosen side lost its eos term
    assert r_cut == pytest.approx(r_ended, abs=1e-7)  # the rejected side still ends


def test_grpo_step_trains_no_eos_after_an_answer_cut_at_max_tokens(make_learner):
    # an answer the engine cut off did not end there: an eos after it would train the model
    # to stop (or, with a negative advantage, not to stop) where it did neither
    learner = make_learner(algorithm="grpo")
    ended = group(1, "base").model_copy(update={"completion_finished": [True] * 4})
    cut = ended.model_copy(update={"completion_finished": [True, False, True, False]})
    unknown = group(1, "base")  # written before finish reasons were kept: all taken as ended

    counts = [
        steps.grpo_step(learner.policy, [g], max_len=256, clip_eps=0.2, kl_coef=0.04)[2]
        for g in (ended, cut, unknown)
    ]

    assert counts[1] == counts[0] - 2  # two cut answers: two eos tokens fewer
    assert counts[2] == counts[0]


def test_grpo_step_overlong_penalty_teaches_a_cut_right_answer_less(make_learner):
    # answers 0 and 2 are right; the engine cut answer 2 at max_tokens. With the penalty
    # one step makes it less likely than the same step without: it is rewarded, but less
    learner = make_learner(algorithm="grpo")
    learner.start()
    g = group(1, "base").model_copy(update={"completion_finished": [True, True, False, True]})
    params = learner.policy.trainable_parameters()
    start = [p.detach().clone() for p in params]
    batch = build_batch(learner.policy.tokenizer, [g.messages], [g.completions[2]], 256, False)

    def cut_answer_logp_after_a_step(penalty: float) -> float:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
                p.grad = None
        loss, _, _ = steps.grpo_step(
            learner.policy, [g], max_len=256, clip_eps=0.2, kl_coef=0.0, overlong_penalty=penalty
        )
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.add_(-0.05 * p.grad)
            return sequence_logps(learner.policy.model, batch).item()

    plain, penalised = cut_answer_logp_after_a_step(0.0), cut_answer_logp_after_a_step(0.5)

    assert penalised < plain - 1e-3


def test_grpo_step_decoupled_keeps_the_first_steps_weights_as_proximal(make_learner):
    # grpo_iterations > 1: the batch's second step clips against the weights before its
    # first, as PPO does; a new batch (a new store) starts from the weights it finds
    learner = make_learner(algorithm="grpo")
    learner.start()
    groups = [group(1, "base"), group(2, "base")]
    params = learner.policy.trainable_parameters()
    proximal: dict[str, torch.Tensor] = {}

    loss, first, _ = steps.grpo_step(
        learner.policy, groups, max_len=256, clip_eps=0.2, kl_coef=0.04, proximal=proximal
    )
    loss.backward()
    with torch.no_grad():  # a large step, so the ratio to the proximal policy moves
        for p in params:
            p.add_(-5.0 * p.grad.sign() * 0.01)
    _, second, _ = steps.grpo_step(
        learner.policy, groups, max_len=256, clip_eps=0.2, kl_coef=0.04, proximal=proximal
    )
    _, fresh, _ = steps.grpo_step(
        learner.policy, groups, max_len=256, clip_eps=0.2, kl_coef=0.04, proximal={}
    )

    assert first["policy/ratio_min"] == first["policy/ratio_max"] == 1.0
    assert second["policy/ratio_max"] > 1.01 or second["policy/ratio_min"] < 0.99
    assert fresh["policy/ratio_min"] == fresh["policy/ratio_max"] == 1.0
    # base groups on a fresh LoRA: the behaviour policy is the proximal one, weight 1
    assert first["policy/behaviour_weight_mean"] == pytest.approx(1.0, abs=1e-5)
