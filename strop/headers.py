"""HTTP headers the parts send to the service (a contract, like the Redis keys)."""

INTERNAL = "X-Strop-Internal"
"""On the worker's (and learner's) own calls: never logged, never trained on, and a pinned
version that is registered but not promoted may be served."""

NO_LOG = "X-Strop-No-Log"
"""A user's opt-out: this request is not logged, so nothing ever trains on it."""
