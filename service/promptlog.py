"""The prompt log writer: user requests go to a capped Redis stream, without ever waiting.

A request only appends to an in-memory buffer; one background task drains it into Redis
in pipelined batches. While Redis is unreachable the buffer holds up to `buffer_size`
records (the oldest are dropped and counted beyond that) and is written once Redis returns.
A record is serialised as it is queued, so one that cannot be written is counted and
skipped there; nothing a request carries can stop the writer.

A batch whose write timed out is sent again, but a frozen Redis may still run the first
copy when it wakes; each record is therefore added only if its request id has no marker
yet (one Lua script per batch), so a record is in the stream once.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from redis.exceptions import RedisError

from strop.connection import connect_async
from strop.records import PromptLogRecord

log = logging.getLogger("strop.promptlog")

BATCH = 256  # records per pipelined write
RETRY_S = (0.05, 0.1, 0.25, 0.5, 1.0)  # back-off while Redis is down
# Longer than any Redis freeze a timed-out write could sit out; one small key per record.
WRITTEN_TTL_S = 900

# KEYS: the stream, then one marker per record; ARGV: maxlen, ttl, then each record's data.
ADD_ONCE = """
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[i + 1])
  end
end
return #KEYS - 1
"""
DROP_REASONS = ("buffer_full", "unserializable", "write_error")


class _Entry:
    """One serialised record; its identity tells a written entry from a newer one."""

    __slots__ = ("request_id", "data")

    def __init__(self, request_id: str, data: str):
        self.request_id, self.data = request_id, data


class PromptLog:
    """The buffer and its writer task; `on_drop(reason, n)` hears of every record dropped."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        written_prefix: str,
        maxlen: int,
        buffer_size: int,
        on_drop: Callable[[str, int], None] | None = None,
    ):
        self.stream, self.written_prefix, self.maxlen = stream, written_prefix, maxlen
        self.buffer: deque[_Entry] = deque()
        self.buffer_size = buffer_size
        self.written = 0
        self.drops: dict[str, int] = {}  # reason -> records dropped
        self._on_drop = on_drop
        self.redis_ok = True
        self._redis = connect_async(redis_url, timeout=1.0)
        self._add_once = self._redis.register_script(ADD_ONCE)
        self._inflight: set[int] = set()  # ids of records being written right now
        self._evicted_inflight = 0  # of those, evicted by a full buffer meanwhile
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def dropped(self) -> int:
        """Records dropped for any reason."""
        return sum(self.drops.values())

    @property
    def running(self) -> bool:
        """Whether the writer task is alive (False before start and after it ended)."""
        return self._task is not None and not self._task.done()

    def _drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.drops[reason] = self.drops.get(reason, 0) + n
            if self._on_drop is not None:
                self._on_drop(reason, n)

    def append(self, record: PromptLogRecord) -> None:
        """Queue a record for writing; never blocks, never raises."""
        try:
            entry = _Entry(record.request_id, record.to_stream()["data"])
        except Exception as e:  # e.g. text pydantic cannot encode: skip it, count it
            log.warning(
                "prompt log: record %s dropped, not serialisable (%s)",
                record.request_id,
                e.__class__.__name__,
            )
            self._drop("unserializable")
            return
        if len(self.buffer) >= self.buffer_size:
            oldest = self.buffer.popleft()
            if id(oldest) in self._inflight:  # being written: lost only if that write fails
                self._evicted_inflight += 1
            else:
                self._drop("buffer_full")
        self.buffer.append(entry)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="promptlog")
        self._task.add_done_callback(_report_end)

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
            self._inflight = {id(entry) for entry in batch}
            try:
                await self._add_once(
                    keys=[self.stream, *(self.written_prefix + e.request_id for e in batch)],
                    args=[self.maxlen, WRITTEN_TTL_S, *(e.data for e in batch)],
                )
            except (RedisError, OSError) as e:
                self._inflight = set()
                self._drop("buffer_full", self._evicted_inflight)  # evicted while it failed
                self._evicted_inflight = 0
                if self.redis_ok:
                    log.warning(
                        "prompt log: redis unreachable (%s); buffering", e.__class__.__name__
                    )
                self.redis_ok = False
                await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            except Exception:
                # Not Redis being away but a bug: retrying the same batch would fail
                # forever and stop all logging, so drop it (counted) and go on.
                log.exception("prompt log: a batch of %d records could not be written", len(batch))
                self._drop("write_error", len(batch) - self._evicted_inflight)
                self._drop("buffer_full", self._evicted_inflight)
                self._remove(batch)
                await asyncio.sleep(RETRY_S[-1])
                continue
            # Only now remove what was written; records appended meanwhile stay queued. If the
            # buffer overflowed during the write, the oldest (ours) are already gone.
            self._remove(batch)
            self.written += len(batch)
            if not self.redis_ok:
                log.warning("prompt log: redis is back; %d records buffered", len(self.buffer))
            self.redis_ok, failures = True, 0

    def _remove(self, batch: list[_Entry]) -> None:
        for entry in batch:
            if self.buffer and self.buffer[0] is entry:
                self.buffer.popleft()
        self._inflight = set()
        self._evicted_inflight = 0


def _report_end(task: asyncio.Task) -> None:
    # /health reports the stop; this says why, once, in the service log.
    if not task.cancelled() and task.exception() is not None:
        log.error("prompt log writer stopped", exc_info=task.exception())
