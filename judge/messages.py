"""Chat messages as text: what the judge renders, and what the worker compares prompts by."""

from typing import Any


def message_text(content: Any) -> str:
    """A message's text. OpenAI content is a string or a list of parts; only the text
    parts count, and anything else is "".

    Example:
        >>> message_text("Hi"), message_text([{"type": "text", "text": "Hi"}, {"type": "x"}])
        ('Hi', 'Hi')
        >>> message_text(None)
        ''
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
