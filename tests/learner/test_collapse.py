"""The collapse guard (learner/collapse.py): the detector on synthetic series, its rollback
and halt on a real Redis, a real learner that stops promoting, and `strop adapters resume`."""

import os
import subprocess
import sys
import time

import pytest

from learner import collapse
from strop.records import AdapterVersion, Keys
from strop.registry import Registry
from strop.series import Obs, Point, write_series
from tests.conftest import REDIS_URL
from tests.learner.harness import pair
from tests.service.harness import make_adapter

MIN_GROUPS, MAJORITY, ENTROPY, FACTOR, WINDOW = 20, 0.95, 0.1, 3.0, 3600.0
THRESHOLDS = dict(
    min_groups=MIN_GROUPS, majority_ratio=MAJORITY, answer_entropy=ENTROPY, length_factor=FACTOR
)


def _series(groups: int, majority: float | None, entropy: float | None, length: float) -> dict:
    """One minute of `groups` groups with these per-group means, as `read_series` gives it."""
    out = {"answer_length": [Point(0, length * groups, groups)]}
    if majority is not None:
        out["majority_ratio"] = [Point(0, majority * groups, groups)]
    if entropy is not None:
        out["answer_entropy"] = [Point(0, entropy * groups, groups)]
    return out


GOOD = _series(40, 0.6, 0.55, 30.0)  # a healthy last good version: 30 tokens an answer


# --- the detector, pure ---------------------------------------------------------------------


def test_detect_unanimous_votes_with_low_entropy_trips():
    verdict = collapse.detect(_series(40, 0.99, 0.02, 28.0), GOOD, **THRESHOLDS)

    assert verdict.collapsed
    assert verdict.reason.startswith("majority ratio 0.990 >= 0.95 with answer entropy 0.020")
    assert verdict.signals["majority_ratio"] == pytest.approx(0.99)
    assert verdict.signals["voted_groups"] == 40


def test_detect_high_majority_with_entropy_above_limit_does_not_trip():
    verdict = collapse.detect(_series(40, 0.96, 0.3, 28.0), GOOD, **THRESHOLDS)

    assert not verdict.collapsed and verdict.reason == "no collapse"


def test_detect_answer_length_collapsed_below_fraction_trips():
    verdict = collapse.detect(_series(40, 0.6, 0.5, 6.0), GOOD, **THRESHOLDS)  # 0.2x

    assert verdict.collapsed and verdict.reason.startswith("mean answer length 6.0 tokens is 0.20x")
    assert verdict.signals["length_ratio"] == pytest.approx(0.2)


def test_detect_answer_length_growing_beyond_factor_trips():
    verdict = collapse.detect(_series(40, None, None, 120.0), GOOD, **THRESHOLDS)  # judge only

    assert verdict.collapsed and "4.00x" in verdict.reason


def test_detect_both_signals_trip_reason_names_both():
    verdict = collapse.detect(_series(40, 1.0, 0.0, 3.0), GOOD, **THRESHOLDS)

    assert verdict.collapsed and "majority ratio" in verdict.reason and "length" in verdict.reason


def test_detect_too_few_groups_does_not_decide():
    few = collapse.detect(_series(MIN_GROUPS - 1, 1.0, 0.0, 1.0), GOOD, **THRESHOLDS)
    no_good = collapse.detect(_series(40, 0.6, 0.5, 1.0), {}, **THRESHOLDS)

    assert not few.collapsed and few.reason.startswith("too few groups yet")
    # the vote is healthy and there is no length to compare with: nothing trips
    assert not no_good.collapsed and no_good.reason == "no collapse"
    assert "length_ratio" not in no_good.signals


def test_detect_healthy_stream_does_not_trip():
    verdict = collapse.detect(_series(40, 0.7, 0.4, 24.0), GOOD, **THRESHOLDS)

    assert not verdict.collapsed and verdict.reason == "no collapse"
    assert verdict.signals["length_ratio"] == pytest.approx(0.8)


# --- on a real Redis --------------------------------------------------------------------------


def _write(r, keys, version: str, groups: int, majority: float, entropy: float, length: float):
    """`groups` groups sampled by `version`, as the worker writes them (one Obs per group)."""
    obs = [Obs("answer_length", version, length), Obs("reward", version, 1.0)]
    obs += [Obs("majority_ratio", version, majority), Obs("answer_entropy", version, entropy)]
    with r.pipeline(transaction=True) as pipe:
        write_series(pipe, keys, obs * groups, time.time())
        pipe.execute()


@pytest.fixture
def reg(redis_client, redis_prefix):
    """v1 (parent base) and v2 (parent v1) registered; v1 promoted with healthy groups."""
    keys = Keys(redis_prefix)
    registry = Registry(redis_client, keys)
    registry.add(AdapterVersion(version="v1", parent="base", path="/x/v1"))
    registry.add(AdapterVersion(version="v2", parent="v1", path="/x/v2"))
    registry.promote("v1")
    _write(redis_client, keys, "v1", 40, 0.6, 0.5, 30.0)
    return registry, keys


def _check(registry, r, keys, **kw):
    return collapse.check(registry, r, keys, WINDOW, **THRESHOLDS, **kw)


def test_check_collapsing_stream_rolls_back_to_last_good_and_halts(reg, redis_client):
    registry, keys = reg
    registry.promote("v2")
    _write(redis_client, keys, "v2", 40, 1.0, 0.0, 4.0)

    verdict = _check(registry, redis_client, keys)

    assert verdict.rolled_back and (verdict.version, verdict.good) == ("v2", "v1")
    assert registry.promoted() == "v1"
    v2 = registry.get("v2")
    assert v2.status == "rolled_back" and v2.reason.startswith("auto: collapse guard tripped:")
    halt = registry.halted()
    assert (halt.version, halt.rolled_back_to) == ("v2", "v1") and halt.reason == verdict.reason
    assert [e.kind for e in registry.events()][-2:] == ["halted", "rolled_back"]
    # v1 came back by rollback: it is not checked (no cascade down to base)
    assert _check(registry, redis_client, keys).reason.startswith("reached by rollback")


def test_check_healthy_stream_keeps_version(reg, redis_client):
    registry, keys = reg
    registry.promote("v2")
    _write(redis_client, keys, "v2", 40, 0.7, 0.4, 26.0)

    verdict = _check(registry, redis_client, keys)

    assert not verdict.collapsed and verdict.reason == "no collapse"
    assert registry.promoted() == "v2" and registry.halted() is None


def test_check_groups_before_promotion_do_not_count(reg, redis_client):
    registry, keys = reg
    # a caller pinned strop@v2 before its promotion and got collapsed answers
    with redis_client.pipeline() as pipe:
        obs = [Obs("majority_ratio", "v2", 1.0), Obs("answer_entropy", "v2", 0.0)] * 40
        write_series(pipe, keys, obs, time.time() - 180)
        pipe.execute()
    registry.promote("v2")

    verdict = _check(registry, redis_client, keys)

    assert not verdict.collapsed and verdict.reason.startswith("too few groups yet: 0 voted")


def test_last_good_skips_rolled_back_and_missing_ancestors(reg):
    registry, _ = reg
    for n in (3, 4):
        registry.add(AdapterVersion(version=f"v{n}", parent=f"v{n - 1}", path=f"/x/v{n}"))
    registry.promote("v2")
    registry.promote("v3")
    registry.rollback(to="v2", reason="manual")  # v3 rolled back
    registry.promote("v4")  # as if v4 had been trained on v3

    assert collapse.last_good(registry, "v4") == "v2"
    assert collapse.last_good(registry, "v4", available=lambda v: v != "v2") == "v1"
    assert collapse.last_good(registry, "v4", available=lambda v: False) == "base"
    assert collapse.last_good(registry, "v1") == "base"


# --- a real learner -----------------------------------------------------------------------------


def test_learner_collapsing_stream_rolls_back_and_decide_does_not_promote_until_resumed(
    make_learner, tiny_model_dir
):
    learner = make_learner(rollback_check_s=0.0, collapse_min_groups=MIN_GROUPS)
    r, keys, registry = learner.r, learner.keys, learner.registry
    for n, parent in ((1, "base"), (2, "v1")):
        make_adapter(learner.store.path(f"v{n}"), tiny_model_dir, seed=n)
        registry.add(AdapterVersion(version=f"v{n}", parent=parent, path=f"v{n}"))
    registry.promote("v1")
    _write(r, keys, "v1", 40, 0.6, 0.5, 30.0)  # v1 answered at length, votes split
    registry.promote("v2")
    learner.start()
    assert learner.policy.parent == "v2"
    # v2's samples all agree, and the answers shrank to a few tokens
    _write(r, keys, "v2", 40, 1.0, 0.0, 3.0)

    learner.housekeeping()

    assert registry.promoted() == "v1"
    assert registry.get("v2").status == "rolled_back"
    halt = registry.halted()
    assert halt.version == "v2" and "majority ratio 1.000" in halt.reason
    events = registry.events()
    assert [e.kind for e in events][-2:] == ["halted", "rolled_back"]
    assert events[-1].reason.startswith("auto: collapse guard tripped: majority ratio")
    learner.rebase()  # the next version trains on top of the last good version
    assert learner.policy.parent == "v1"

    # a candidate trained meanwhile is not promoted, even without a gate run
    meta = AdapterVersion(version="v3", parent="v1", path="", algorithm="dpo")
    learner.store.write(meta, learner.policy.save)
    registry.add(meta)
    decided = learner.lifecycle.decide(meta, candidate="default")
    assert decided.status == "rejected" and registry.get("v3").status == "rejected"
    assert decided.reason.startswith("collapse guard tripped: majority ratio 1.000")
    assert "gate/kl" not in decided.gate and registry.promoted() == "v1"

    # once an operator resumes, a version is gated and promoted again
    assert registry.resume().version == "v2" and registry.halted() is None
    r.xadd(keys.pairs, pair(0).to_stream())
    r.xadd(keys.pairs, pair(1).to_stream())
    assert learner.train_version().status == "promoted"
    assert registry.promoted() == "v4"


def test_learner_healthy_stream_keeps_promoted_version(make_learner, tiny_model_dir):
    learner = make_learner(rollback_check_s=0.0, collapse_min_groups=MIN_GROUPS)
    make_adapter(learner.store.path("v1"), tiny_model_dir, seed=1)
    learner.registry.add(AdapterVersion(version="v1", parent="base", path="v1"))
    _write(learner.r, learner.keys, "base", 40, 0.55, 0.6, 30.0)
    learner.registry.promote("v1")
    _write(learner.r, learner.keys, "v1", 40, 0.7, 0.45, 34.0)

    learner.housekeeping()

    assert learner.registry.promoted() == "v1" and learner.registry.halted() is None
    verdict = learner.check_collapse()
    assert verdict.reason == "no collapse" and verdict.good == "base"


# --- the CLI ------------------------------------------------------------------------------------


def _cli(prefix: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STROP_REDIS_URL": REDIS_URL, "STROP_REDIS_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "adapters", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_adapters_resume_clears_halt_and_list_shows_it(reg, redis_client, redis_prefix):
    registry, keys = reg
    registry.promote("v2")
    _write(redis_client, keys, "v2", 40, 1.0, 0.0, 30.0)
    assert _check(registry, redis_client, keys).rolled_back

    listing = _cli(redis_prefix, "list")
    assert listing.returncode == 0, listing.stderr
    assert "promotion halted: majority ratio 1.000" in listing.stdout

    out = _cli(redis_prefix, "resume")
    assert out.returncode == 0, out.stderr
    assert "promotion resumed (halted since v2: majority ratio" in out.stdout
    assert registry.halted() is None and registry.events()[-1].kind == "resumed"
    assert "not halted" in _cli(redis_prefix, "resume").stdout
    assert "promotion halted" not in _cli(redis_prefix, "list").stdout
