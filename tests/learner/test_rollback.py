"""Automatic rollback on a live reward drop, and the manual rollback CLI."""

import os
import subprocess
import sys
import time

import pytest

from learner import rollback
from strop.records import AdapterVersion, Keys
from strop.registry import Registry
from strop.series import Obs, write_series
from strop.settings import Settings
from tests.conftest import REDIS_URL

WINDOW, MARGIN, MIN = 600.0, 0.15, 8


@pytest.fixture
def reg(redis_client, redis_prefix):
    keys = Keys(redis_prefix)
    registry = Registry(redis_client, keys)
    for n in (1, 2, 3):
        registry.add(AdapterVersion(version=f"v{n}", parent="base", path=f"/x/v{n}"))
    return registry, keys


def _groups(r, keys, version: str, rewards: list[float], n: int, at: float | None = None) -> None:
    """`n` groups written by the worker, as the live reward sees them: their completions'
    rewards in the time series, at time `at` (default now)."""
    obs = [Obs("reward", version, sum(rewards), len(rewards))] * n
    with r.pipeline(transaction=True) as pipe:
        write_series(pipe, keys, obs, time.time() if at is None else at)
        pipe.execute()


def _check(registry, r, keys, **kw):
    return rollback.check(registry, r, keys, WINDOW, MARGIN, MIN, **kw)


def test_rollback_reward_drop_beyond_margin_rolls_back_to_previous(reg, redis_client):
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0, 1.0, 0.0, 1.0], 3)  # mean 0.75
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [0.0, 1.0, 0.0, 0.0], 3)  # mean 0.25

    verdict = _check(registry, redis_client, keys)

    assert verdict.rolled_back and verdict.version == "v2" and verdict.previous == "v1"
    assert (verdict.new_mean, verdict.previous_mean) == (0.25, 0.75)
    assert registry.promoted() == "v1"
    assert registry.get("v2").status == "rolled_back"
    event = registry.events()[-1]
    assert event.kind == "rolled_back" and event.version == "v2" and event.previous == "v1"
    assert event.reason.startswith("auto: live reward 0.250")
    # the version it went back to came there by rollback: it is not checked again
    assert not _check(registry, redis_client, keys).rolled_back
    assert registry.promoted() == "v1"


def test_rollback_drop_within_margin_keeps_version(reg, redis_client):
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0, 0.0], 5)  # 0.5
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 1)  # 0.4

    verdict = _check(registry, redis_client, keys)

    assert not verdict.rolled_back and verdict.new_mean == pytest.approx(0.4)
    assert registry.promoted() == "v2"


def test_rollback_too_few_samples_waits(reg, redis_client):
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0, 1.0], 5)
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [0.0, 0.0], 3)  # 6 < MIN samples

    verdict = _check(registry, redis_client, keys)

    assert not verdict.rolled_back and verdict.reason == "too few samples yet"
    assert verdict.new_samples == 6 and registry.promoted() == "v2"


def test_rollback_window_over_not_checked(reg, redis_client):
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0], 10)
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [0.0], 10)

    verdict = _check(registry, redis_client, keys, now=time.time() + WINDOW + 1)

    assert not verdict.rolled_back and verdict.reason == "watch window over"
    assert registry.promoted() == "v2"


def test_rollback_previous_base_rolls_back_to_base(reg, redis_client):
    registry, keys = reg
    _groups(redis_client, keys, "base", [1.0, 1.0], 5)
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [0.0, 0.0], 5)

    verdict = _check(registry, redis_client, keys)

    assert verdict.rolled_back and verdict.previous == "base"
    assert registry.promoted() is None  # `strop` serves the base model again


def test_rollback_samples_before_promotion_do_not_count_as_new(reg, redis_client):
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0], 10)
    # a caller pinned strop@v2 before its promotion (live reward counts in minutes)
    _groups(redis_client, keys, "v2", [0.0], 10, at=time.time() - 120)
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [1.0], 10)

    verdict = _check(registry, redis_client, keys)

    assert verdict.new_samples == 10 and verdict.new_mean == 1.0 and not verdict.rolled_back


def test_rollback_defaults_wait_for_eight_groups_not_a_handful_of_prompts(reg, redis_client):
    # A group's 8 rewards share one prompt: 3 hard prompts in a row are no evidence that a
    # version got worse (bench/rollback.py: the old default of 20 rewards rolled an
    # unchanged version back 4% of the time). A drop over 8 groups still rolls back.
    s = Settings()
    registry, keys = reg
    registry.promote("v1")
    _groups(redis_client, keys, "v1", [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 20)  # 0.25
    registry.promote("v2")
    _groups(redis_client, keys, "v2", [0.0] * 8, 3)

    def check():
        return rollback.check(
            registry,
            redis_client,
            keys,
            s.rollback_window_s,
            s.rollback_margin,
            s.rollback_min_samples,
        )

    verdict = check()
    assert verdict.reason == "too few samples yet" and registry.promoted() == "v2"

    _groups(redis_client, keys, "v2", [0.0] * 8, 5)  # 8 groups of nothing right
    verdict = check()
    assert verdict.rolled_back and registry.promoted() == "v1"


def _cli(prefix: str, *argv: str, adapter_dir: str = "adapters") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "STROP_REDIS_URL": REDIS_URL,
        "STROP_REDIS_PREFIX": prefix,
        "STROP_ADAPTER_DIR": adapter_dir,
    }
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "adapters", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_adapters_rollback_moves_pointer_and_records_events(reg, redis_prefix):
    registry, _ = reg
    registry.promote("v1")
    registry.promote("v2")
    registry.promote("v3")

    out = _cli(redis_prefix, "rollback")
    assert out.returncode == 0, out.stderr
    assert "v3 -> v2" in out.stdout and registry.promoted() == "v2"
    assert registry.get("v3").status == "rolled_back"

    out = _cli(redis_prefix, "rollback", "v1")
    assert "v2 -> v1" in out.stdout and registry.promoted() == "v1"

    out = _cli(redis_prefix, "rollback", "v9")
    assert out.returncode == 1 and "unknown version v9" in out.stderr

    listing = _cli(redis_prefix, "list").stdout
    assert "* v1" in listing and "rolled_back" in listing and "strop -> v1" in listing
    kinds = [e.kind for e in registry.events()]
    assert kinds[-2:] == ["rolled_back", "rolled_back"]


def test_cli_adapters_promote_and_show_version_on_disk(reg, redis_prefix, tmp_path):
    registry, _ = reg
    (tmp_path / "v7").mkdir()
    (tmp_path / "v7" / "adapter_config.json").write_text("{}")  # put there by hand

    out = _cli(redis_prefix, "promote", "v7", adapter_dir=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "base -> v7" in out.stdout and registry.promoted() == "v7"
    assert registry.get("v7").reason == "manual (cli)"

    shown = _cli(redis_prefix, "show", "v7", adapter_dir=str(tmp_path))
    assert '"version": "v7"' in shown.stdout and '"status": "promoted"' in shown.stdout
    missing = _cli(redis_prefix, "promote", "v8", adapter_dir=str(tmp_path))
    assert missing.returncode == 1 and "v8 is not in" in missing.stderr
