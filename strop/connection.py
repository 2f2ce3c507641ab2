"""One way to connect to Redis, with timeouts, for every part.

Every Redis call of strop is bounded in time: a Redis that stops answering degrades a part,
it never hangs it. Callers pick the timeout that suits them (the request path is short,
the learner's blocking reads are long) and get the same client options otherwise.
"""

import redis
import redis.asyncio as aioredis


def connect(
    url: str, timeout: float = 5.0, connect_timeout: float = 5.0, decode: bool = True
) -> redis.Redis:
    """A Redis client for `url` whose calls give up after `timeout` seconds."""
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
    )


def connect_async(
    url: str, timeout: float = 2.0, connect_timeout: float = 1.0, decode: bool = False
) -> aioredis.Redis:
    """An asyncio Redis client for `url` (the service's), same options as `connect`."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
    )


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    """Create consumer group `group` on `stream` from its start (nothing written before the
    reader's first start is skipped); a group that exists already is kept."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
