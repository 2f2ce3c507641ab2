"""What makes two prompts the same prompt: normalised text and its hash."""

import hashlib
from typing import Any

from judge.messages import message_text


def normalise(text: str) -> str:
    """Lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """Hash of the normalised conversation (roles and contents)."""
    text = "\x1e".join(
        f"{m.get('role', '')}\x1f{normalise(message_text(m.get('content')))}" for m in messages
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""
