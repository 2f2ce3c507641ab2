"""The worker's Celery queues, by name, how long the build queue is, and the dead letters.

The worker owns the queues; the dashboard and `strop status` only measure them, so the
names and the broker's list layout live here and neither needs Celery to read them.
"""

import redis

BUILD_QUEUE = "build"  # broker list `{prefix}build`: the backpressure measure
INGEST_QUEUE = "ingest"  # apart, so a full build queue never delays ingest

# kombu's Redis transport keeps priorities 3, 6 and 9 in lists of their own
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def queue_length(r: redis.Redis, prefix: str, queue: str = BUILD_QUEUE) -> int:
    """Messages waiting in a broker queue under key prefix `prefix` (all priorities;
    reserved ones not included)."""
    base = prefix + queue
    pipe = r.pipeline(transaction=False)
    pipe.llen(base)
    for pri in _PRIORITY_STEPS:
        pipe.llen(f"{base}{_PRIORITY_SEP}{pri}")
    return sum(pipe.execute())


# Builds that failed for a reason no retry cures (a refused key, a 4xx answer, a record
# that does not parse), or ran out of retries, wait here for `strop worker requeue`.
# Entry fields: log_id (the prompt-log entry), group_id (its build's marker is
# `Keys.built + group_id`), reason (unauthorized, forbidden, rejected, bad_record, failed),
# detail (the error), version, time.
DEAD_LETTER = "dead"


def dead_letter_key(prefix: str) -> str:
    """The dead-letter stream of the deployment under key prefix `prefix`."""
    return prefix + DEAD_LETTER


def dead_letter_length(r: redis.Redis, prefix: str) -> int:
    """Failed builds waiting in the dead-letter stream."""
    return int(r.xlen(dead_letter_key(prefix)))
