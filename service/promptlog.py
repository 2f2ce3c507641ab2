"""The prompt log writer: user requests go to a capped Redis stream, without ever waiting.

A request only appends to an in-memory buffer; one background task drains it into Redis
in pipelined batches. While Redis is unreachable the buffer holds up to `buffer_size`
records (the oldest are dropped and counted beyond that) and is written once Redis returns.
A record is serialised as it is queued, so one that cannot be written is counted and
skipped there; nothing a request carries can stop the writer.

A batch whose write timed out is sent again, but a frozen Redis may still run the first
copy when it wakes; each record is therefore added only if its request id has no marker
yet (one Lua script per batch), so a record is in the stream once.

The marker also says who owns the request (`key_id|stream entry id|version|n`) and lives
as long as its caller may rate it (POST /v1/strop/feedback). A request that opted out of
logging leaves only a `nolog` marker holding its key id, so that endpoint can say why it
cannot be rated; those are written by the same task, never on a request's path.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from redis.exceptions import RedisError

from strop.connection import connect_async
from strop.records import PromptLogRecord

log = logging.getLogger("strop.promptlog")

BATCH = 256  # records per pipelined write
RETRY_S = (0.05, 0.1, 0.25, 0.5, 1.0)  # back-off while Redis is down
# Longer than any Redis freeze a timed-out write could sit out; one small key per record.
WRITTEN_TTL_S = 900

# KEYS: the stream, then one marker per record; ARGV: maxlen, ttl, then per record its
# data, key id, version and n. SET NX first: a marker already there means written before.
ADD_ONCE = """
for i = 2, #KEYS do
  local a = 3 + (i - 2) * 4
  if redis.call('SET', KEYS[i], '', 'NX', 'EX', ARGV[2]) then
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[a])
    local owner = ARGV[a + 1] .. '|' .. id .. '|' .. ARGV[a + 2] .. '|' .. ARGV[a + 3]
    redis.call('SET', KEYS[i], owner, 'EX', ARGV[2])
  end
end
return #KEYS - 1
"""
DROP_REASONS = ("buffer_full", "unserializable", "write_error")


class Marker(NamedTuple):
    """What a written record's marker says about its request."""

    key_id: str
    entry_id: str  # the record's id in the prompt-log stream
    version: str
    n: int


def parse_marker(raw: bytes | str | None) -> Marker | None:
    """The marker's fields; None if absent or of the older, bare kind ("1")."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    parts = text.split("|")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return Marker(parts[0], parts[1], parts[2], int(parts[3]))


class _Entry:
    """One serialised record; its identity tells a written entry from a newer one."""

    __slots__ = ("request_id", "data", "key_id", "version", "n")

    def __init__(self, request_id: str, data: str, key_id: str, version: str, n: int):
        self.request_id, self.data = request_id, data
        self.key_id, self.version, self.n = key_id, version, n


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
        ttl_s: int = WRITTEN_TTL_S,
        nolog_prefix: str | None = None,
    ):
        self.stream, self.written_prefix, self.maxlen = stream, written_prefix, maxlen
        self.ttl_s = max(WRITTEN_TTL_S, ttl_s)
        self.nolog_prefix = nolog_prefix
        self.buffer: deque[_Entry] = deque()
        # (request id, key id) of opted-out requests; losing the oldest when full only
        # turns their feedback's 409 into a 404, so it is not counted as a drop.
        self.unlogged: deque[tuple[str, str]] = deque(maxlen=buffer_size)
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
            entry = _Entry(
                record.request_id,
                record.to_stream()["data"],
                record.key_id,
                record.version,
                record.sampling.n,
            )
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

    def mark_unlogged(self, request_id: str, key_id: str) -> None:
        """Remember that `request_id` (of `key_id`) opted out of logging; never blocks."""
        if self.nolog_prefix is not None:
            self.unlogged.append((request_id, key_id))
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="promptlog")
        self._task.add_done_callback(_report_end)

    async def close(self, flush_timeout_s: float = 2.0) -> None:
        """Flush what is buffered (bounded wait), then stop."""
        if self._task:
            deadline = asyncio.get_running_loop().time() + flush_timeout_s
            while (
                (self.buffer or self.unlogged)
                and self.redis_ok
                and asyncio.get_running_loop().time() < deadline
            ):
                self._wake.set()
                await asyncio.sleep(0.02)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self.buffer and not self.unlogged:
                self._wake.clear()
                await self._wake.wait()
            if self.unlogged:
                try:
                    await self._write_unlogged()
                except (RedisError, OSError) as e:
                    await self._redis_down(e, failures)
                    failures += 1
                    continue
                except Exception:  # a bug, not Redis: forget these rather than stop logging
                    log.exception("prompt log: opt-out markers could not be written")
                    self.unlogged.clear()
                if not self.buffer:
                    self._redis_back()
                    failures = 0
                    continue
            batch = [self.buffer[i] for i in range(min(BATCH, len(self.buffer)))]
            self._inflight = {id(entry) for entry in batch}
            args: list = [self.maxlen, self.ttl_s]
            for e in batch:
                args += [e.data, e.key_id, e.version, e.n]
            try:
                await self._add_once(
                    keys=[self.stream, *(self.written_prefix + e.request_id for e in batch)],
                    args=args,
                )
            except (RedisError, OSError) as e:
                self._inflight = set()
                self._drop("buffer_full", self._evicted_inflight)  # evicted while it failed
                self._evicted_inflight = 0
                await self._redis_down(e, failures)
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
            self._redis_back()
            failures = 0

    async def _redis_down(self, e: Exception, failures: int) -> None:
        if self.redis_ok:
            log.warning("prompt log: redis unreachable (%s); buffering", e.__class__.__name__)
        self.redis_ok = False
        await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])

    def _redis_back(self) -> None:
        if not self.redis_ok:
            log.warning("prompt log: redis is back; %d records buffered", len(self.buffer))
        self.redis_ok = True

    async def _write_unlogged(self) -> None:
        # Plain SETs are idempotent, so a batch that timed out is simply sent again.
        batch = [self.unlogged[i] for i in range(min(BATCH, len(self.unlogged)))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, key_id in batch:
                pipe.set(self.nolog_prefix + request_id, key_id, ex=self.ttl_s)
            await pipe.execute()
        for item in batch:
            if self.unlogged and self.unlogged[0] is item:
                self.unlogged.popleft()

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
