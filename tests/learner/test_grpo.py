import math

import pytest
import torch

from learner.logprobs import build_batch, reference_logps, sequence_logps, token_logps
from learner.losses.grpo import group_advantages, grpo_loss, length_shaped, overlong_shaped

# Two completions of three tokens; A = +1 for the first, -1 for the second; the second's
# last token is padding (masked), filled with values that would change every metric.
LOGPS = [[-1.0, -0.5, -2.0], [-1.0, -2.0, 0.0]]
BEHAVIOUR = [[-1.0, -1.0, -1.9], [-1.5, -1.0, -3.0]]
REF = [[-1.2, -0.5, -1.8], [-1.0, -2.3, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _k3(ref: float, logp: float) -> float:
    return math.exp(ref - logp) - (ref - logp) - 1


def test_grpo_loss_matches_hand_computation():
    loss, metrics = grpo_loss(
        torch.tensor(LOGPS),
        torch.tensor(BEHAVIOUR),
        torch.tensor(REF),
        torch.tensor([1.0, -1.0]),
        torch.tensor(MASK),
        clip_eps=0.2,
        kl_coef=0.1,
    )

    # ratios r = exp(logp - behaviour)
    r00, r01, r02 = 1.0, math.exp(0.5), math.exp(-0.1)
    r10, r11 = math.exp(0.5), math.exp(-1.0)
    # surrogate -min(r A, clip(r, 0.8, 1.2) A)
    pg = [
        -r00,  # A=+1, r=1: inside the clip range
        -1.2,  # A=+1, r=1.65 > 1.2: clipped branch active
        -r02,  # A=+1, r=0.90: inside
        r10,  # A=-1, r=1.65: -min(-1.65, -1.2) = 1.65, unclipped branch (no clip on this side)
        0.8,  # A=-1, r=0.37 < 0.8: -min(-0.37, -0.8) = 0.8, clipped branch active
    ]
    kl = [_k3(-1.2, -1.0), _k3(-0.5, -0.5), _k3(-1.8, -2.0), _k3(-1.0, -1.0), _k3(-2.3, -2.0)]
    expected = sum(p + 0.1 * k for p, k in zip(pg, kl, strict=True)) / 5  # 5 unmasked tokens
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss/grpo"] == pytest.approx(expected, rel=1e-6)
    assert metrics["policy/clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["policy/kl"] == pytest.approx(sum(kl) / 5, rel=1e-5)
    assert metrics["policy/ratio_mean"] == pytest.approx(
        (r00 + r01 + r02 + r10 + r11) / 5, rel=1e-6
    )
    assert metrics["policy/ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-6)
    assert metrics["policy/ratio_min"] == pytest.approx(math.exp(-1.0), rel=1e-6)
    assert metrics["advantage/mean"] == pytest.approx(0.0)


def _grad_on_table(decoupled: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """grpo_loss on the table above without the KL, after backward: (d loss / d logps,
    metrics); `decoupled`: the proximal policy is the current one (logps themselves)."""
    logps = torch.tensor(LOGPS, requires_grad=True)
    loss, metrics = grpo_loss(
        logps,
        torch.tensor(BEHAVIOUR),
        torch.tensor(REF),
        torch.tensor([1.0, -1.0]),
        torch.tensor(MASK),
        kl_coef=0.0,
        proximal_logps=logps.detach() if decoupled else None,
        max_behaviour_weight=2.0,
    )
    loss.backward()
    return logps.grad, metrics


def test_grpo_loss_clipped_token_gets_no_policy_gradient():
    grad, _ = _grad_on_table()

    assert grad[0, 1].item() == 0.0  # clipped above, A > 0
    assert grad[1, 1].item() == 0.0  # clipped below, A < 0
    assert grad[1, 2].item() == 0.0  # masked
    assert grad[0, 0].item() == pytest.approx(-1 / 5)  # d(-r A)/dlogp = -r A, r = 1
    assert grad[1, 0].item() == pytest.approx(math.exp(0.5) / 5, rel=1e-6)


def test_grpo_loss_decoupled_clips_against_proximal_and_weights_by_behaviour_lag():
    # proximal = the weights before the step (logps themselves): no token is clipped, even
    # those whose ratio to the stale behaviour policy is far outside 1 +- 0.2; each token's
    # gradient is -A * exp(proximal - behaviour), capped at 2
    grad, metrics = _grad_on_table(decoupled=True)

    w = [[1.0, math.exp(0.5), math.exp(-0.1)], [math.exp(0.5), math.exp(-1.0), 0.0]]
    assert metrics["policy/clip_fraction"] == 0.0
    assert metrics["policy/ratio_max"] == metrics["policy/ratio_min"] == 1.0
    assert grad[0].tolist() == pytest.approx([-w[0][j] / 5 for j in range(3)], rel=1e-6)
    assert grad[1, :2].tolist() == pytest.approx([w[1][0] / 5, w[1][1] / 5], rel=1e-6)
    assert grad[1, 2].item() == 0.0  # masked
    assert metrics["policy/behaviour_weight_mean"] == pytest.approx(
        (w[0][0] + w[0][1] + w[0][2] + w[1][0] + w[1][1]) / 5, rel=1e-6
    )
    # a token the proximal policy likes 3 times more than the sampler weighs 2, not 3
    capped, _ = grpo_loss(
        torch.tensor([[0.0]], requires_grad=True),
        torch.tensor([[-math.log(3.0)]]),
        torch.tensor([[0.0]]),
        torch.tensor([1.0]),
        torch.tensor([[1]]),
        kl_coef=0.0,
        proximal_logps=torch.tensor([[0.0]]),
    )
    assert capped.item() == pytest.approx(-2.0)


def test_group_advantages_matches_hand_computation_and_equal_group_is_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]])

    advantages = group_advantages(rewards, eps=1e-4)

    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)  # mean 0.25; population std: divide by G = 4
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4
    assert advantages.shape == (8,)
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert (advantages[4:] == 0).all()  # exactly zero, not a rounding error


def test_group_advantages_single_completion_group_is_zero_not_nan():
    assert group_advantages(torch.tensor([[0.7], [0.1]])).tolist() == [0.0, 0.0]


def test_length_reward_ranks_short_right_answers_first_and_never_pays_a_wrong_one():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    lengths = torch.tensor([[10, 50, 10, 50], [20, 20, 20, 20]])

    shaped = length_shaped(rewards, lengths, weight=0.5)

    # shortest right +0.25, longest right -0.25; the short wrong one gains nothing
    assert shaped[0].tolist() == pytest.approx([1.25, 0.75, 0.0, -0.25])
    assert shaped[1].tolist() == [1.0] * 4  # equal lengths: unchanged, still no signal
    assert min(shaped[0, :2]) > max(shaped[0, 2:])  # every right answer above every wrong
    assert length_shaped(rewards, lengths, weight=0.0) is rewards


def test_overlong_penalty_ranks_a_right_answer_that_ended_above_one_that_was_cut():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    finished = torch.tensor([[True, False, True, False]])

    shaped = overlong_shaped(rewards, finished, penalty=0.5)

    assert shaped.tolist() == [[1.0, 0.5, 0.0, -0.5]]
    advantages = group_advantages(shaped)
    assert advantages[0] > advantages[1] > 0 > advantages[2] > advantages[3]
    assert overlong_shaped(rewards, finished, penalty=0.0) is rewards


PROMPT = [{"role": "user", "content": "Is the sky blue? Answer briefly."}]
COMPLETIONS = ["Yes, the sky is blue.", "No.", "Purple elephants dance quietly.", "Yes."]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def test_grpo_loss_tiny_model_training_shifts_probability_to_rewarded(lora_model, tokenizer):
    batch = build_batch(tokenizer, [PROMPT] * 4, COMPLETIONS, max_len=128)
    advantages = group_advantages(torch.tensor([REWARDS]))  # (B*G,) = (4,)
    with torch.no_grad():
        behaviour = token_logps(lora_model, batch)  # (B*G, T): the served version = the start
    ref = reference_logps(lora_model, batch)  # (B*G, T)
    before = behaviour.sum(1)  # (B*G,)

    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)
    lora_model.train()
    for _ in range(15):
        loss, metrics = grpo_loss(
            token_logps(lora_model, batch), behaviour, ref, advantages, batch["completion_mask"]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora_model.eval()
    with torch.no_grad():
        after = sequence_logps(lora_model, batch)  # (B*G,)

    shift = (after - before).tolist()
    print(f"GRPO sum logp before {before.tolist()} after {after.tolist()}; last {metrics}")
    assert shift[0] > 0.1 and shift[3] > 0.1  # rewarded completions became more likely
    assert shift[1] < -0.1 and shift[2] < -0.1  # unrewarded ones less likely
