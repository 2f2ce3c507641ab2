"""`strop status`: what strop is doing, in a terminal (the data is `strop.snapshot.gather`,
the same the dashboard draws)."""

import json
import shutil
import sys
import time
from typing import Any

import redis

from strop.connection import connect
from strop.queues import dead_letter_length
from strop.settings import Settings
from strop.snapshot import gather

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
        *_halted(data.get("halted"), now),
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

    lines += _feedback(data.get("feedback"))

    q = data["queues"]
    lines += ["", "Queues", f"  build tasks {q['build']}   ingest tasks {q['ingest']}"]
    if q.get("dead_letter"):
        lines.append(
            f"  dead letters {q['dead_letter']}   builds that failed for good: fix the cause "
            "(worker log), then `strop worker requeue`"
        )
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


def _feedback(fb: dict | None) -> list[str]:
    """The feedback line, up vs down per version, and the keys whose feedback is ignored."""
    if not fb:
        return []
    lines = []
    if fb["total"] or fb["agreement_n"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(fb["kinds"].items()))
        agree, rate = fb["agreement"], fb["rate"]
        lines.append(
            f"  feedback   {fb['total']} ({kinds})   label agreement "
            + (f"{agree:.2f} of {fb['agreement_n']}" if agree is not None else "-")
            + (f"   {rate:.1%} of logged requests rated" if rate is not None else "")
        )
        for v, row in sorted(fb["per_version"].items()):
            up, down = row["kinds"].get("up", 0), row["kinds"].get("down", 0)
            share = f"{row['up_share']:.0%} up" if row["up_share"] is not None else "-"
            agree_v = row["agreement"]
            lines.append(
                f"    {v:8} up {up} / down {down} ({share})   label agreement "
                + (f"{agree_v:.2f} of {row['agreement_n']}" if agree_v is not None else "-")
            )
    for k in (fb.get("trust") or {}).get("flagged", []):
        rest = k["rest_rate"]
        lines.append(
            f"  untrusted key {k['key_id']}: disagreed with {k['disagree']} of {k['rated']} "
            f"clear majorities ({k['rate']:.0%}, other keys {rest:.0%}); its feedback is "
            "ignored and weighs 1"
        )
    return lines


def _halted(halt: dict | None, now: float) -> list[str]:
    """The collapse guard's halt, if set: the first thing an operator must see."""
    if not halt:
        return []
    return [
        "",
        f"promotion halted: {halt['reason']}",
        f"  the collapse guard rolled {halt['version']} back to {halt['rolled_back_to']} "
        f"{_ago(now - halt['time'])}; `strop adapters resume` allows promotions again",
    ]


def _live(stat: dict | None) -> str:
    return f"{stat['mean']:.3f} ({stat['count']})" if stat else "-"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def run(settings: Settings, window_s: float, watch: float | None, as_json: bool) -> int:
    """`strop status`: print once, or every `watch` seconds until interrupted."""
    r = connect(settings.redis_url)
    try:
        while True:
            try:
                data = gather(r, settings, window_s)
                data["queues"]["dead_letter"] = dead_letter_length(r, settings.redis_prefix)
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
