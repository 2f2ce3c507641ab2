"""TTRL majority vote (Zuo et al. 2025, "TTRL: Test-Time Reinforcement Learning").

The N sampled answers to one prompt are grouped by equivalence, the biggest group's
answer is the pseudo-label, and each sample is rewarded 1.0 if its answer is equivalent
to the label, else 0.0.

Choices, all independent of the order of the samples:

- equivalence: same string after normalisation (case, spaces, `\\text{}`), or
  math-verify `verify` in either direction (so `1/2`, `0.5` and `\\frac{1}{2}` are one
  answer). Distinct answers are clustered greedily, most frequent first (ties by string),
  each joining the first cluster whose representative it is equivalent to;
- the label is the representative of the biggest cluster; between equally big clusters
  the representative that sorts first wins, and `tie` reports it;
- ratio = majority count / all samples, the unanswered ones included (as in TTRL): a
  vote where most samples have no answer is a weak vote;
- None, empty and blank answers never take part: they get reward 0.0 and never win.
"""

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from judge.extract import extract_answers
from judge.mathverify import safe_parse, safe_verify

MAX_MATH_CHARS = 100
"""Longer answers are compared as strings only: sympy on long input can take seconds."""

_MATHY_RE = re.compile(r"[\d\\]")  # a digit or a LaTeX command: worth a sympy parse
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\{([^{}]*)\}")
_UNESCAPED_PERCENT_RE = re.compile(r"(?<!\\)%")


@dataclass(frozen=True)
class VoteResult:
    """The outcome of one majority vote."""

    label: str | None
    """The pseudo-label: the majority answer, None when no sample has an answer."""
    ratio: float
    """Majority count / number of samples (unanswered samples count in the denominator)."""
    rewards: list[float]
    """1.0 for samples whose answer is equivalent to the label, else 0.0; one per sample."""
    counts: dict[str, int] = field(default_factory=dict)
    """Cluster representative -> number of samples in it, biggest first."""
    members: dict[str, list[str]] = field(default_factory=dict)
    """Cluster representative -> the distinct answers grouped into it."""
    tie: bool = False
    """Whether several clusters shared the top count (the label then sorts first)."""
    tied_labels: list[str] = field(default_factory=list)
    """The representatives of the tied top clusters, sorted; empty when no tie."""

    @property
    def majority_count(self) -> int:
        """Samples in the majority cluster (= sum of rewards)."""
        return self.counts[self.label] if self.label is not None else 0

    @property
    def has_signal(self) -> bool:
        """Whether rewards differ at all: all-0 or all-1 groups teach nothing."""
        return 0 < self.majority_count < len(self.rewards)


def majority_vote(answers: Sequence[str | None]) -> VoteResult:
    """Majority vote over extracted answers (one per sample; None = no answer).

    Example:
        >>> result = majority_vote(["1/2", "0.5", "\\\\frac{1}{2}", "3", None])
        >>> result.label, result.ratio, result.rewards
        ('0.5', 0.6, [1.0, 1.0, 1.0, 0.0, 0.0])
    """
    answered = [a.strip() if isinstance(a, str) and a.strip() else None for a in answers]
    freq = Counter(a for a in answered if a is not None)
    if not freq:
        return VoteResult(label=None, ratio=0.0, rewards=[0.0] * len(answered))

    # greedy clustering in an order fixed by the answers themselves, not their positions
    representatives: list[str] = []
    cluster_of: dict[str, str] = {}
    for answer in sorted(freq, key=lambda a: (-freq[a], a)):
        rep = next((r for r in representatives if same_answer(r, answer)), None)
        if rep is None:
            representatives.append(answer)
            rep = answer
        cluster_of[answer] = rep

    counts: Counter[str] = Counter()
    members: dict[str, list[str]] = {r: [] for r in representatives}
    for answer, rep in cluster_of.items():
        counts[rep] += freq[answer]
        members[rep].append(answer)

    top = max(counts.values())
    tied = sorted(r for r in representatives if counts[r] == top)
    label = tied[0]
    rewards = [1.0 if a is not None and cluster_of[a] == label else 0.0 for a in answered]
    return VoteResult(
        label=label,
        ratio=top / len(answered),
        rewards=rewards,
        counts=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        members=members,
        tie=len(tied) > 1,
        tied_labels=tied if len(tied) > 1 else [],
    )


def answer_entropy(vote: VoteResult) -> float:
    """Entropy of the vote's answer clusters over all samples (an unanswered sample is its
    own cluster), scaled to [0, 1]: 0 when every sample gives one answer, 1 when all
    differ. A loop collapsing into one confident answer drives it to 0.

    Example:
        >>> answer_entropy(majority_vote(["4", "4", "4", "4"])), answer_entropy(majority_vote(["1", "2"]))
        (0.0, 1.0)
    """
    n = len(vote.rewards)
    if n < 2:
        return 0.0
    sizes = list(vote.counts.values())
    sizes += [1] * (n - sum(sizes))  # each unanswered sample
    return max(0.0, -sum(c / n * math.log(c / n) for c in sizes) / math.log(n))  # no -0.0


def ttrl_rewards(completions: Sequence[str], **kwargs) -> list[float]:
    """TRL-style reward function: extract each completion's answer, vote, reward.

    Every sample can be scored (no answer scores 0.0), so nothing here is None.

    Example:
        >>> ttrl_rewards(["The answer is 4.", "\\\\boxed{4}", "I think 5", "no idea"])
        [1.0, 1.0, 0.0, 0.0]
    """
    return majority_vote(extract_answers(completions)).rewards


def same_answer(a: str, b: str) -> bool:
    """Whether two extracted answers are the same answer (symmetric).

    Example:
        >>> same_answer("0.5", "\\\\frac{1}{2}"), same_answer("Paris", "\\\\text{paris}")
        (True, True)
        >>> same_answer("2", "3")
        False
    """
    if a == b:
        return True
    # the cache key is unordered, so same_answer(a, b) and (b, a) share one entry
    return _same_answer_cached(min(a, b), max(a, b))


@lru_cache(maxsize=16384)
def _same_answer_cached(a: str, b: str) -> bool:
    if _normalise(a) == _normalise(b):
        return True
    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    # verify() is asymmetric (gold first: "x = 5" vs "5"), so either direction counts
    return safe_verify(pa, pb) or safe_verify(pb, pa)


@lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    """math-verify's parse of an answer, () when it is not worth or not able to parse."""
    if len(answer) > MAX_MATH_CHARS or not _MATHY_RE.search(answer):
        # plain words: "$Paris$" would parse as the product P*a*r*i*s, equal to "sirap"
        return ()
    # inside $...$ the LaTeX parser reads the whole answer; bare, the number regex would
    # read "2x+1" as 2. A bare % would start a LaTeX comment.
    latex = _UNESCAPED_PERCENT_RE.sub(r"\\%", answer.replace("$", ""))
    return tuple(safe_parse(f"${latex}$"))


def _normalise(answer: str) -> str:
    s = _TEXT_CMD_RE.sub(r"\1", answer)
    s = s.replace("$", "").rstrip(".").casefold()
    return "".join(s.split())
