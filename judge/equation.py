"""The stated result: what a reply says its question's numbers come to.

A small model answers "Calculate 9 plus 4." or a one-step word problem with an equation
and then keeps talking: "9 + 4 = 13. Adding a number with a multiplier effectively
creates ...". The last number of such a reply is noise; the equation over the question's
own numbers is the answer it gave. Voting on those results instead of on last numbers is
what makes the TTRL label worth training on for SmolLM2-135M: on 60 held-out questions
(8 samples at T=1) the majority label was right for 26% of the prompts with at least 2
agreeing samples when voting on final answers, and for 82% when voting on stated results
(bench/README.md, "Learning").

Only the reply's own words are read: no gold answer, no calculator. A reply whose
equation is wrong ("11 × 2 = 20") states 20, and the vote decides.
"""

import re
from collections.abc import Sequence

from judge.vote import VoteResult, same_answer

_NUM = r"-?\d+(?:\.\d+)?"
_OP = r"[-+×x*/÷]"
# "12 * 4 = 48", "9 + 4 equals 13", "6 x 3 = 18"; not the head of a longer chain ("= 13 + 2")
_EQUATION_RE = re.compile(
    rf"(?P<lhs>{_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*(?:=|\bequals\b)\s*\$?(?P<rhs>{_NUM})"
    rf"(?![\d.]*\s*{_OP}\s*\d)"
)
_INT_RE = re.compile(r"\d+(?:\.\d+)?")


def stated_result(text: str | None, prompt: str) -> str | None:
    """The result of the first equation in `text` over (at least two of) the prompt's
    numbers, or None when the reply states none.

    Example:
        >>> stated_result("9 + 4 = 13. Adding 9 to 4 gives 2 more.", "Calculate 9 plus 4.")
        '13'
        >>> stated_result("The answer is 13.", "Calculate 9 plus 4.") is None
        True
    """
    numbers = set(_INT_RE.findall(prompt))
    if not numbers:
        return None
    for m in _EQUATION_RE.finditer(text or ""):
        operands = set(_INT_RE.findall(m.group("lhs")))
        if len(operands & numbers) >= min(2, len(numbers)):
            return m.group("rhs")
    return None


def vote_answers(texts: Sequence[str], prompt: str, answers: Sequence[str | None]) -> list:
    """What each sample votes for: its stated result when any sample of the group states
    one (a sample that states none abstains), else its extracted final answer."""
    stated = [stated_result(t, prompt) for t in texts]
    return stated if any(s is not None for s in stated) else list(answers)


def consistent_rewards(vote: VoteResult, answers: Sequence[str | None]) -> list[float]:
    """The vote's rewards, kept only where the sample's final answer is the label too: a
    reply that states the majority's result and then ends on another number would teach
    the model to bury its answer, and a reader (or the extractor) takes the last one.

    Example:
        >>> from judge.vote import majority_vote
        >>> consistent_rewards(majority_vote(["13", "13", "12"]), ["13", "7", "12"])
        [1.0, 0.0, 0.0]
    """
    if vote.label is None:
        return [0.0] * len(answers)
    return [
        r if r and a is not None and same_answer(a, vote.label) else 0.0
        for r, a in zip(vote.rewards, answers, strict=True)
    ]
