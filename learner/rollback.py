"""Automatic rollback: a promoted version whose live reward drops is rolled back.

Live reward is `strop.series.live_reward`: the rewards of the completions of the groups the
worker wrote, per behaviour version and minute, the same numbers the dashboard and
`strop status` show. Within `window_s` after a promotion, once the new version and the
version it replaced each have `min_samples` rewards, the new version is rolled back if its
mean is lower than its predecessor's by more than `margin`. The predecessor's rewards are
those of the `window_s` before the promotion (and any of its groups that arrive after it);
the new version's count from the minute of its promotion on. A version the pointer reached
by a rollback is not checked again: that would let two versions roll each other back in
turn.
"""

import logging
import time
from dataclasses import dataclass

import redis

from strop.records import Keys
from strop.registry import Registry
from strop.series import live_reward, minute_of

log = logging.getLogger("strop.learner.rollback")


@dataclass
class Verdict:
    version: str | None  # the version checked (None: nothing to check)
    previous: str  # what it replaced: `base` or vN
    new_mean: float | None = None
    previous_mean: float | None = None
    new_samples: int = 0
    previous_samples: int = 0
    rolled_back: bool = False
    reason: str | None = None


def check(
    registry: Registry,
    r: redis.Redis,
    keys: Keys,
    window_s: float,
    margin: float,
    min_samples: int,
    now: float | None = None,
) -> Verdict:
    """Roll the promoted version back if its live reward dropped; says what it found."""
    now = time.time() if now is None else now
    current = registry.promoted()
    if current is None:
        return Verdict(None, "base")
    # The event that put `current` under the pointer: a promotion we check, or a rollback.
    moved = registry.arrival(current)
    if moved is None or moved.kind != "promoted":
        return Verdict(current, "base", reason="reached by rollback or unknown: not checked")
    previous = moved.previous or "base"
    verdict = Verdict(current, previous)
    if now - moved.time > window_s:
        verdict.reason = "watch window over"
        return verdict
    since = moved.time - window_s
    new_points = live_reward(r, keys, current, since, now)[current]
    new_points = [p for p in new_points if p.minute >= minute_of(moved.time)]
    old_points = live_reward(r, keys, previous, since, now)[previous]
    new_sum, new = sum(p.sum for p in new_points), sum(p.count for p in new_points)
    old_sum, old = sum(p.sum for p in old_points), sum(p.count for p in old_points)
    verdict.new_samples, verdict.previous_samples = new, old
    if new < min_samples or old < min_samples:
        verdict.reason = "too few samples yet"
        return verdict
    verdict.new_mean, verdict.previous_mean = new_sum / new, old_sum / old
    if verdict.previous_mean - verdict.new_mean > margin:
        verdict.reason = (
            f"auto: live reward {verdict.new_mean:.3f} ({new} samples) is below "
            f"{previous}'s {verdict.previous_mean:.3f} ({old} samples) by more than {margin}"
        )
        registry.rollback(to=previous, reason=verdict.reason)
        verdict.rolled_back = True
        log.warning("rolled back %s -> %s: %s", current, previous, verdict.reason)
    return verdict
