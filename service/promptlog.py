"""The prompt log writer: user requests go to a capped Redis stream, without ever waiting.

A request only appends to an in-memory buffer; one background task drains it into Redis
in pipelined batches. While Redis is unreachable the buffer holds up to `buffer_size`
records (the oldest are dropped and counted beyond that) and is written once Redis returns.
"""

import asyncio
import logging
from collections import deque

from redis.exceptions import RedisError

from strop.connection import connect_async
from strop.records import PromptLogRecord

log = logging.getLogger("strop.promptlog")

BATCH = 256  # records per pipelined write
RETRY_S = (0.05, 0.1, 0.25, 0.5, 1.0)  # back-off while Redis is down


class PromptLog:
    def __init__(self, redis_url: str, stream: str, maxlen: int, buffer_size: int):
        self.stream, self.maxlen = stream, maxlen
        self.buffer: deque[PromptLogRecord] = deque()
        self.buffer_size = buffer_size
        self.written = 0
        self.dropped = 0
        self.redis_ok = True
        self._redis = connect_async(redis_url, timeout=1.0)
        self._inflight: set[int] = set()  # ids of records being written right now
        self._evicted_inflight = 0  # of those, evicted by a full buffer meanwhile
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def append(self, record: PromptLogRecord) -> None:
        """Queue a record for writing; never blocks, never raises."""
        if len(self.buffer) >= self.buffer_size:
            oldest = self.buffer.popleft()
            if id(oldest) in self._inflight:  # being written: lost only if that write fails
                self._evicted_inflight += 1
            else:
                self.dropped += 1
        self.buffer.append(record)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="promptlog")

    async def close(self, flush_timeout_s: float = 2.0) -> None:
        """Flush what is buffered (bounded wait), then stop."""
        if self._task:
            deadline = asyncio.get_running_loop().time() + flush_timeout_s
            while self.buffer and self.redis_ok and asyncio.get_running_loop().time() < deadline:
                self._wake.set()
                await asyncio.sleep(0.02)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self.buffer:
                self._wake.clear()
                await self._wake.wait()
            batch = [self.buffer[i] for i in range(min(BATCH, len(self.buffer)))]
            self._inflight = {id(rec) for rec in batch}
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for rec in batch:
                        pipe.xadd(
                            self.stream, rec.to_stream(), maxlen=self.maxlen, approximate=True
                        )
                    await pipe.execute()
            except (RedisError, OSError) as e:
                self._inflight = set()
                self.dropped += self._evicted_inflight  # evicted while the write failed
                self._evicted_inflight = 0
                if self.redis_ok:
                    log.warning(
                        "prompt log: redis unreachable (%s); buffering", e.__class__.__name__
                    )
                self.redis_ok = False
                await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            # Only now remove what was written; records appended meanwhile stay queued. If the
            # buffer overflowed during the write, the oldest (ours) are already gone.
            for rec in batch:
                if self.buffer and self.buffer[0] is rec:
                    self.buffer.popleft()
            self._inflight = set()
            self._evicted_inflight = 0
            self.written += len(batch)
            if not self.redis_ok:
                log.warning("prompt log: redis is back; %d records buffered", len(self.buffer))
            self.redis_ok, failures = True, 0
