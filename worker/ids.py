"""Idempotency keys of the groups the worker writes (the `built:<key>` markers)."""

import hashlib

from strop.settings import Settings


def group_id(log_id: str, settings: Settings) -> str:
    """Idempotency key: the same entry built the same way is one group."""
    key = f"{log_id}|{settings.reward_method}|{settings.n_votes}|{settings.n_train}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def feedback_gid(request_id: str) -> str:
    """Idempotency key of the feedback group of a request: one per request id."""
    return "fb-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]
