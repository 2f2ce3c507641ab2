"""The adapter registry in Redis: every version with its status, the promoted pointer, and
an event for each change (appended to a stream for history, published for wake-ups).

Statuses: candidate -> promoted | rejected; promoted -> rolled_back. The pointer
(`Keys.promoted`) names the version `strop` serves; no pointer means the base model.

Promotion can be halted (`Keys.halted`, a `PromotionHalt`): the collapse guard sets it when
it rolls a collapsing version back (learner/collapse.py), the learner promotes nothing while
it is set, and an operator clears it (`strop adapters resume`).
"""

import redis

from strop.records import AdapterVersion, Keys, PromotionHalt, RegistryEvent
from strop.versions import version_name, version_number

EVENTS_MAXLEN = 10_000
# Decrement the version counter only if it still stands at ARGV[1] (nothing handed out since).
_RELEASE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') == tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 1
end
return 0
"""


class Registry:
    def __init__(self, r: redis.Redis, keys: Keys):
        self.r, self.keys = r, keys

    # --- reading ----------------------------------------------------------------------

    def get(self, version: str) -> AdapterVersion | None:
        raw = self.r.hget(self.keys.versions, version)
        return AdapterVersion.model_validate_json(raw) if raw else None

    def all(self) -> list[AdapterVersion]:
        """Every version, oldest first."""
        found = [AdapterVersion.model_validate_json(v) for v in self.r.hvals(self.keys.versions)]
        return sorted(found, key=lambda v: version_number(v.version))

    def promoted(self) -> str | None:
        raw = self.r.get(self.keys.promoted)
        return raw.decode() if isinstance(raw, bytes) else raw

    def events(self, count: int = 100) -> list[RegistryEvent]:
        """The latest events, newest last."""
        entries = self.r.xrevrange(self.keys.events, count=count)
        return [RegistryEvent.from_stream(f) for _, f in reversed(entries)]

    def arrival(self, version: str, scan: int = 1000) -> RegistryEvent | None:
        """The event that put `version` under the pointer: its promotion, or the rollback
        to it (None if not among the latest `scan` events)."""
        return next(
            (
                e
                for e in reversed(self.events(count=scan))
                if (e.kind == "promoted" and e.version == version)
                or (e.kind == "rolled_back" and e.previous == version)
            ),
            None,
        )

    def halted(self) -> PromotionHalt | None:
        """Why promotion is halted, or None if it is not."""
        raw = self.r.get(self.keys.halted)
        return PromotionHalt.model_validate_json(raw) if raw else None

    # --- changing ---------------------------------------------------------------------

    def next_version(self, at_least: int = 1) -> str:
        """A version name never handed out before (also above any found on disk)."""
        n = self.r.incr(self.keys.next_version)
        if n < at_least:
            self.r.set(self.keys.next_version, at_least)
            n = at_least
        return version_name(n)

    def release_version(self, version: str) -> bool:
        """Hand `version` back if it is the last name handed out; only for one that was
        never published (its save failed before the rename). True if it was."""
        return bool(self.r.eval(_RELEASE, 1, self.keys.next_version, version_number(version)))

    def add(self, version: AdapterVersion) -> None:
        """Record a new candidate (or re-record one, e.g. after a learner restart)."""
        self.r.hset(self.keys.versions, version.version, version.model_dump_json())
        self._event("candidate", version.version)

    def reject(self, version: str, reason: str, gate: dict | None = None) -> None:
        self._set_status(version, "rejected", reason=reason, gate=gate)
        self._event("rejected", version, reason=reason)

    def promote(
        self, version: str, gate: dict | None = None, reason: str | None = None
    ) -> str | None:
        """Move the pointer to `version`; returns the version it pointed to before."""
        previous = self.promoted()
        self._set_status(version, "promoted", gate=gate, reason=reason)
        self.r.set(self.keys.promoted, version)
        self._event("promoted", version, previous=previous, reason=reason)
        return previous

    def rollback(
        self, to: str | None = None, reason: str = "manual"
    ) -> tuple[str | None, str | None]:
        """Mark the promoted version rolled back and point at `to` (a version, or `base`
        for the base model), by default the newest earlier promoted version (or the base
        model). Returns (from, to); `to` is None for the base model."""
        current = self.promoted()
        if to == "base":
            to = None
        elif to is None:
            earlier = [
                v
                for v in self.all()
                if v.status == "promoted"
                and v.version != current
                and (current is None or version_number(v.version) < version_number(current))
            ]
            to = earlier[-1].version if earlier else None
        elif self.get(to) is None:
            raise KeyError(f"unknown version {to}")
        if current is not None:
            self._set_status(current, "rolled_back", reason=reason)
        if to is None:
            self.r.delete(self.keys.promoted)
        else:
            self._set_status(to, "promoted")
            self.r.set(self.keys.promoted, to)
        self._event("rolled_back", current or "base", previous=to, reason=reason)
        return current, to

    def halt(self, halt: PromotionHalt) -> None:
        """Stop promotions until `resume` (the collapse guard calls it after its rollback)."""
        self.r.set(self.keys.halted, halt.model_dump_json())
        self._event("halted", halt.version, previous=halt.rolled_back_to, reason=halt.reason)

    def resume(self, reason: str = "manual") -> PromotionHalt | None:
        """Allow promotions again; returns the halt it cleared (None: none was set)."""
        halt = self.halted()
        if halt is not None:
            self.r.delete(self.keys.halted)
            self._event("resumed", halt.version, reason=reason)
        return halt

    def _set_status(
        self, version: str, status: str, reason: str | None = None, gate: dict | None = None
    ) -> None:
        v = self.get(version)
        if v is None:
            raise KeyError(f"unknown version {version}")
        v.status = status
        if reason is not None:
            v.reason = reason
        if gate is not None:
            v.gate = gate
        self.r.hset(self.keys.versions, version, v.model_dump_json())

    def _event(
        self, kind: str, version: str, previous: str | None = None, reason: str | None = None
    ) -> None:
        event = RegistryEvent(kind=kind, version=version, previous=previous, reason=reason)
        self.r.xadd(self.keys.events, event.to_stream(), maxlen=EVENTS_MAXLEN, approximate=True)
        self.r.publish(self.keys.events_channel, event.model_dump_json())
