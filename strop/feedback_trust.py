"""Which API keys' feedback is not trusted: a key whose answers disagree with clear
majority votes far more often than everyone else's is flagged. The worker counts (and then
down-weights a flagged key's feedback, worker/feedback.py); `strop status` and the
dashboard show the flagged keys.

Redis: one hash, `Keys.feedback_trust`, fields `agree:<key id>` and `disagree:<key id>`:
per key, the user answers that agreed or disagreed with a trusted majority label (more
than half of the votes on one answer). One hash, so a build reads every key's counts in one
round trip: the rule compares a key with all the others.

The rule, per key k with n_k >= `feedback_trust_min` rated answers: flagged when its
disagreement rate exceeds that of all the other keys together by more than
`feedback_trust_margin`. The others must have `feedback_trust_min` rated answers too: with
no one to compare with, a lone key correcting a wrong model looks the same as a liar.
"""

from dataclasses import asdict, dataclass
from typing import Any

import redis

from strop.records import Keys

TRUSTED_MAJORITY = 0.5  # a vote is a yardstick only when more than half of it agrees


@dataclass(frozen=True)
class KeyTrust:
    """One key's record against trusted majorities, and whether it is flagged."""

    key_id: str
    agree: int
    disagree: int
    rest_rate: float | None  # disagreement rate of all the other keys (None: too few)
    flagged: bool

    @property
    def rated(self) -> int:
        return self.agree + self.disagree

    @property
    def rate(self) -> float:
        return self.disagree / self.rated if self.rated else 0.0


def trust_field(key_id: str, agreed: bool) -> str:
    """The `Keys.feedback_trust` field one answer of `key_id` counts in."""
    return f"{'agree' if agreed else 'disagree'}:{key_id}"


def read_counts(r: redis.Redis, keys: Keys) -> dict[str, tuple[int, int]]:
    """Per key id: (agreed, disagreed) answers."""
    out: dict[str, list[int]] = {}
    for f, n in r.hgetall(keys.feedback_trust).items():
        f = f.decode() if isinstance(f, bytes) else f
        kind, _, key_id = f.partition(":")
        if kind in ("agree", "disagree") and key_id:
            out.setdefault(key_id, [0, 0])[kind == "disagree"] += int(n)
    return {k: (a, d) for k, (a, d) in out.items()}


def assess(counts: dict[str, tuple[int, int]], min_rated: int, margin: float) -> list[KeyTrust]:
    """Every key's trust by the rule above, most disagreeing first.

    Example:
        >>> [t.key_id for t in assess({"a": (0, 10), "b": (9, 1), "c": (10, 0)}, 10, 0.3) if t.flagged]
        ['a']
    """
    total_a = sum(a for a, _ in counts.values())
    total_d = sum(d for _, d in counts.values())
    out = []
    for key_id, (a, d) in counts.items():
        rest_n = total_a + total_d - a - d
        rest_rate = (total_d - d) / rest_n if rest_n >= max(1, min_rated) else None
        flagged = a + d >= min_rated and rest_rate is not None and d / (a + d) > rest_rate + margin
        out.append(KeyTrust(key_id, a, d, rest_rate, flagged))
    return sorted(out, key=lambda t: (-t.rate, t.key_id))


def flagged_keys(r: redis.Redis, keys: Keys, min_rated: int, margin: float) -> list[KeyTrust]:
    """The flagged keys, most disagreeing first."""
    return [t for t in assess(read_counts(r, keys), min_rated, margin) if t.flagged]


def is_flagged(r: redis.Redis, keys: Keys, key_id: str, min_rated: int, margin: float) -> bool:
    """Whether `key_id`'s feedback is not to be trusted."""
    return any(t.key_id == key_id for t in flagged_keys(r, keys, min_rated, margin))


def summary(r: redis.Redis, keys: Keys, min_rated: int, margin: float) -> dict[str, Any]:
    """For the dashboard and `strop status`: how many keys were rated, and the flagged ones."""
    trust = assess(read_counts(r, keys), min_rated, margin)
    return {
        "keys_rated": len(trust),
        "flagged": [asdict(t) | {"rated": t.rated, "rate": t.rate} for t in trust if t.flagged],
        "min_rated": min_rated,
        "margin": margin,
    }
