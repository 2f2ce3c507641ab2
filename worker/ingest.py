"""Ingest: prompt-log entries become build tasks, through the log's `ingest` consumer group.

One run, in order:

1. backpressure: room = queue_limit - (build tasks waiting); no room, no reading. Entries
   not read stay in the stream, unread, for a later run;
2. claim entries another consumer read but never acknowledged (it died mid-run), once
   they have been idle for `claim_idle_s`, then read new ones, never more than the room;
3. per entry: drop it (bad record, internal request, no prompt, too long for training,
   a duplicate of a prompt seen within `dedupe_window_s`) or enqueue its build task,
   passing the entry id only (the task re-reads the record);
4. acknowledge (XACK) what was dropped or enqueued, with the run's metrics, in one
   transaction. An entry whose enqueue failed stays pending and is claimed again.

A crash between an enqueue and its XACK enqueues the entry a second time later; the
dedupe key remembers which entry claimed a prompt (so the same entry is not its own
duplicate) and the build task is idempotent, so that writes one group.
"""

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from pydantic import ValidationError

from judge.messages import message_text
from strop.connection import ensure_group
from strop.queues import queue_length
from strop.records import SCHEMA_VERSION, PromptLogRecord
from strop.series import Obs, write_series
from worker.context import WorkerContext
from worker.prompts import prompt_hash

log = logging.getLogger("strop.worker.ingest")

STALE_CONSUMER_MS = 3600_000  # a consumer idle this long with nothing pending is forgotten


@dataclass
class IngestReport:
    """What one ingest run did."""

    queue_length: int = 0
    paused: bool = False
    skipped: bool = False  # another ingest run held the lock
    claimed: int = 0
    read: int = 0
    enqueued: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def run_ingest(
    ctx: WorkerContext,
    enqueue: Callable[[str], None],
    claim_idle_s: float | None = None,
) -> IngestReport:
    """One ingest run; `enqueue(log_id)` sends one build task. See the module docstring."""
    s, r, keys = ctx.settings, ctx.redis, ctx.keys
    report = IngestReport()
    claim_idle_ms = int(1000 * (claim_idle_s if claim_idle_s is not None else _claim_idle(s)))
    # one run at a time: two concurrent runs would both see the same room
    # (a run takes well under a second; the timeout frees the lock of a run that died)
    lock = r.lock(
        f"{keys.prefix}ingest:lock", timeout=max(30.0, 4 * s.ingest_interval_s), blocking=False
    )
    if not lock.acquire():
        report.skipped = True
        return report
    try:
        ensure_group(r, keys.prompt_log, keys.ingest_group)
        report.queue_length = queue_length(r, s.redis_prefix)
        ctx.metrics.queue_length.set(report.queue_length)
        room = s.queue_limit - report.queue_length
        if room <= 0:
            report.paused = True
            _commit(ctx, [], [Obs("paused", "all")])
            log.info(
                "ingest paused: %d build tasks queued (limit %d)",
                report.queue_length,
                s.queue_limit,
            )
            return report
        to_read = s.ingest_batch
        first = True
        while to_read > 0 and room > 0:
            want = min(to_read, room)
            entries: list[tuple[str, dict]] = []
            if first:  # a dead consumer's entries first: they are the oldest
                entries = _claim(ctx, want, claim_idle_ms)
                report.claimed = len(entries)
                first = False
            if len(entries) < want:
                entries += _read_new(ctx, want - len(entries))
            if not entries:
                break
            report.read += len(entries)
            to_read -= len(entries)
            enqueued = _process(ctx, entries, enqueue, report)
            room -= enqueued
        _prune_consumers(ctx)
    finally:
        with contextlib.suppress(redis.exceptions.LockError):  # expired: nothing to release
            lock.release()
    if report.read:
        log.info(
            "ingest: read %d (claimed %d), enqueued %d, dropped %s",
            report.read,
            report.claimed,
            len(report.enqueued),
            dict(report.dropped) or "none",
        )
    return report


def _claim_idle(settings) -> float:
    # a live consumer finishes a run within seconds; pending this long means it died
    return max(60.0, 10 * settings.ingest_interval_s)


def _claim(ctx: WorkerContext, count: int, min_idle_ms: int) -> list[tuple[str, dict]]:
    r, keys = ctx.redis, ctx.keys
    _next, entries, deleted = r.xautoclaim(
        keys.prompt_log, keys.ingest_group, ctx.consumer, min_idle_ms, start_id="0-0", count=count
    )
    if deleted:  # trimmed from the log while pending: nothing left to build
        r.xack(keys.prompt_log, keys.ingest_group, *deleted)
    return [(eid, fields) for eid, fields in entries if fields is not None]


def _read_new(ctx: WorkerContext, count: int) -> list[tuple[str, dict]]:
    keys = ctx.keys
    reply = ctx.redis.xreadgroup(
        keys.ingest_group, ctx.consumer, {keys.prompt_log: ">"}, count=count
    )
    return [e for _stream, entries in reply or [] for e in entries]


def _process(
    ctx: WorkerContext,
    entries: list[tuple[str, dict]],
    enqueue: Callable[[str], None],
    report: IngestReport,
) -> int:
    """Drop or enqueue each entry; acknowledge what was handled. Returns how many enqueued."""
    done: list[str] = []
    obs: list[Obs] = []
    enqueued = 0
    try:
        for entry_id, fields in entries:
            version, reason = _triage(ctx, entry_id, fields)
            if reason is None:
                enqueue(entry_id)  # raises if the broker is down: the rest stay pending
                enqueued += 1
                report.enqueued.append(entry_id)
                obs.append(Obs("enqueued", version))
            else:
                report.dropped[reason] += 1
                obs.append(Obs("dropped", version, label=reason))
            obs.append(Obs("ingested", version))
            done.append(entry_id)
    finally:
        _commit(ctx, done, obs)
    return enqueued


def _triage(ctx: WorkerContext, entry_id: str, fields: dict) -> tuple[str, str | None]:
    """(version that served the request, drop reason or None to build)."""
    s, r, keys = ctx.settings, ctx.redis, ctx.keys
    try:
        rec = PromptLogRecord.from_stream(fields)
    except (ValidationError, ValueError, TypeError):
        return "unknown", "bad_record"
    if rec.schema_version != SCHEMA_VERSION:
        return rec.version, "bad_record"
    if rec.internal:  # the service never logs these; a record that says so is not traffic
        return rec.version, "internal"
    if not any(
        m.get("role") == "user" and message_text(m.get("content")).strip() for m in rec.messages
    ):
        return rec.version, "no_prompt"
    # the service counted the chat-templated prompt's tokens when it served the request
    if rec.prompt_tokens > s.max_prompt_tokens:
        return rec.version, "too_long"
    # SET NX GET: claim the prompt for this entry, or learn which entry claimed it
    owner = r.set(
        keys.dedupe + prompt_hash(rec.messages),
        entry_id,
        nx=True,
        ex=max(1, s.dedupe_window_s),
        get=True,
    )
    if owner is not None and owner != entry_id:
        return rec.version, "duplicate"
    return rec.version, None


def _commit(ctx: WorkerContext, done: list[str], obs: list[Obs]) -> None:
    keys = ctx.keys
    with ctx.redis.pipeline(transaction=True) as pipe:
        if done:
            pipe.xack(keys.prompt_log, keys.ingest_group, *done)
        write_series(pipe, keys, obs, time.time())
        pipe.execute()
    ctx.metrics.observe(obs)


def _prune_consumers(ctx: WorkerContext) -> None:
    """Forget consumers (dead worker processes) that hold nothing and were idle long."""
    r, keys = ctx.redis, ctx.keys
    for c in r.xinfo_consumers(keys.prompt_log, keys.ingest_group):
        name = c["name"]
        if name != ctx.consumer and c["pending"] == 0 and c["idle"] > STALE_CONSUMER_MS:
            r.xgroup_delconsumer(keys.prompt_log, keys.ingest_group, name)
