"""The stated result: what a reply says its question's numbers come to, and whether it holds.

A small model answers "Calculate 9 plus 4." or a one-step word problem with an equation
and then keeps talking: "9 + 4 = 13. Adding a number with a multiplier effectively
creates ...". The last number of such a reply is noise; the equation over the question's
own numbers is the answer it gave. Voting on those results instead of on last numbers is
what makes the TTRL label worth training on for SmolLM2-135M.

The equation is also checked: a reply that writes "11 × 2 = 20" has shown its answer
wrong by its own working, so it casts no vote and earns no reward. This reads no gold
answer; it is arithmetic on the reply's own words. It matters because SmolLM2-135M's
confident answers are mostly shared mistakes: unchecked, the vote's label was right for
about 1 trained group in 4 in the loop; with false equations out, and one true equation
enough for a label, for about 2 in 3 (bench/README.md, "Learning"). Whether the equation
fits the question (adding where the question subtracts) is still the vote's to decide.
"""

import ast
import operator
import re
from collections.abc import Sequence

from judge.vote import same_answer

_NUM = r"-?\d+(?:\.\d+)?"
_OP = r"[-+×x*/÷]"
# "12 * 4 = 48", "9 + 4 equals 13", "6 x 3 = 18"; not the head of a longer chain ("= 13 + 2")
_EQUATION_RE = re.compile(
    rf"(?P<lhs>{_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*(?:=|\bequals\b)\s*\$?(?P<rhs>{_NUM})"
    rf"(?![\d.]*\s*{_OP}\s*\d)"
)
_INT_RE = re.compile(r"\d+(?:\.\d+)?")


def stated_equation(text: str | None, prompt: str) -> tuple[str, bool] | None:
    """The first equation in `text` over (at least two of) the prompt's numbers, as its
    stated result and whether its arithmetic holds; None when the reply states none.

    Example:
        >>> stated_equation("9 + 4 = 13. Adding 9 to 4 gives 2 more.", "Calculate 9 plus 4.")
        ('13', True)
        >>> stated_equation("9 + 4 = 12.", "Calculate 9 plus 4.")
        ('12', False)
    """
    numbers = set(_INT_RE.findall(prompt))
    if not numbers:
        return None
    for m in _EQUATION_RE.finditer(text or ""):
        operands = set(_INT_RE.findall(m.group("lhs")))
        if len(operands & numbers) >= min(2, len(numbers)):
            return m.group("rhs"), _holds(m.group("lhs"), m.group("rhs"))
    return None


def stated_result(text: str | None, prompt: str) -> str | None:
    """The result of the first equation in `text` over the prompt's numbers, true or not
    (None when the reply states none).

    Example:
        >>> stated_result("9 + 4 = 13. Adding 9 to 4 gives 2 more.", "Calculate 9 plus 4.")
        '13'
        >>> stated_result("The answer is 13.", "Calculate 9 plus 4.") is None
        True
    """
    stated = stated_equation(text, prompt)
    return stated[0] if stated else None


def vote_answers(texts: Sequence[str], prompt: str, answers: Sequence[str | None]) -> list:
    """What each sample votes for: where any sample of the group states an equation, its
    stated result if that equation holds (a sample that states none, or a false one,
    abstains); else its extracted final answer."""
    stated = [stated_equation(t, prompt) for t in texts]
    if all(s is None for s in stated):
        return list(answers)
    return [s[0] if s is not None and s[1] else None for s in stated]


def verified(texts: Sequence[str], prompt: str) -> bool:
    """Whether the group's vote is over checked results: some sample states an equation
    over the prompt's numbers that holds."""
    return any((s := stated_equation(t, prompt)) is not None and s[1] for t in texts)


def consistent_rewards(
    label: str | None, answers: Sequence[str | None], texts: Sequence[str], prompt: str
) -> list[float]:
    """1.0 for a sample whose final answer is `label` (the vote's, or a user's) and whose
    working, if it states an equation over the prompt's numbers, holds; else 0.0. A reply
    that states the result and then ends on another number would teach the model to bury
    its answer (a reader, and the extractor, take the last one); a reply that reaches the
    label through a false equation would teach it the false step.

    Example:
        >>> p = "What is 9 + 4?"
        >>> texts = ["9 + 4 = 13, so 13.", "9 + 4 = 12, so 13.", "13", "9 + 4 = 13, or 7"]
        >>> consistent_rewards("13", ["13", "13", "13", "7"], texts, p)
        [1.0, 0.0, 1.0, 0.0]
    """
    if label is None:
        return [0.0] * len(answers)
    rewards = []
    for a, text in zip(answers, texts, strict=True):
        stated = stated_equation(text, prompt)
        holds = stated is None or stated[1]
        rewards.append(1.0 if holds and a is not None and same_answer(a, label) else 0.0)
    return rewards


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _holds(lhs: str, rhs: str) -> bool:
    """Whether `lhs` (numbers and + - × x * / ÷) comes to `rhs`, to rhs's decimal places."""
    expr = lhs.replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        value = _evaluate(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return False
    places = len(rhs.partition(".")[2])
    return abs(round(value, places) - float(rhs)) < 10**-places / 2


def _evaluate(node: ast.expr) -> float:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    raise ValueError(f"not arithmetic: {ast.dump(node)}")
