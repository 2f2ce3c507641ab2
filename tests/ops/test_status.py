"""`strop status` and the data gathering it shares with the dashboard (strop/snapshot.py),
on a real Redis with a fresh key prefix."""

import json
import os
import subprocess
import sys
import time

import pytest

from ops.status import BLOCKS, bucket, render, sparkline
from strop.queues import dead_letter_key
from strop.records import AdapterVersion, Keys, PromotionHalt, PromptLogRecord, SamplingRecord
from strop.registry import Registry
from strop.series import Obs, write_series
from strop.settings import Settings
from strop.snapshot import gather
from tests.conftest import REDIS_URL


@pytest.fixture
def seeded(redis_client, redis_prefix):
    """v1 promoted, v2 promoted on top, v3 rejected; 20 minutes of series; 5 logged
    requests; a learner state."""
    keys, now = Keys(redis_prefix), time.time()
    registry = Registry(redis_client, keys)
    for n in (1, 2, 3):
        registry.add(
            AdapterVersion(
                version=f"v{n}",
                parent="base" if n == 1 else f"v{n - 1}",
                path=f"/adapters/v{n}",
                algorithm="dpo",
                train_metrics={"loss/dpo": 0.7 - n / 10},
                gate={"gate/kl": 0.01 * n, "gate/reward_parent": 3.0, "gate/reward_candidate": 3.5},
            )
        )
    registry.promote("v1")
    registry.promote("v2")
    registry.reject("v3", "kl too high")
    with redis_client.pipeline() as pipe:
        for k in range(20, 0, -1):
            v = "v1" if k > 10 else "v2"
            write_series(
                pipe,
                keys,
                [
                    Obs("reward", v, (0.2 + 0.03 * (20 - k)) * 4, 4),
                    Obs("majority_ratio", v, 0.5 + 0.01 * k),
                    Obs("built", v, label="ttrl", count=2),
                    Obs("pairs", v, count=1),
                    Obs("dropped", v, label="weak_majority"),
                ],
                now - k * 60,
            )
        pipe.execute()
    for i in range(5):
        record = PromptLogRecord(
            request_id=f"r{i}",
            messages=[{"role": "user", "content": "2+2?"}],
            sampling=SamplingRecord(),
            responses=["4"],
            model="strop",
            version="v2",
            prompt_tokens=4,
            completion_tokens=1,
            latency_ms=3.0,
            key_id="anonymous",
        )
        redis_client.xadd(keys.prompt_log, record.to_stream())
    redis_client.hset(
        keys.learner_state,
        mapping={"phase": "training", "step": 3, "updated": now, "metrics": '{"loss/dpo": 0.5}'},
    )
    return keys


def test_sparkline_values_scale_to_blocks_and_gaps_are_spaces():
    assert sparkline([0, 1, None, 2]) == "▁▅ █"
    assert sparkline([5, 5]) == "▁▁"  # a flat line sits at the bottom
    assert sparkline([None, None]) == "  "
    assert sparkline([0, 10], lo=0, hi=20) == BLOCKS[0] + BLOCKS[4]


def test_bucket_many_minutes_fold_into_count_weighted_columns():
    minutes = [0, 60, 120, 180]
    points = [[0, 1.0, 1], [60, 4.0, 3], [180, 2.0, 2]]
    assert bucket(minutes, points, width=2) == [(1.0 + 12.0) / 4, 2.0]
    assert bucket(minutes, points, width=4) == [1.0, 4.0, None, 2.0]


def test_gather_seeded_redis_counts_traffic_and_live_rewards(redis_client, seeded):
    settings = Settings(redis_url=REDIS_URL, redis_prefix=seeded.prefix)

    data = gather(redis_client, settings, window_s=1800)

    assert [v["version"] for v in data["versions"]] == ["v1", "v2", "v3"]
    assert data["promoted"] == "v2" and data["versions"][1]["serving"]
    totals = data["traffic"]["totals"]
    assert (totals["logged"], totals["built"], totals["pairs"], totals["dropped"]) == (
        5,
        40,
        20,
        20,
    )
    assert data["traffic"]["series"]["logged"][-1] == 5  # all written this minute
    assert data["traffic"]["dropped_reasons"] == {"weak_majority": 20}
    assert data["live"]["v2"]["reward"]["count"] == 40
    assert set(data["trends"]["reward"]) == {"v1", "v2"}
    assert data["queues"]["prompt_log"]["length"] == 5 and data["queues"]["build"] == 0
    assert data["learner"]["phase"] == "training" and data["learner"]["metrics"] == {
        "loss/dpo": 0.5
    }
    json.dumps(data)  # the dashboard sends it as is


def test_gather_many_versions_reads_only_the_newest(redis_client, redis_prefix):
    keys = Keys(redis_prefix)
    with redis_client.pipeline() as pipe:
        obs = [Obs("reward", f"v{n}", 1.0) for n in range(1, 16)] + [Obs("reward", "base", 1.0)]
        write_series(pipe, keys, obs, time.time())
        pipe.execute()

    data = gather(redis_client, Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix))

    assert sorted(data["trends"]["reward"]) == sorted(["base"] + [f"v{n}" for n in range(4, 16)])


def test_strop_status_seeded_redis_prints_versions_table_and_sparklines(seeded):
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": seeded.prefix}
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "status", "--window", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "strop -> v2" in lines[0]
    serving = next(line for line in lines if line.startswith("* v2"))
    assert "promoted" in serving and "0.5000" in serving  # loss/dpo of v2
    assert any(
        line.startswith("  v3") and "rejected" in line and "kl too high" in line for line in lines
    )
    reward = [line for line in lines if line.strip().startswith("reward ")]
    assert len(reward) == 2 and all(any(b in line for b in BLOCKS) for line in reward)
    logged = next(line for line in lines if line.strip().startswith("logged"))
    assert "total 5" in logged and BLOCKS[-1] in logged
    assert any("phase training" in line for line in lines)
    assert any(line.strip().startswith("prompt_log") and "length      5" in line for line in lines)


def test_strop_status_json_prints_the_gathered_data(seeded):
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": seeded.prefix}
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["promoted"] == "v2"


def test_strop_status_promotion_halted_shows_collapse_reason(redis_client, seeded):
    registry = Registry(redis_client, seeded)
    registry.halt(
        PromotionHalt(version="v2", rolled_back_to="v1", reason="majority ratio 1.000 >= 0.95")
    )
    settings = Settings(redis_url=REDIS_URL, redis_prefix=seeded.prefix)

    data = gather(redis_client, settings)
    text = render(data)

    assert data["halted"]["version"] == "v2" and data["halted"]["rolled_back_to"] == "v1"
    assert "promotion halted: majority ratio 1.000 >= 0.95" in text
    assert "rolled v2 back to v1" in text and "strop adapters resume" in text
    registry.resume()
    assert gather(redis_client, settings)["halted"] is None


def test_strop_status_dead_letters_shown_with_requeue_hint(redis_client, seeded):
    dead = dead_letter_key(seeded.prefix)
    for i in range(2):
        redis_client.xadd(dead, {"log_id": f"{i}-0", "group_id": f"g{i}", "reason": "unauthorized"})
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": seeded.prefix}

    def status(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ops.cli", "status", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    line = next(x for x in status().splitlines() if "dead letters" in x)
    assert "dead letters 2" in line and "strop worker requeue" in line
    assert json.loads(status("--json"))["queues"]["dead_letter"] == 2


def test_strop_status_feedback_counts_and_label_agreement_line(redis_client, seeded):
    keys, now = Keys(seeded.prefix), time.time()
    with redis_client.pipeline() as pipe:
        obs = [Obs("feedback", "v2", label="up")] * 3 + [Obs("feedback", "v2", label="down")]
        obs += [Obs("feedback", "v2", label="answer")] * 4
        obs += [Obs("feedback_agreement", "v2", x) for x in (1.0, 1.0, 1.0, 0.0)]
        write_series(pipe, keys, obs, now)
        pipe.execute()
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": seeded.prefix}
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("feedback"))
    assert "feedback   8 (answer 4, down 1, up 3)" in line
    assert "label agreement 0.75 of 4" in line


def test_strop_status_lists_untrusted_feedback_key_with_its_rates(redis_client, seeded):
    """What the worker's trust counts leave in Redis (worker/feedback.py), as status shows it."""
    redis_client.hset(
        seeded.feedback_trust,
        mapping={
            "agree:k-good": 18,
            "disagree:k-good": 2,
            "agree:k-bad": 3,
            "disagree:k-bad": 9,
            "disagree:k-new": 2,  # disagrees always, but too few answers to judge
        },
    )
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": seeded.prefix}
    env["STROP_FEEDBACK_TRUST_MIN"] = "10"

    def status(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ops.cli", "status", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    text = status()
    line = next(x for x in text.splitlines() if "untrusted key" in x)
    assert "untrusted key k-bad: disagreed with 9 of 12 clear majorities (75%" in line
    assert "other keys 18%" in line  # 4 of the other 22
    assert "k-good" not in text and "k-new" not in text
    trust = json.loads(status("--json"))["feedback"]["trust"]
    assert trust["keys_rated"] == 3 and [k["key_id"] for k in trust["flagged"]] == ["k-bad"]
