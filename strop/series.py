"""The time series the worker writes and the dashboard, `strop status` and the rollback
read: what the worker did, per adapter version and per minute.

Every fact is an `Obs` (metric, version, value, count, label). The worker writes its list
to Redis in the transaction that makes the work durable (so a redelivered task never counts
twice) and then to its Prometheus metrics (`worker/monitor.py`).

Redis layout, one small hash per metric, version and minute, expiring after `SERIES_TTL_S`:

    {prefix}ts:{metric}:{version}:{minute}   sum, count, n:{label} ...
    {prefix}ts:{metric}:versions             set of the versions seen for the metric

`minute` is the epoch second the minute starts at. A dashboard asks `read_series` for
a metric since some time and gets, per version, one point per minute with data.

Metrics (the version is the adapter version that served the user for ingest metrics, and
the one that sampled the group for build metrics):

- counts: ingested, enqueued, dropped (label: reason), built (label: method), pairs,
  paused (version "all": ingest runs that found the queue full), feedback (user feedback
  read by the worker, per version that served the rated reply; label: up, down, answer,
  preferred);
- values (mean = sum / count): reward (per completion, of the groups written: see
  `live_reward`), majority_ratio, extraction_rate (per group), judge_score (per judged
  completion; label: rounded score, a distribution), label_accuracy and reward_accuracy
  (probe prompts only), answer_length (per group: mean tokens of its N samples),
  answer_entropy (per voted group: entropy of its answers' vote, 0 = all agree, 1 = all
  differ): the collapse detector's signals; feedback_agreement (per group with both a
  vote and a user's answer: 1 if the majority label is the user's answer, a live label
  accuracy); trained_majority_ratio, trained_label_accuracy, trained_reward_accuracy
  (the same, for the groups written for training with the vote's label only).
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

from strop.records import Keys

SERIES_TTL_S = 8 * 24 * 3600  # a week of per-minute history, plus a day of slack

COUNT_METRICS = ("ingested", "enqueued", "dropped", "built", "pairs", "paused", "feedback")
VALUE_METRICS = (
    "reward",
    "majority_ratio",
    "extraction_rate",
    "judge_score",
    "label_accuracy",
    "reward_accuracy",
    "answer_length",
    "answer_entropy",
    "feedback_agreement",
)
# written again as trained_{metric} for the groups the vote labelled and the worker wrote
TRAINED_METRICS = ("label_accuracy", "reward_accuracy", "majority_ratio")
VALUE_METRICS += tuple(f"trained_{m}" for m in TRAINED_METRICS)


@dataclass(frozen=True)
class Obs:
    """One observation: `count` events summing to `value`, under an optional label."""

    metric: str
    version: str
    value: float = 1.0
    count: int = 1
    label: str | None = None


@dataclass
class Point:
    """One minute of one metric and version."""

    minute: int
    sum: float
    count: int
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


def minute_of(t: float) -> int:
    return int(t // 60) * 60


def series_key(keys: Keys, metric: str, version: str, minute: int) -> str:
    return f"{keys.series}{metric}:{version}:{minute}"


def versions_key(keys: Keys, metric: str) -> str:
    return f"{keys.series}{metric}:versions"


def write_series(pipe: redis.client.Pipeline, keys: Keys, obs: Iterable[Obs], now: float) -> None:
    """Queue the observations on `pipe` (the caller's transaction executes them)."""
    minute = minute_of(now)
    for o in obs:
        key = series_key(keys, o.metric, o.version, minute)
        pipe.hincrbyfloat(key, "sum", o.value)
        pipe.hincrby(key, "count", o.count)
        if o.label is not None:
            pipe.hincrby(key, f"n:{o.label}", o.count)
        pipe.expire(key, SERIES_TTL_S)
        pipe.sadd(versions_key(keys, o.metric), o.version)
        pipe.expire(versions_key(keys, o.metric), SERIES_TTL_S)


def read_series(
    r: redis.Redis,
    keys: Keys,
    metric: str,
    version: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, list[Point]]:
    """Per version (all of them, or `version`), the minutes of `metric` in [since, until]
    that have data, oldest first. Default window: the last hour."""
    until = time.time() if until is None else until
    since = until - 3600 if since is None else since
    if version is None:
        versions = sorted(_str(v) for v in r.smembers(versions_key(keys, metric)))
    else:
        versions = [version]
    minutes = list(range(minute_of(since), minute_of(until) + 1, 60))
    pipe = r.pipeline(transaction=False)
    for v in versions:
        for m in minutes:
            pipe.hgetall(series_key(keys, metric, v, m))
    rows = iter(pipe.execute())
    out: dict[str, list[Point]] = {}
    for v in versions:
        points = []
        for m in minutes:
            raw = {_str(k): _str(x) for k, x in next(rows).items()}
            if raw:
                labels = {k[2:]: int(x) for k, x in raw.items() if k.startswith("n:")}
                points.append(Point(m, float(raw.get("sum", 0)), int(raw.get("count", 0)), labels))
        out[v] = points
    return out


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def live_reward(
    r: redis.Redis,
    keys: Keys,
    version: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, list[Point]]:
    """Live reward: per behaviour version, the rewards of the completions of the groups that
    were written (dropped groups train nothing and do not count), per minute. The one
    definition the dashboard, `strop status` and the automatic rollback all read."""
    return read_series(r, keys, "reward", version, since, until)
