"""The collapse guard: a promoted version whose answers collapse is rolled back, and
promotion halts until an operator resumes it (`strop adapters resume`).

A loop that rewards itself can collapse: TTRL rewards agreement with the majority, so a
model that gives every sample the same answer scores perfectly; a judge can be won over by
answers that shrink to nothing or run on without end. The live reward does not see this
(it may even rise), so the guard watches what the worker writes per group
(strop/series.py), for the promoted version since its promotion:

1. vote collapse: mean `majority_ratio` >= `majority_ratio` together with mean
   `answer_entropy` <= `answer_entropy` (nearly every group's samples agree on one answer);
2. length collapse: mean `answer_length` below 1/`length_factor` or above `length_factor`
   times that of its last good version (the nearest ancestor never rolled back, see
   `last_good`), read over the `window_s` before the promotion.

Each signal decides only once it has `min_groups` groups (both versions', for the length);
the vote signal needs the TTRL groups (judge-only traffic has no vote). The thresholds are
absolute on purpose: near-unanimous votes over dozens of prompts at the sampling
temperature are the collapse itself, whatever the parent did.

Flip rate (the share of prompts whose majority answer changed between a version and its
parent) is left out: the worker dedupes prompts, so a prompt is almost never voted on by two
versions, and the series keep no per-prompt answers. Measuring it would take both versions
answering one fixed prompt set, which is the gate's kind of work, not this guard's.

When it trips, `check` first halts promotion (`Registry.halt`: the reason in the registry,
the dashboard and `strop status`; the learner rejects every new version while it is set),
then rolls `strop` back to the last good version with the reason. Halting first means a
crash in between leaves the collapsed version promoted and halted, and the next check rolls
it back; the other order could leave it rolled back but promotion open. As in
learner/rollback.py, a version the pointer reached by a rollback is not checked.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from strop.records import Keys, PromotionHalt
from strop.registry import Registry
from strop.series import Point, minute_of, read_series
from strop.versions import BASE

log = logging.getLogger("strop.learner.collapse")

SIGNALS = ("majority_ratio", "answer_entropy", "answer_length")
Series = dict[str, list[Point]]  # metric -> one version's minutes of it


@dataclass
class Verdict:
    collapsed: bool = False
    reason: str = ""  # which signals tripped, with their values; else why it did not trip
    signals: dict[str, float] = field(default_factory=dict)  # means and group counts
    version: str | None = None  # the promoted version checked (None: nothing to check)
    good: str | None = None  # its last good version: what it is rolled back to
    rolled_back: bool = False


def _mean(points: list[Point]) -> tuple[float, int]:
    """Mean over the minutes (weighted by their counts) and the number of observations."""
    count = sum(p.count for p in points)
    return (sum(p.sum for p in points) / count if count else 0.0), count


def detect(
    current: Series,
    good: Series,
    min_groups: int,
    majority_ratio: float,
    answer_entropy: float,
    length_factor: float,
) -> Verdict:
    """Whether `current` (the promoted version's series) shows a collapse next to `good`
    (its last good version's); see the module docstring. Pure: no I/O."""
    majority, voted = _mean(current.get("majority_ratio", []))
    entropy, entropies = _mean(current.get("answer_entropy", []))
    length, groups = _mean(current.get("answer_length", []))
    good_length, good_groups = _mean(good.get("answer_length", []))
    signals = {"voted_groups": float(voted), "groups": float(groups)}
    signals["good_groups"] = float(good_groups)
    tripped, decided = [], False

    # 1. vote collapse: (nearly) every group's samples agree on one answer
    if voted >= min_groups and entropies >= min_groups:
        decided = True
        signals |= {"majority_ratio": majority, "answer_entropy": entropy}
        if majority >= majority_ratio and entropy <= answer_entropy:
            tripped.append(
                f"majority ratio {majority:.3f} >= {majority_ratio:g} with answer entropy "
                f"{entropy:.3f} <= {answer_entropy:g} over {voted} groups"
            )

    # 2. length collapse: answers shrink to nothing, or grow without bound
    if groups >= min_groups and good_groups >= min_groups and good_length > 0:
        decided = True
        ratio = length / good_length
        signals |= {"answer_length": length, "good_answer_length": good_length}
        signals["length_ratio"] = ratio
        if ratio < 1 / length_factor or ratio > length_factor:
            tripped.append(
                f"mean answer length {length:.1f} tokens is {ratio:.2f}x the last good "
                f"version's {good_length:.1f} (allowed 1/{length_factor:g}x to "
                f"{length_factor:g}x) over {groups} groups"
            )

    if tripped:
        return Verdict(True, "; ".join(tripped), signals)
    if not decided:
        reason = (
            f"too few groups yet: {voted} voted, {groups} with a length ({good_groups} of "
            f"the last good version); {min_groups} needed"
        )
        return Verdict(False, reason, signals)
    return Verdict(False, "no collapse", signals)


def last_good(
    registry: Registry, version: str, available: Callable[[str], bool] = lambda v: True
) -> str:
    """The nearest ancestor of `version` (its parent, its parent's parent, ...) that is
    still good: promoted once and never rolled back (status `promoted`), and `available`
    (its adapter on disk); `base` if none is."""
    meta = registry.get(version)
    parent, seen = (meta.parent if meta else BASE), {version}
    while parent != BASE and parent not in seen:
        seen.add(parent)
        meta = registry.get(parent)
        if meta is None:
            break  # unknown to the registry: neither checkable nor a rollback target
        if meta.status == "promoted" and available(parent):
            return parent
        parent = meta.parent
    return BASE


def check(
    registry: Registry,
    r: redis.Redis,
    keys: Keys,
    window_s: float,
    min_groups: int,
    majority_ratio: float,
    answer_entropy: float,
    length_factor: float,
    available: Callable[[str], bool] = lambda v: True,
    now: float | None = None,
) -> Verdict:
    """Roll the promoted version back and halt promotion if it collapsed; says what it
    found. `available(version)`: whether a version can be served (its adapter on disk)."""
    now = time.time() if now is None else now
    current = registry.promoted()
    if current is None:
        return Verdict(reason="nothing promoted: the base model is not checked")
    moved = registry.arrival(current)
    if moved is None or moved.kind != "promoted":
        return Verdict(version=current, reason="reached by rollback or unknown: not checked")
    good = last_good(registry, current, available)

    # the promoted version's groups since its promotion (the last window_s of them); its
    # last good version's from the window_s before that promotion (and as long after it:
    # callers who pinned it)
    since = max(moved.time, now - window_s)
    ours: Series = {}
    for metric in SIGNALS:
        points = read_series(r, keys, metric, current, since, now)[current]
        ours[metric] = [p for p in points if p.minute >= minute_of(moved.time)]
    before = (moved.time - window_s, min(now, moved.time + window_s))
    theirs = {"answer_length": read_series(r, keys, "answer_length", good, *before)[good]}

    verdict = detect(ours, theirs, min_groups, majority_ratio, answer_entropy, length_factor)
    verdict.version, verdict.good = current, good
    if verdict.collapsed:
        halt = PromotionHalt(
            version=current, rolled_back_to=good, reason=verdict.reason, signals=verdict.signals
        )
        registry.halt(halt)
        registry.rollback(to=good, reason=f"auto: collapse guard tripped: {verdict.reason}")
        verdict.rolled_back = True
        log.warning(
            "collapse guard: %s rolled back to %s, promotion halted: %s",
            current,
            good,
            verdict.reason,
        )
    return verdict
