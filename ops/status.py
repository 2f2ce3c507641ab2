"""What strop is doing, gathered from Redis in one place: the dashboard's JSON
(`GET /dashboard/data`) and the terminal view (`strop status`) both come from `gather`.

Sources, all read-only:
- the adapter registry (versions, the promoted pointer, events);
- the worker's per-minute time series (`worker/monitor.py`: reward, majority_ratio,
  judge_score, ... per behaviour version; ingested, built, pairs, dropped counts);
- the prompt log itself, for requests logged per minute (counted inside Redis);
- queue depths: Celery's build and ingest queues, and the consumer-group lag of the prompt
  log (ingest), the groups and the pairs streams (learner);
- the learner's state hash (`Keys.learner_state`), shown as it is, if the learner wrote one.
"""

import json
import shutil
import sys
import time
from typing import Any

import redis

from strop.records import Keys
from strop.registry import Registry
from strop.settings import Settings
from worker.app import BUILD_QUEUE, INGEST_QUEUE, queue_length
from worker.monitor import COUNT_METRICS, VALUE_METRICS, minute_of, read_series, versions_key

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

    promoted = registry.promoted()
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
    }


def _read(r: redis.Redis, keys: Keys, metric: str, since: float, until: float) -> dict:
    """`read_series` for the newest `SERIES_VERSIONS` versions of `metric` (and non-vN ones)."""
    names = [_str(v) for v in r.smembers(versions_key(keys, metric))]
    numbered = [v for v in names if v.startswith("v") and v[1:].isdigit()]
    newest = sorted(numbered, key=lambda v: int(v[1:]))[-SERIES_VERSIONS:]
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
        "build": queue_length(r, settings, BUILD_QUEUE),
        "ingest": queue_length(r, settings, INGEST_QUEUE),
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


# --- the terminal view ------------------------------------------------------------------

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], lo: float | None = None, hi: float | None = None) -> str:
    """One block per value, scaled between `lo` and `hi` (default: the values' own range);
    None (no data) is a space.

    >>> sparkline([0, 1, None, 2])
    '▁▅ █'
    """
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    lo = min(known) if lo is None else lo
    hi = max(known) if hi is None else hi
    span = hi - lo
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            level = 0 if span <= 0 else round((v - lo) / span * (len(BLOCKS) - 1))
            out.append(BLOCKS[max(0, min(len(BLOCKS) - 1, level))])
    return "".join(out)


def bucket(
    minutes: list[int], points: list[list], width: int, mean: bool = True
) -> list[float | None]:
    """Per-minute points ([minute, value, count]) folded into at most `width` columns
    over `minutes`: count-weighted means (or sums), None where a column has no data."""
    if not minutes:
        return []
    per = max(1, -(-len(minutes) // width))  # minutes per column, rounded up
    cols = -(-len(minutes) // per)
    sums, counts = [0.0] * cols, [0] * cols
    for minute, value, count in points:
        i = (minute - minutes[0]) // 60 // per
        if 0 <= i < cols and value is not None:
            sums[i] += value * count if mean else value
            counts[i] += count
    if mean:
        return [s / c if c else None for s, c in zip(sums, counts, strict=True)]
    return [s if c else None for s, c in zip(sums, counts, strict=True)]


def _num(x: Any, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, int | float) else "-"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def render(data: dict[str, Any], width: int = 48) -> str:
    """The gathered data as plain text for a terminal."""
    now, minutes = data["time"], data["traffic"]["minutes"]
    window = data["window_s"]
    lines = [
        f"strop status  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
        f"   strop -> {data['promoted'] or 'base'}   window {window / 60:.0f} min",
        "",
        "Adapter versions (* = serving)",
        f"  {'version':8} {'status':12} {'parent':7} {'created':10} {'algo':5} "
        f"{'records':>7} {'loss':>8} {'gate kl':>8} {'gate reward':>12} {'live reward':>14}  reason",
    ]
    for v in reversed(data["versions"]):  # newest first
        tm, g = v["train_metrics"], v["gate"]
        loss = next((x for k, x in tm.items() if k.startswith("loss/")), None)
        gate_reward = (
            f"{g['gate/reward_parent']:.2f}->{g['gate/reward_candidate']:.2f}"
            if "gate/reward_candidate" in g and "gate/reward_parent" in g
            else "-"
        )
        live_s = _live(data["live"].get(v["version"], {}).get("reward"))
        mark = "*" if v["serving"] else " "
        lines.append(
            f"{mark} {v['version']:8} {v['status']:12} {v['parent']:7} "
            f"{_ago(now - v['created']):10} {v['algorithm'] or '-':5} {v['records']:>7} "
            f"{_num(loss, '.4f'):>8} {_num(g.get('gate/kl'), '.3g'):>8} {gate_reward:>12} "
            f"{live_s:>14}  {v['reason'] or ''}"
        )
    base = data["live"].get("base", {}).get("reward")
    if base:
        mark = " " if data["promoted"] else "*"
        lines.append(
            f"{mark} {'base':8} {'(no adapter)':12} {'-':7} {'-':10} {'-':5} {'-':>7} {'-':>8} "
            f"{'-':>8} {'-':>12} {_live(base):>14}"
        )
    if not data["versions"]:
        lines.append("  (no versions yet: `strop` serves the base model)")

    lines += ["", f"Reward trends per version (last {window / 60:.0f} min, oldest left)"]
    shown = False
    for metric in ("reward", "majority_ratio", "judge_score"):
        for version, points in sorted(data["trends"].get(metric, {}).items()):
            values = bucket(minutes, points, width)
            known = [x for x in values if x is not None]
            lo, hi = min(known), max(known)
            lines.append(
                f"  {metric:15} {version:6} {sparkline(values)}  "
                f"{lo:.2f}..{hi:.2f} last {known[-1]:.2f}"
            )
            shown = True
    if not shown:
        lines.append("  (no rewards yet: the worker has built no groups in this window)")

    lines += ["", "Traffic per minute (logged = requests in the prompt log)"]
    totals = data["traffic"]["totals"]
    for metric, series in data["traffic"]["series"].items():
        values = bucket(minutes, [[m, n, 1] for m, n in zip(minutes, series, strict=True)], width)
        values = [0.0 if x is None else x for x in values]
        lines.append(
            f"  {metric:10} {sparkline(values, lo=0)}  total {totals[metric]}"
            f"  peak {max(series, default=0)}/min"
        )
    if data["traffic"]["dropped_reasons"]:
        reasons = ", ".join(
            f"{k} {n}" for k, n in sorted(data["traffic"]["dropped_reasons"].items())
        )
        lines.append(f"  dropped by reason: {reasons}")

    q = data["queues"]
    lines += ["", "Queues", f"  build tasks {q['build']}   ingest tasks {q['ingest']}"]
    for name in ("prompt_log", "groups", "pairs"):
        s = q[name]
        lines.append(
            f"  {name:10} length {s['length']:>6}   unread {_num(s['lag'], 'd'):>6}"
            f"   pending {_num(s['pending'], 'd'):>6}"
        )

    lines += ["", "Learner"]
    state = data["learner"]
    if state is None:
        lines.append("  (no state in Redis: the learner has not run)")
    else:
        flag = "  (stale: the learner may be stopped)" if state.get("stale") else ""
        lines.append(
            f"  phase {state.get('phase', '?')}   updated {_ago(state.get('age_s', 0))}{flag}"
        )
        rest = {
            k: v
            for k, v in state.items()
            if k not in ("phase", "updated", "age_s", "stale") and not isinstance(v, dict)
        }
        lines.append("  " + "   ".join(f"{k} {v}" for k, v in sorted(rest.items())))
        for k, v in sorted(state.items()):
            if isinstance(v, dict) and v:
                lines.append(f"  {k}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()))
    return "\n".join(line.rstrip() for line in lines)


def _live(stat: dict | None) -> str:
    return f"{stat['mean']:.3f} ({stat['count']})" if stat else "-"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def run(settings: Settings, window_s: float, watch: float | None, as_json: bool) -> int:
    """`strop status`: print once, or every `watch` seconds until interrupted."""
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        while True:
            try:
                data = gather(r, settings, window_s)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                print(f"strop: Redis is unreachable at {settings.redis_url}: {e}", file=sys.stderr)
                if not watch:
                    return 1
            else:
                cols = shutil.get_terminal_size((120, 40)).columns
                text = json.dumps(data, indent=2) if as_json else render(data, _width(cols))
                if watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # clear the screen, cursor home
                print(text, flush=True)
            if not watch:
                return 0
            time.sleep(watch)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C in --watch, or `| head`
        return 0
    finally:
        r.close()


def _width(columns: int) -> int:
    # the sparkline sits between ~25 columns of labels and ~25 of numbers
    return max(12, min(60, columns - 50))
