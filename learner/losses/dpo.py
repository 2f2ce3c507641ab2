"""Direct Preference Optimization loss (Rafailov et al. 2023), with the IPO variant."""

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """DPO loss over a batch of preference pairs, averaged over the batch.

    With h = (pc - pr) - (rc - rr), the policy's log-ratio margin minus the reference's:

        sigmoid:  L = -log sigmoid(beta * h)         DPO, Rafailov et al. 2023, Eq. 7
        ipo:      L = (h - 1 / (2 * beta)) ** 2      IPO, Azar et al. 2023, Eq. 17 (tau = beta)

    What the inputs must be: for "sigmoid", the log-probability of the whole completion,
    i.e. per-token log-probs SUMMED over the completion tokens (`sequence_logps`). For
    "ipo", the per-token log-probs AVERAGED over the completion tokens (sum / number of
    completion tokens), as TRL does: IPO regresses h onto a fixed target 1/(2*beta), which
    only makes sense on a length-independent scale. This function does not normalise.

    Args:
        policy_chosen_logps: log pi(y_w | x) under the policy. Shape: (B,)
        policy_rejected_logps: log pi(y_l | x) under the policy. Shape: (B,)
        ref_chosen_logps: log pi_ref(y_w | x), no grad needed. Shape: (B,)
        ref_rejected_logps: log pi_ref(y_l | x), no grad needed. Shape: (B,)
        beta: strength of the implicit KL penalty (DPO beta; IPO tau).
        loss_type: "sigmoid" (DPO) or "ipo".
        weights: each pair's loss is multiplied by its weight before the mean (user
            feedback: `feedback_weight`); default 1. Shape: (B,)

    Returns:
        (loss, metrics): the scalar loss, and detached floats under `loss/dpo` (whatever
        the loss_type), `rewards/chosen` = mean beta * (pc - rc), `rewards/rejected` =
        mean beta * (pr - rr), `rewards/margin` = their difference, and `rewards/accuracy`
        = fraction of pairs whose chosen reward is strictly above the rejected one.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # (B,)
    logits = pi_logratios - ref_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)  # (B,)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2  # (B,)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    if weights is not None:
        losses = losses * weights  # (B,)
    loss = losses.mean()

    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
        metrics = {
            "loss/dpo": loss.item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        }
    return loss, metrics
