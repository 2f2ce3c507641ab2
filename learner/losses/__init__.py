"""Preference and policy-gradient losses: pure functions of log-probabilities."""

from learner.losses.dpo import dpo_loss
from learner.losses.grpo import group_advantages, grpo_loss, length_shaped, overlong_shaped

__all__ = ["dpo_loss", "group_advantages", "grpo_loss", "length_shaped", "overlong_shaped"]
