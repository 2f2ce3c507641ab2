"""One optimizer step's gradients, for DPO or GRPO: the learner's algorithm (CleanRL's file).

Plain functions of the policy, the records and the hyperparameters. The losses themselves
are pure functions of log-probabilities in learner/losses/; this module builds the
batches, runs the forward passes and accumulates the gradients.

GRPO's behaviour policy. The ratio needs log p_behaviour of the sampled tokens. The
service does return raw (temperature 1) log-probs, but over the API they arrive per
token *string*, and re-tokenising the text need not give the same tokens; and a serving
engine (vLLM, bf16 kernels, a KV cache) computes them with other numerics than this
forward pass, so even on-policy data would show ratios != 1. So the learner recomputes
them: it loads the group's version (`vN` from the adapter store, `base` = adapter
disabled) as a frozen adapter and scores the completions under it. It uses the sampled
token ids when the worker logged them (`completion_token_ids`), else the text. Groups
older than `max_staleness` versions, or whose version is no longer on disk, never get
here: the loop drops them (and counts them), as it does records whose prompt does not fit
`max_len`.
"""

from collections import defaultdict
from functools import partial

import torch

from learner.args import Args
from learner.logprobs import build_batch, reference_logps, token_logps
from learner.losses import dpo_loss, group_advantages, grpo_loss, length_shaped, overlong_shaped
from learner.policy import Policy
from strop.records import PreferencePair, ScoredGroup
from strop.versions import BASE, version_number


def dpo_step(
    policy: Policy, pairs: list[PreferencePair], *, max_len: int, beta: float, loss_type: str
) -> tuple[torch.Tensor, dict[str, float], float]:
    """DPO loss of some pairs against the base model (adapter disabled): (loss, metrics,
    pairs it is a mean over)."""
    model = policy.model
    # chosen and rejected in one forward pass: rows [0, B) chosen, [B, 2B) rejected
    batch = build_batch(
        policy.tokenizer,
        [p.messages for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        max_len,
        # eos only after a side the model ended, not one cut at max_tokens (as in GRPO)
        append_eos=[p.chosen_finished for p in pairs] + [p.rejected_finished for p in pairs],
    )
    ref = reference_logps(model, batch)  # (2B, T), adapter disabled, no grad
    logps = token_logps(model, batch)  # (2B, T)
    if loss_type == "ipo":  # IPO wants length-normalised log-probs (see dpo_loss)
        n = batch["completion_mask"].sum(1).clamp(min=1)  # (2B,)
        seq, ref_seq = logps.sum(1) / n, ref.sum(1) / n  # (2B,)
    else:
        seq, ref_seq = logps.sum(1), ref.sum(1)  # (2B,)
    pc, pr = seq.chunk(2)  # (B,) each
    rc, rr = ref_seq.chunk(2)  # (B,) each
    weights = torch.tensor([p.weight for p in pairs], dtype=pc.dtype, device=pc.device)  # (B,)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, weights=weights)
    return loss, metrics, float(len(pairs))


def grpo_step(
    policy: Policy,
    groups: list[ScoredGroup],
    *,
    max_len: int,
    clip_eps: float,
    kl_coef: float,
    proximal: dict[str, torch.Tensor] | None = None,
    length_reward: float = 0.0,
    overlong_penalty: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float], float]:
    """GRPO loss of some groups (ratio to each group's behaviour version, or decoupled when
    `proximal` is given; KL to the base model): (loss, metrics, completion tokens it is a
    mean over). `proximal` keeps the log-probs of the batch's first step across its
    `grpo_iterations` steps, by group id: PPO's old policy. `length_reward`: weight of the
    length term added to the rewards before the advantages (`length_shaped`);
    `overlong_penalty`: what an answer cut at max_tokens loses first (`overlong_shaped`)."""
    model = policy.model
    rows = [(g, i) for g in groups for i in range(len(g.completions))]
    completions = [
        g.completion_token_ids[i]
        if len(g.completion_token_ids) == len(g.completions)
        else g.completions[i]
        for g, i in rows
    ]
    eos = policy.tokenizer.eos_token_id
    # eos follows a completion the model ended, never one cut at max_tokens: an eos there
    # would train "stop" (or "do not stop") where the model did neither; logged ids that
    # end with eos already have it
    ended = [
        g.completion_finished[i] if len(g.completion_finished) == len(g.completions) else True
        for g, i in rows
    ]
    batch = build_batch(
        policy.tokenizer,
        [g.messages for g, _ in rows],
        completions,
        max_len,
        append_eos=[
            e and not (isinstance(c, list) and c and c[-1] == eos)
            for e, c in zip(ended, completions, strict=True)
        ],
    )
    mask = batch["completion_mask"]  # (B*G, T)
    ref = reference_logps(model, batch)  # (B*G, T), adapter disabled, no grad
    # behaviour log-probs, recomputed under the version that sampled each group
    behaviour = torch.zeros_like(ref)  # (B*G, T)
    by_version: dict[str, list[int]] = defaultdict(list)
    for row, (g, _) in enumerate(rows):
        by_version[g.version].append(row)
    for version, idx in by_version.items():
        if version == BASE:
            behaviour[idx] = ref[idx]  # the base model is the reference: no extra pass
            continue
        sub = {k: v[idx] for k, v in batch.items()}
        with torch.no_grad(), policy.use(version) as m:
            behaviour[idx] = token_logps(m, sub)
    logps = token_logps(model, batch)  # (B*G, T)
    proximal_logps = None
    if proximal is not None:  # the first step's weights are the proximal policy
        proximal_logps = proximal.setdefault(groups[0].group_id, logps.detach())  # (B*G, T)
    # advantages per group (groups may differ in size), in row order
    sizes = [len(g.rewards) for g in groups]
    lengths = mask.sum(dim=1).cpu().split(sizes)  # (G,) per group
    finished = torch.tensor(ended).split(sizes)  # (G,) per group
    per_group = []
    for g, n, f in zip(groups, lengths, finished, strict=True):
        rewards = overlong_shaped(torch.tensor([g.rewards]), f.unsqueeze(0), overlong_penalty)
        rewards = length_shaped(rewards, n.unsqueeze(0), length_reward)  # (1, G)
        per_group.append(group_advantages(rewards))  # (G,)
    advantages = torch.cat(per_group).to(logps.device)  # (B*G,)
    weights = torch.tensor([g.weight for g, _ in rows], dtype=logps.dtype).to(logps.device)
    loss, metrics = grpo_loss(
        logps,
        behaviour,
        ref,
        advantages,
        mask,
        clip_eps=clip_eps,
        kl_coef=kl_coef,
        weights=weights,
        proximal_logps=proximal_logps,
    )
    return loss, metrics, float(mask.sum())


def backward(
    policy: Policy,
    records: list[PreferencePair] | list[ScoredGroup],
    args: Args,
    proximal: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Gradients of the batch's loss, built `args.micro_batch_size` records at a time.
    `proximal`: the decoupled GRPO loss's store of first-step log-probs (see grpo_step).

    Each loss is a mean (over pairs, or over completion tokens); a micro-batch's loss
    times its count, summed, then divided by the batch's count is exactly the batch's
    mean, so micro-batching changes peak memory, not the update. Returns the metrics
    averaged the same way (`_max`/`_min` ones: over the batch).
    """
    size = args.micro_batch_size or len(records)
    if args.algorithm == "dpo":
        loss_fn = partial(dpo_step, beta=args.dpo_beta, loss_type=args.dpo_loss)
    else:
        loss_fn = partial(
            grpo_step,
            clip_eps=args.grpo_clip,
            kl_coef=args.grpo_kl_coef,
            proximal=proximal,
            length_reward=args.grpo_length_reward,
            overlong_penalty=args.grpo_overlong_penalty,
        )
    parts, total = [], 0.0
    for i in range(0, len(records), size):
        loss, metrics, n = loss_fn(policy, records[i : i + size], max_len=args.max_len)
        (loss * n).backward()
        parts.append((metrics, n))
        total += n
    for p in policy.trainable_parameters():
        if p.grad is not None:
            p.grad /= total
    merged = {}
    for key in parts[0][0]:
        values = [(m[key], n) for m, n in parts]
        if key.endswith("_max"):
            merged[key] = max(v for v, _ in values)
        elif key.endswith("_min"):
            merged[key] = min(v for v, _ in values)
        else:
            merged[key] = sum(v * n for v, n in values) / total
    # --- what the batch was made of ---
    if args.algorithm == "dpo":
        merged["reward/mean"] = sum(p.chosen_reward + p.rejected_reward for p in records) / (
            2 * len(records)
        )
        merged["reward/pair_margin"] = sum(
            p.chosen_reward - p.rejected_reward for p in records
        ) / len(records)
    else:
        rewards = [x for g in records for x in g.rewards]
        merged["reward/mean"] = sum(rewards) / len(rewards)
        merged["data/staleness"] = sum(
            version_number(policy.parent) - version_number(g.version) for g in records
        ) / len(records)
    return merged
