"""The `auto` reward method: TTRL where most samples carry an answer, the judge elsewhere."""

import re
from collections.abc import Sequence
from typing import Literal

from judge.extract import extract_answers

Method = Literal["ttrl", "judge"]

# The result of an equation ("17 + 25 = 42", "34 - 8 equals 26") anchors an answer too:
# small models state arithmetic that way far more often than "The answer is 42", and a
# chat reply that only mentions a number ("3 tips for sleep") has no "= 3".
_RESULT_RE = re.compile(r"(?:=|\bequals\b)\s*\$?\s*[-+]?\d")
# A question that is itself arithmetic ("What is 17 + 25?") wants a number, so there the
# last number of a reply is its answer (TTRL's math setting). "-" and "x" count only
# between spaces: "2024-11-23" and "4x4" are not sums.
_ARITHMETIC_RE = re.compile(r"\d\s*[+*/×÷]\s*\d|\d\s+[-x]\s+\d")


def extraction_rate(answers: Sequence[str | None]) -> float:
    """Fraction of samples with an extracted answer (None and blank do not count).

    Example:
        >>> extraction_rate(["42", None, "", "7"])
        0.5
    """
    if not answers:
        return 0.0
    return sum(1 for a in answers if a is not None and a.strip()) / len(answers)


def choose_method(texts: Sequence[str], threshold: float = 0.5, prompt: str = "") -> Method:
    """`ttrl` if at least `threshold` of the sampled texts carry an answer, else `judge`.

    Only anchored answers count here (boxed, "the answer is", "Answer:", a choice letter,
    a text that is nothing but math, or an equation's result "= 42"): with the last-number
    fallback, any chat reply mentioning a number ("3 tips for sleep") would be sent to the
    vote. Unless the `prompt` is an arithmetic question: then any number counts.

    Example:
        >>> choose_method(["The answer is 4.", "\\\\boxed{4}", "Answer: 5"])
        'ttrl'
        >>> choose_method(["17 + 25 = 42.", "So 17 + 25 equals 41, I think."])
        'ttrl'
        >>> choose_method(["Here are 3 tips for better sleep: ...", "Try warm milk."])
        'judge'
        >>> choose_method(["To add them you get 32.", "It makes 42."], prompt="What is 19 + 23?")
        'ttrl'
    """
    if not texts:
        return "judge"
    answers = extract_answers(texts, anchored_only=not _ARITHMETIC_RE.search(prompt))
    answered = sum(
        1
        for text, answer in zip(texts, answers, strict=True)
        if (answer is not None and answer.strip()) or _RESULT_RE.search(text or "")
    )
    return "ttrl" if answered / len(texts) >= threshold else "judge"
