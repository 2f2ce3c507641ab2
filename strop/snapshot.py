"""What strop is doing, gathered from Redis in one place: the dashboard's JSON
(`GET /dashboard/data`) and the terminal view (`strop status`) both come from `gather`.
Read-only, and free of any part: the service imports it without the worker or Celery.

Sources, all read-only:
- the adapter registry (versions, the promoted pointer, events, and whether the collapse
  guard halted promotion: `halted`, with its reason);
- the worker's per-minute time series (`strop/series.py`: the live reward, majority_ratio,
  judge_score, ... per behaviour version; ingested, built, pairs, dropped counts);
- the prompt log itself, for requests logged per minute (counted inside Redis);
- queue depths: Celery's build and ingest queues, and the consumer-group lag of the prompt
  log (ingest), the groups and the pairs streams (learner);
- the learner's state hash (`Keys.learner_state`), shown as it is, if the learner wrote one;
- user feedback: the worker's `feedback` and `feedback_agreement` series (how often users
  rate, up vs down per version, how often the vote agreed with the users' answers: a live
  label accuracy with no probe file), and the keys whose feedback is no longer trusted
  (`strop/feedback_trust.py`).
"""

import json
import time
from typing import Any

import redis

from strop import feedback_trust
from strop.queues import BUILD_QUEUE, INGEST_QUEUE, queue_length
from strop.records import Keys
from strop.registry import Registry
from strop.series import COUNT_METRICS, VALUE_METRICS, minute_of, read_series, versions_key
from strop.settings import Settings
from strop.versions import is_version, version_number

TREND_METRICS = VALUE_METRICS  # per-minute means, one line per behaviour version
# "logged" is counted from the prompt log itself; the rest are the worker's count metrics
TRAFFIC_METRICS = ("logged", "ingested", "enqueued", "built", "pairs", "dropped")
assert set(TRAFFIC_METRICS[1:]) <= set(COUNT_METRICS)
MIN_WINDOW_S, MAX_WINDOW_S = 60, 24 * 3600
LOGGED_CAP = 20_000  # most prompt-log entries counted per call (the newest are kept)
EVENTS_SHOWN = 20
LEARNER_STALE_S = 120.0  # a learner state older than this is flagged: it may be stopped
# Series are read per version and minute, so the cost grows with both: only the newest
# versions are read (plus `base` and the worker's `all`/`unknown`). Old versions only show
# up again if a caller pins them (`strop@vN`), and a chart of dozens of lines is unreadable.
SERIES_VERSIONS = 12

# Counting entries per minute inside Redis: XREVRANGE in a script returns only the counts,
# not the records (messages and responses), so a poll costs a few bytes on the wire.
_COUNT_PER_MINUTE = """
local entries = redis.call('XREVRANGE', KEYS[1], '+', ARGV[1], 'COUNT', ARGV[2])
local counts, order = {}, {}
for _, e in ipairs(entries) do
  local minute = math.floor(tonumber(string.match(e[1], '^(%d+)')) / 60000) * 60
  if counts[minute] == nil then counts[minute] = 0; table.insert(order, minute) end
  counts[minute] = counts[minute] + 1
end
local out = {#entries}
for _, m in ipairs(order) do table.insert(out, m); table.insert(out, counts[m]) end
return out
"""


def gather(
    r: redis.Redis, settings: Settings, window_s: float = 3600, now: float | None = None
) -> dict[str, Any]:
    """Everything the dashboard and `strop status` show, as a JSON-able dict, over the
    last `window_s` seconds (per-minute series; versions and queues as they are now)."""
    now = time.time() if now is None else now
    window_s = max(MIN_WINDOW_S, min(MAX_WINDOW_S, window_s))
    since = now - window_s
    keys = Keys(settings.redis_prefix)
    registry = Registry(r, keys)
    minutes = list(range(minute_of(since), minute_of(now) + 1, 60))

    trends, live = {}, {}
    for metric in TREND_METRICS:
        per_version = _read(r, keys, metric, since, now)
        trends[metric] = {
            v: [[p.minute, p.mean, p.count] for p in points if p.count]
            for v, points in per_version.items()
            if any(p.count for p in points)
        }
        for v, points in per_version.items():
            total, count = sum(p.sum for p in points), sum(p.count for p in points)
            if count:
                live.setdefault(v, {})[metric] = {"mean": total / count, "count": count}

    traffic: dict[str, list[int]] = {}
    dropped_reasons: dict[str, int] = {}
    for metric in TRAFFIC_METRICS[1:]:
        per_minute = dict.fromkeys(minutes, 0)
        for points in _read(r, keys, metric, since, now).values():
            for p in points:
                per_minute[p.minute] = per_minute.get(p.minute, 0) + p.count
                if metric == "dropped":
                    for reason, n in p.labels.items():
                        dropped_reasons[reason] = dropped_reasons.get(reason, 0) + n
        traffic[metric] = [per_minute[m] for m in minutes]
    logged, capped = _logged_per_minute(r, keys, since)
    traffic = {"logged": [logged.get(m, 0) for m in minutes], **traffic}

    promoted, halt = registry.promoted(), registry.halted()
    versions = [
        {
            "version": v.version,
            "parent": v.parent,
            "status": v.status,
            "serving": v.version == promoted,
            "created": v.created,
            "algorithm": v.algorithm,
            "records": sum(len(ids) for ids in v.consumed.values()),
            "train_metrics": v.train_metrics,
            "gate": v.gate,
            "reason": v.reason,
        }
        for v in registry.all()
    ]
    return {
        "time": now,
        "window_s": window_s,
        "promoted": promoted,
        "halted": halt.model_dump() if halt else None,
        "versions": versions,
        "events": [e.model_dump() for e in registry.events(EVENTS_SHOWN)],
        "live": live,
        "trends": trends,
        "traffic": {
            "minutes": minutes,
            "series": traffic,
            "totals": {k: sum(v) for k, v in traffic.items()},
            "dropped_reasons": dropped_reasons,
            "logged_capped": capped,
        },
        "queues": queues(r, keys, settings),
        "learner": learner_state(r, keys, now),
        "feedback": feedback(r, keys, settings, since, now, sum(traffic["logged"])),
    }


def feedback(
    r: redis.Redis, keys: Keys, settings: Settings, since: float, until: float, logged: int
) -> dict[str, Any]:
    """User feedback the worker read in the window: the total, by kind (up, down, answer,
    preferred), per served version, per logged request (`rate`); how often the majority
    label was the user's answer (`agreement`, overall and per behaviour version); and the
    keys flagged as untrusted (all time, not just the window)."""
    kinds: dict[str, int] = {}
    per_version: dict[str, dict[str, Any]] = {}
    total = 0
    for v, points in _read(r, keys, "feedback", since, until).items():
        row = per_version.setdefault(v, {"total": 0, "kinds": {}})
        for p in points:
            total += p.count
            row["total"] += p.count
            for k, n in p.labels.items():
                kinds[k] = kinds.get(k, 0) + n
                row["kinds"][k] = row["kinds"].get(k, 0) + n
    agree_sum = agree_n = 0.0
    for v, points in _read(r, keys, "feedback_agreement", since, until).items():
        s, n = sum(p.sum for p in points), sum(p.count for p in points)
        if n:
            row = per_version.setdefault(v, {"total": 0, "kinds": {}})
            row["agreement"], row["agreement_n"] = s / n, n
            agree_sum, agree_n = agree_sum + s, agree_n + n
    for row in per_version.values():
        up, down = row["kinds"].get("up", 0), row["kinds"].get("down", 0)
        row["up_share"] = up / (up + down) if up + down else None
        row.setdefault("agreement", None)
        row.setdefault("agreement_n", 0)
    per_version = {v: row for v, row in per_version.items() if row["total"] or row["agreement_n"]}
    return {
        "total": total,
        "kinds": kinds,
        "rate": total / logged if logged else None,
        "agreement": agree_sum / agree_n if agree_n else None,
        "agreement_n": int(agree_n),
        "per_version": per_version,
        "trust": feedback_trust.summary(
            r, keys, settings.feedback_trust_min, settings.feedback_trust_margin
        ),
    }


def _read(r: redis.Redis, keys: Keys, metric: str, since: float, until: float) -> dict:
    """`read_series` for the newest `SERIES_VERSIONS` versions of `metric` (and non-vN ones)."""
    names = [_str(v) for v in r.smembers(versions_key(keys, metric))]
    numbered = [v for v in names if is_version(v)]
    newest = sorted(numbered, key=version_number)[-SERIES_VERSIONS:]
    chosen = [v for v in names if v not in numbered] + newest
    out = {}
    for v in sorted(chosen):
        out |= read_series(r, keys, metric, version=v, since=since, until=until)
    return out


def _logged_per_minute(r: redis.Redis, keys: Keys, since: float) -> tuple[dict[int, int], bool]:
    """Prompt-log entries per minute since `since` (stream ids are write times in ms)."""
    reply = r.eval(_COUNT_PER_MINUTE, 1, keys.prompt_log, str(int(since * 1000)), LOGGED_CAP)
    n, flat = int(reply[0]), [int(x) for x in reply[1:]]
    return dict(zip(flat[::2], flat[1::2], strict=True)), n >= LOGGED_CAP


def queues(r: redis.Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """Work waiting at each hand-over: Celery's queues, and per stream its length, the
    entries its reader has not read yet (lag) and those read but not acknowledged."""
    out: dict[str, Any] = {
        "build": queue_length(r, settings.redis_prefix, BUILD_QUEUE),
        "ingest": queue_length(r, settings.redis_prefix, INGEST_QUEUE),
    }
    for name, stream, group in (
        ("prompt_log", keys.prompt_log, keys.ingest_group),
        ("groups", keys.groups, keys.learner_group),
        ("pairs", keys.pairs, keys.learner_group),
    ):
        info: dict[str, Any] = {"length": r.xlen(stream), "lag": None, "pending": None}
        try:
            for g in r.xinfo_groups(stream):
                g = {_str(k): v for k, v in g.items()}
                if _str(g["name"]) == group:
                    info["lag"], info["pending"] = g.get("lag"), g.get("pending")
        except redis.ResponseError:
            pass  # no such stream yet
        out[name] = info
    return out


def learner_state(r: redis.Redis, keys: Keys, now: float) -> dict[str, Any] | None:
    """The learner's state hash, values decoded (JSON where they are), or None if absent."""
    raw = r.hgetall(keys.learner_state)
    if not raw:
        return None
    state: dict[str, Any] = {}
    for k, v in raw.items():
        v = _str(v)
        try:
            state[_str(k)] = json.loads(v)
        except ValueError:
            state[_str(k)] = v
    updated = state.get("updated")
    if isinstance(updated, int | float):
        state["age_s"] = round(now - updated, 1)
        state["stale"] = now - updated > LEARNER_STALE_S
    return state


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
