"""math-verify, made safe to call from any thread and bounded in time.

math-verify guards `parse` and `verify` with SIGALRM, which only works in the main
thread: elsewhere it raises. Celery's default prefork pool runs tasks in the main thread
of its child processes, so the alarm is kept there (`TIMEOUT_S`); in any other thread it
is turned off (`parsing_timeout=None`, `timeout_seconds=None`) and only the input guard
below bounds the time. That guard matters: the ANTLR LaTeX parser behind math-verify is
very slow on deeply nested brackets (40 nested parentheses take over 10 s, and degenerate
repetition from a small model produces exactly that), so such text is never handed to it.
"""

import logging
import threading
from collections.abc import Sequence
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

TIMEOUT_S = 2
"""Seconds one parse or comparison may take, where a timeout can be enforced."""

MAX_NESTING = 12
"""Text with brackets nested deeper than this is not parsed (see the module docstring)."""

_OPEN, _CLOSE = "([{", ")]}"

# math-verify warns on every call made without a timeout; off the main thread that is by
# design here (see above), so its warnings would only bury strop's own lines.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def timeout_s() -> int | None:
    """The math-verify timeout for the calling thread: None outside the main thread."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting of any kind, unbalanced openers included.

    Example:
        >>> nesting_depth(r"\\frac{(a+b)}{2}"), nesting_depth("((((")
        (2, 4)
    """
    depth = deepest = 0
    for ch in text:
        if ch in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
    return deepest


def safe_parse(text: str, extraction_config: Sequence[Any] | None = None) -> list:
    """`math_verify.parse`, or [] when the text is too nested, it fails or times out.

    Example:
        >>> safe_parse("$\\\\frac{1}{2}$")[1]
        '\\\\frac{1}{2}'
    """
    if nesting_depth(text) > MAX_NESTING:
        return []
    kwargs: dict[str, Any] = {"parsing_timeout": timeout_s()}
    if extraction_config is not None:
        kwargs["extraction_config"] = list(extraction_config)
    try:
        return parse(text, **kwargs)
    except (Exception, TimeoutException):  # sympy raises all sorts; not parsed is the answer
        return []


def safe_verify(gold: Sequence[Any], target: Sequence[Any]) -> bool:
    """`math_verify.verify(gold, target)`, False when it fails or times out."""
    try:
        return verify(list(gold), list(target), timeout_seconds=timeout_s())
    except (Exception, TimeoutException):
        return False
