"""A group or pair with user feedback weighs `feedback_weight` in the loss: its gradient is
that many times a plain record's."""

import pytest
import torch

from learner import steps
from learner.losses import dpo_loss, group_advantages, grpo_loss
from strop.records import PreferencePair, ScoredGroup
from tests.learner.harness import group, pair


def _dpo_grads(weights: list[float]) -> torch.Tensor:
    pc = torch.tensor([-5.0, -6.0], requires_grad=True)
    pr = torch.tensor([-5.5, -5.0])
    rc, rr = torch.tensor([-5.2, -6.1]), torch.tensor([-5.4, -5.2])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, weights=torch.tensor(weights))
    loss.backward()
    return pc.grad


def test_dpo_pair_of_weight_2_pulls_twice_as_hard_as_weight_1():
    plain, weighted = _dpo_grads([1.0, 1.0]), _dpo_grads([2.0, 1.0])
    assert torch.allclose(weighted[0], 2 * plain[0]) and torch.allclose(weighted[1], plain[1])


def _grpo_grads(weights: list[float]) -> torch.Tensor:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two groups of two
    logps = torch.full((4, 3), -1.0, requires_grad=True)
    behaviour, ref = torch.full((4, 3), -1.1), torch.full((4, 3), -1.2)
    mask = torch.ones(4, 3)
    w = torch.tensor(weights).repeat_interleave(2)  # one weight per group, per completion
    loss, _ = grpo_loss(logps, behaviour, ref, group_advantages(rewards), mask, weights=w)
    loss.backward()
    return logps.grad


def test_grpo_group_of_weight_2_pulls_twice_as_hard_as_weight_1():
    plain, weighted = _grpo_grads([1.0, 1.0]), _grpo_grads([2.0, 1.0])
    assert torch.allclose(weighted[:2], 2 * plain[:2]) and torch.allclose(weighted[2:], plain[2:])
    assert plain.abs().sum() > 0


def test_records_without_weight_parse_as_weight_1():
    group = ScoredGroup(
        group_id="g",
        log_id="1-0",
        messages=[],
        completions=["a"],
        rewards=[1.0],
        version="base",
        method="ttrl",
    )
    raw = group.model_dump(exclude={"weight", "feedback"})  # an older worker's record
    assert ScoredGroup.model_validate(raw).weight == 1.0
    pair = PreferencePair(
        group_id="g",
        messages=[],
        chosen="a",
        rejected="b",
        chosen_reward=1.0,
        rejected_reward=0.0,
        version="base",
        method="ttrl",
    )
    assert PreferencePair.model_validate(pair.model_dump(exclude={"weight"})).weight == 1.0


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_backward_record_with_feedback_weight_doubles_its_gradient(make_learner, algorithm):
    """Through the learner's step on the tiny model: the record's own `weight` counts."""
    learner = make_learner(algorithm=algorithm, batch_size=1)
    record = pair(0) if algorithm == "dpo" else group(1, "base")
    learner.start()
    params = learner.policy.trainable_parameters()
    with torch.no_grad():  # leave LoRA's zero start, so every gradient term shows
        for p in params:
            p.add_(0.01 * torch.randn_like(p))

    def grads(weight: float) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        steps.backward(learner.policy, [record.model_copy(update={"weight": weight})], learner.args)
        return [p.grad.clone() for p in params]

    plain, weighted = grads(1.0), grads(2.0)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, weighted, strict=True):
        torch.testing.assert_close(2 * a, b, rtol=1e-4, atol=1e-7)
