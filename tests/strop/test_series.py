"""The time series (per metric, version and minute, in Redis) the worker writes and the
dashboard, `strop status` and the rollback read."""

from strop.records import Keys
from strop.series import SERIES_TTL_S, Obs, live_reward, minute_of, read_series, write_series

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)


def test_minute_of_returns_start_of_minute():
    assert minute_of(T0) == minute_of(T0 + 59.9) == int(T0)
    assert minute_of(T0 + 60) == int(T0) + 60


def test_read_series_per_version_per_minute(redis_prefix, redis_client):
    r, keys = redis_client, Keys(redis_prefix)
    with r.pipeline() as pipe:
        write_series(pipe, keys, [Obs("reward", "v1", 3.0, 4), Obs("reward", "base", 1.0, 2)], T0)
        write_series(pipe, keys, [Obs("reward", "v1", 1.0, 4)], T0 + 30)  # same minute
        write_series(pipe, keys, [Obs("reward", "v1", 4.0, 4)], T0 + 125)
        write_series(pipe, keys, [Obs("dropped", "v1", label="no_signal")] * 2, T0)
        pipe.execute()

    series = read_series(r, keys, "reward", since=T0 - 60, until=T0 + 180)
    assert sorted(series) == ["base", "v1"]
    assert [(p.minute, p.sum, p.count) for p in series["v1"]] == [(T0, 4.0, 8), (T0 + 120, 4.0, 4)]
    assert series["v1"][0].mean == 0.5 and series["base"][0].mean == 0.5
    only = read_series(r, keys, "reward", version="base", since=T0, until=T0 + 60)
    assert list(only) == ["base"] and only["base"][0].count == 2
    assert read_series(r, keys, "reward", since=T0 + 300, until=T0 + 600)["v1"] == []
    dropped = read_series(r, keys, "dropped", since=T0, until=T0)["v1"]
    assert dropped[0].labels == {"no_signal": 2}
    key = f"{keys.series}reward:v1:{int(T0)}"
    assert 0 < r.ttl(key) <= SERIES_TTL_S


def test_live_reward_reads_reward_series_only(redis_prefix, redis_client):
    r, keys = redis_client, Keys(redis_prefix)
    with r.pipeline() as pipe:
        obs = [Obs("reward", "v2", 2.0, 3), Obs("judge_score", "v2", 4.0), Obs("built", "v3")]
        write_series(pipe, keys, obs, T0)
        pipe.execute()

    live = live_reward(r, keys, since=T0, until=T0 + 60)
    assert list(live) == ["v2"]
    assert [(p.minute, p.sum, p.count) for p in live["v2"]] == [(T0, 2.0, 3)]
    assert live_reward(r, keys, version="v3", since=T0, until=T0 + 60) == {"v3": []}
