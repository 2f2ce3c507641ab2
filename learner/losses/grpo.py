"""Group Relative Policy Optimization loss (Shao et al. 2024), off-policy with a clipped ratio."""

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages: A_i = (r_i - mean(r)) / (std(r) + eps) within each group.

    std is the POPULATION std (unbiased=False, divide by G): it is defined for G = 1 and
    gives a binary group unit variance. (TRL uses the unbiased std, which is larger by
    sqrt(G / (G - 1)).) A group whose rewards are all equal carries no signal and gets
    exactly zero advantages.

    Args:
        rewards: one reward per completion, a row per prompt. Shape: (B, G)

    Returns:
        advantages flattened group by group (row-major), matching the (B*G, T) rows of
        the loss. Shape: (B*G,)
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)  # (B, 1)
    advantages = (rewards - mean) / (std + eps)  # (B, G)
    # (r - mean) of equal floats may be a rounding error away from 0; make it exact.
    no_signal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    advantages = advantages.masked_fill(no_signal, 0.0)  # (B, G)
    return advantages.reshape(-1)  # (B*G,)


def length_shaped(rewards: Tensor, lengths: Tensor, weight: float) -> Tensor:
    """Rewards plus Kimi k1.5's length reward (Kimi Team 2025, Sec. 2.3.3), group by group:
    the shortest answer earns +weight/2 and the longest -weight/2, linearly between.

        lam_i = 0.5 - (len_i - min_len) / (max_len - min_len)      (0 if all lengths are equal)
        r_i  += weight * lam_i           if r_i is above its group's mean
        r_i  += weight * min(0, lam_i)   otherwise

    So a short right answer beats a long right one and a long wrong answer is pushed down,
    but a short wrong answer is never paid for being short. With weight < 1 every right
    answer of a 0/1 group still out-scores every wrong one.

    Args:
        rewards: one reward per completion, a row per prompt. Shape: (B, G)
        lengths: completion lengths in tokens. Shape: (B, G)
        weight: the length reward's weight; 0 returns `rewards` unchanged.

    Returns:
        the shaped rewards. Shape: (B, G)
    """
    if weight == 0:
        return rewards
    lengths = lengths.to(rewards.dtype)
    shortest = lengths.min(dim=1, keepdim=True).values  # (B, 1)
    spread = lengths.max(dim=1, keepdim=True).values - shortest  # (B, 1)
    lam = 0.5 - (lengths - shortest) / spread.clamp(min=1)  # (B, G)
    lam = lam.masked_fill(spread == 0, 0.0)  # (B, G)
    above = rewards > rewards.mean(dim=1, keepdim=True)  # (B, G)
    return rewards + weight * torch.where(above, lam, lam.clamp(max=0.0))  # (B, G)


def overlong_shaped(rewards: Tensor, finished: Tensor, penalty: float) -> Tensor:
    """Rewards less DAPO's overlong punishment (Yu et al. 2025, Sec. 3.4) in its plainest
    form: every completion the engine cut at max_tokens loses `penalty`.

    A group whose right answers all ran to the limit still learns which one is right, but a
    right answer that ended beats a right one that was cut, so the model learns to finish
    within the budget. With penalty < 1 every right answer of a 0/1 group still out-scores
    every wrong one.

    Args:
        rewards: one reward per completion, a row per prompt. Shape: (B, G)
        finished: True where the model ended the completion itself. Shape: (B, G)
        penalty: what a cut completion loses; 0 returns `rewards` unchanged.

    Returns:
        the shaped rewards. Shape: (B, G)
    """
    if penalty == 0:
        return rewards
    return rewards - penalty * (~finished).to(rewards.dtype)  # (B, G)


def grpo_loss(
    logps: Tensor,
    behaviour_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    weights: Tensor | None = None,
    proximal_logps: Tensor | None = None,
    max_behaviour_weight: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO loss with a k3 KL penalty, averaged over all completion tokens of the batch.

    Per token t of completion i (GRPO: Shao et al. 2024, Eq. 3 and the KL of Eq. 4; the
    clip is PPO's, Schulman et al. 2017, Eq. 7):

        r_it  = exp(logp_it - behaviour_logp_it)
        pg_it = -min(r_it * A_i, clip(r_it, 1 - eps, 1 + eps) * A_i)
        kl_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1       (k3 estimator, Schulman 2020)
        L     = sum_{i,t} w_i * mask_it * (pg_it + kl_coef * kl_it) / sum_{i,t} mask_it

    The ratio is taken against the behaviour policy that sampled the group (the served
    adapter version), not against a detached copy of the current policy, so stale groups
    are corrected and clipped. Given `proximal_logps`, the loss is decoupled instead
    (AReaL, Fu et al. 2025, Eq. 5): the ratio r_it = exp(logp_it - proximal_it) is clipped
    against the proximal policy (the weights before this batch's first step), and the
    sampler's lag is corrected by a per-token weight exp(proximal_it - behaviour_it),
    detached and capped at `max_behaviour_weight` (IMPALA's truncation). Then the trust
    region is one batch wide, as on-policy GRPO's, not the distance to a served version
    that is only replaced every few minutes.

    Normalisation is token-level (as DAPO, Yu et al. 2025): every unmasked token in the
    batch weighs the same, whatever its completion's length (the GRPO paper instead
    averages per completion, then over completions).
    Masked positions must hold finite values (`token_logps` puts zeros there).

    Args:
        logps: per-token log-probs under the policy being trained. Shape: (B*G, T)
        behaviour_logps: the same under the policy that sampled the group. Shape: (B*G, T)
        ref_logps: the same under the reference (adapter disabled). Shape: (B*G, T)
        advantages: one advantage per completion (`group_advantages`). Shape: (B*G,)
        mask: 1 on completion tokens, 0 on prompt and padding; needs >= 1 token. Shape: (B*G, T)
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        kl_coef: weight of the KL-to-reference penalty (beta in the paper).
        weights: w_i, the weight of completion i's group (user feedback: `feedback_weight`);
            default 1. The denominator stays the token count. Shape: (B*G,)
        proximal_logps: the same under the weights before this batch's first step; None:
            clip against the behaviour policy. Shape: (B*G, T)
        max_behaviour_weight: cap of the decoupled loss's behaviour weight.

    Returns:
        (loss, metrics): the scalar loss, and detached floats under `loss/grpo`,
        `policy/clip_fraction` (share of tokens where the clipped branch is the active
        one, so the token gives no policy gradient), `policy/kl` (mean k3), `policy/ratio_mean`,
        `policy/ratio_max`, `policy/ratio_min` (over unmasked tokens) and `advantage/mean`.
    """
    mask = mask.to(logps.dtype)  # (B*G, T)
    adv = advantages.unsqueeze(1)  # (B*G, 1)
    if proximal_logps is None:
        ratio = torch.exp(logps - behaviour_logps)  # (B*G, T)
        behaviour_weight = torch.ones_like(ratio)  # (B*G, T)
    else:
        ratio = torch.exp(logps - proximal_logps)  # (B*G, T)
        behaviour_weight = torch.exp(proximal_logps - behaviour_logps).clamp(
            max=max_behaviour_weight
        )  # (B*G, T), no gradient: both are fixed
    pg_loss1 = -adv * ratio  # (B*G, T)
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)  # (B*G, T)
    pg_loss = behaviour_weight * torch.max(pg_loss1, pg_loss2)  # (B*G, T) = -w min(r A, clip(r) A)
    log_ref_ratio = ref_logps - logps  # (B*G, T)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B*G, T)
    per_token = pg_loss + kl_coef * kl  # (B*G, T)
    if weights is not None:
        per_token = per_token * weights.unsqueeze(1)  # (B*G, T)
    n_tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / n_tokens

    with torch.no_grad():
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
        tokens = mask.bool()  # (B*G, T)
        metrics = {
            "loss/grpo": loss.item(),
            "policy/clip_fraction": (clipped.float() * mask).sum().item() / n_tokens.item(),
            "policy/kl": ((kl * mask).sum() / n_tokens).item(),
            "policy/ratio_mean": ratio[tokens].mean().item(),
            "policy/ratio_max": ratio[tokens].max().item(),
            "policy/ratio_min": ratio[tokens].min().item(),
            "policy/behaviour_weight_mean": behaviour_weight[tokens].mean().item(),
            "advantage/mean": advantages.mean().item(),
        }
    return loss, metrics
