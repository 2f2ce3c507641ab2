"""The learner's input: one Redis stream (pairs or groups) read through a consumer group.

Delivery is at-least-once. A record stays pending until `ack`, which the learner calls only
once the version trained on it is on disk; a restarted learner (same consumer name) first
re-reads its own pending records, then new ones. Pending records of other consumer names
(a renamed learner) are claimed at start: one learner runs per deployment.
"""

import logging
from typing import Generic, TypeVar

import redis
from pydantic import ValidationError

from strop.connection import ensure_group
from strop.records import SCHEMA_VERSION, Record

log = logging.getLogger("strop.learner.feed")

R = TypeVar("R", bound=Record)


class Feed(Generic[R]):
    def __init__(
        self, r: redis.Redis, stream: str, group: str, consumer: str, record_type: type[R]
    ):
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.record_type = record_type
        self.invalid = 0  # records that could not be parsed (acked, never trained on)
        self.lost = 0  # pending records the stream cap trimmed away before we read them
        self._cursor = "0"  # "0": re-read our own pending records first, then ">"

    def setup(self) -> None:
        """Create the consumer group (from the stream's start: records written before the
        learner's first start count) and claim other consumers' pending records."""
        ensure_group(self.r, self.stream, self.group)
        others = [
            c
            for c in self.r.xpending(self.stream, self.group)["consumers"]
            if c["name"] != self.consumer
        ]
        if others:
            start, claimed = "0-0", 0
            while True:
                start, entries, *_ = self.r.xautoclaim(
                    self.stream, self.group, self.consumer, 0, start_id=start, count=500
                )
                claimed += len(entries)
                if start in ("0-0", b"0-0"):
                    break
            log.warning("claimed %d pending records of other consumers", claimed)
        self._cursor = "0"

    def rewind(self) -> None:
        """Re-read our pending records from the first (after a version that consumed some
        could not be saved)."""
        self._cursor = "0"

    def read(self, count: int, block_ms: int) -> list[tuple[str, R]]:
        """Up to `count` records: our pending ones first (after a restart), then new ones,
        waiting at most `block_ms` for new ones."""
        out: list[tuple[str, R]] = []
        while len(out) < count:
            pending = self._cursor != ">"
            resp = self.r.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: self._cursor},
                count=count - len(out),
                block=None if pending else block_ms,
            )
            entries = resp[0][1] if resp else []
            if pending and not entries:
                self._cursor = ">"  # our backlog is drained
                continue
            for raw_id, fields in entries:
                sid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                if pending:
                    self._cursor = sid
                record = self._parse(sid, fields)
                if record is not None:
                    out.append((sid, record))
            if not pending:
                break  # one blocking read per call, so the caller can do housekeeping
        return out

    def _parse(self, sid: str, fields: dict | None) -> R | None:
        if not fields:  # trimmed by the stream cap while pending: nothing left to train on
            self.lost += 1
            self.ack([sid])
            return None
        try:
            record = self.record_type.from_stream(fields)
            if record.schema_version > SCHEMA_VERSION:
                raise ValueError(f"schema_version {record.schema_version} > {SCHEMA_VERSION}")
        except (ValidationError, ValueError) as e:
            # A record we can never parse would otherwise come back after every restart.
            log.warning("dropping unreadable record %s: %s", sid, str(e)[:200])
            self.invalid += 1
            self.ack([sid])
            return None
        return record

    def ack(self, ids: list[str]) -> int:
        if not ids:
            return 0
        acked = 0
        for i in range(0, len(ids), 1000):
            acked += self.r.xack(self.stream, self.group, *ids[i : i + 1000])
        return acked

    def pending_ids(self) -> set[str]:
        """Every id delivered to the group and not acknowledged yet."""
        found: set[str] = set()
        start = "-"
        while True:
            rows = self.r.xpending_range(self.stream, self.group, min=start, max="+", count=1000)
            for row in rows:
                mid = row["message_id"]
                found.add(mid.decode() if isinstance(mid, bytes) else mid)
            if len(rows) < 1000:
                return found
            last = rows[-1]["message_id"]
            last = last.decode() if isinstance(last, bytes) else last
            ms, seq = last.split("-")
            start = f"{ms}-{int(seq) + 1}"
