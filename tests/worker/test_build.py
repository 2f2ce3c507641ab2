"""Build against the real service: idempotent writes, the version that sampled, the live
reward of written groups only, the judge path, and retries while the service is unreachable."""

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_retry

from judge import extract_answers
from strop.records import Keys, ScoredGroup
from strop.series import Obs, live_reward, read_series
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread
from tests.worker.conftest import WORKER, log_record, wait_until
from worker.app import create_app
from worker.build import Samples, build_group, commit, group_id, score_gold, score_ttrl
from worker.context import make_context, release_contexts


def groups_of(r, keys: Keys, log_id: str) -> list[ScoredGroup]:
    return [
        g for _, f in r.xrange(keys.groups) if (g := ScoredGroup.from_stream(f)).log_id == log_id
    ]


def test_build_group_concurrent_runs_write_one_group(ctx, r):
    log_id = r.xadd(ctx.keys.prompt_log, log_record("Pick: 1 or 2?"))
    # three deliveries of one task at once (a redelivery racing the original)
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda _: build_group(ctx, log_id), range(3)))
    first = [o for o in outcomes if not o.startswith("already:")]
    assert len(first) == 1 and first[0] in ("built", "no_signal")
    assert len(groups_of(r, ctx.keys, log_id)) == (first[0] == "built")
    assert build_group(ctx, log_id) == f"already:{first[0]}"
    # counted once, however often it ran (the reward only if the group was written)
    assert sum(pt.count for pt in read_series(r, ctx.keys, "extraction_rate")["base"]) == 1
    counted = live_reward(r, ctx.keys).get("base", [])
    assert sum(pt.count for pt in counted) == (9 if first[0] == "built" else 0)


def test_commit_existing_marker_writes_nothing(ctx, r):
    group = ScoredGroup(
        group_id="g1",
        log_id="1-0",
        messages=[{"role": "user", "content": "q"}],
        completions=["1", "2"],
        rewards=[1.0, 0.0],
        version="base",
        method="ttrl",
    )
    assert commit(ctx, "g1", group, None, [Obs("built", "base", label="ttrl")], "built")
    assert not commit(ctx, "g1", group, None, [Obs("built", "base", label="ttrl")], "built")
    assert r.xlen(ctx.keys.groups) == 1
    assert sum(pt.count for pt in read_series(r, ctx.keys, "built")["base"]) == 1


def test_build_group_promoted_version_recorded_and_pinned(service, ctx, r):
    """N = 9 needs two requests (the service allows n <= 8): both come from v1."""
    r.set(ctx.keys.promoted, "v1")
    oa = openai.OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0)

    def serves_v1() -> bool:
        resp = oa.chat.completions.create(
            model="strop",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
            extra_headers={"X-Strop-Internal": "1"},
        )
        return resp.model == "strop@v1"

    assert wait_until(serves_v1, timeout=30, interval=0.2)
    log_id = r.xadd(ctx.keys.prompt_log, log_record("Pick: 1 or 2?"))
    outcome = build_group(ctx, log_id)
    assert outcome in ("built", "no_signal")
    assert set(read_series(r, ctx.keys, "extraction_rate")) == {"v1"}
    if outcome == "built":
        (g,) = groups_of(r, ctx.keys, log_id)
        assert g.version == "v1" and len(g.completions) == 9
        assert set(live_reward(r, ctx.keys)) == {"v1"}


def test_build_group_dropped_adds_no_live_reward_built_adds_its_rewards(ctx, worker_settings, r):
    keys = ctx.keys
    # only a unanimous vote passes a majority ratio of 1.0, and a unanimous one has no
    # signal: every group of this context is dropped
    strict = make_context(worker_settings.model_copy(update={"min_majority_ratio": 1.0}))
    try:
        dropped_id = r.xadd(keys.prompt_log, log_record("Drop me: 1 or 2?"))
        assert build_group(strict, dropped_id) in ("weak_majority", "no_signal")
    finally:
        strict.redis.close()
        strict.service.close()
    assert live_reward(r, keys) == {}
    reward_count = {"version": "base"}
    assert (
        strict.metrics.registry.get_sample_value("strop_worker_reward_count", reward_count) is None
    )
    # what scoring measured is still recorded, and the drop is counted
    assert sum(pt.count for pt in read_series(r, keys, "majority_ratio")["base"]) == 1
    assert sum(pt.count for pt in read_series(r, keys, "extraction_rate")["base"]) == 1
    assert sum(pt.count for pt in read_series(r, keys, "dropped")["base"]) == 1
    assert read_series(r, keys, "trained_majority_ratio") == {}  # not trained on

    for i in range(3):  # nine coin flips all agree (no signal) with p = 2/512
        log_id = r.xadd(keys.prompt_log, log_record(f"Keep me {i}: 1 or 2?"))
        if build_group(ctx, log_id) == "built":
            break
    else:
        pytest.fail("three unanimous groups in a row: p = 6e-8")
    (g,) = groups_of(r, keys, log_id)
    live = live_reward(r, keys)
    assert list(live) == ["base"]
    assert sum(pt.count for pt in live["base"]) == len(g.rewards) == 9
    assert sum(pt.sum for pt in live["base"]) == sum(g.rewards)
    assert ctx.metrics.registry.get_sample_value("strop_worker_reward_count", reward_count) == 1
    # the trained-on series count the built group only, with its own majority ratio
    (trained,) = read_series(r, keys, "trained_majority_ratio")["base"]
    assert (trained.count, trained.sum) == (1, pytest.approx(g.majority_ratio))


def test_build_auto_gibberish_uses_judge_and_drops_unscored(settings, tiny_engine, r):
    """The tiny random model's answers carry no answer, so `auto` sends them to the judge,
    whose gibberish judgments carry no score: nothing is written, and why is counted."""
    with ServerThread(settings, tiny_engine) as server:
        s = settings.model_copy(
            update={
                **WORKER,
                "reward_method": "auto",
                "n_votes": 4,
                "n_train": 2,
                "judge_k": 2,
                "sample_max_tokens": 8,
                "service_url": server.url,
                "service_api_key": API_KEY,
            }
        )
        c = make_context(s)
        log_id = r.xadd(c.keys.prompt_log, log_record("Write a haiku about rain."))
        assert build_group(c, log_id) == "unscored"
        requests = server.service.metrics.registry.get_sample_value(
            "strop_requests_total", {"version": "base", "status": "200"}
        )
    assert requests == 1 + 2  # one sampling request (n=4), one judging request per kept answer
    assert r.xlen(c.keys.groups) == 0
    dropped = read_series(r, c.keys, "dropped")["base"]
    assert sum(pt.labels.get("unscored", 0) for pt in dropped) == 1
    assert read_series(r, c.keys, "extraction_rate")["base"][-1].mean == 0.0
    assert r.get(c.keys.built + group_id(log_id, s)) == "unscored"


def test_build_service_unreachable_retries_then_builds(settings, voter_engine, r):
    server = ServerThread(settings, voter_engine)  # its port is chosen, nothing listens yet
    s = settings.model_copy(
        update={**WORKER, "service_url": server.url, "service_api_key": API_KEY}
    )
    keys = Keys(s.redis_prefix)
    log_id = r.xadd(keys.prompt_log, log_record("Pick: 1 or 2?"))
    app = create_app(s)
    failures = []

    def on_retry(request=None, reason=None, **_) -> None:
        failures.append(reason)

    task_retry.connect(on_retry, weak=False)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            app.send_task("worker.build_group", args=[log_id])
            assert wait_until(lambda: failures, timeout=20)
            assert "Connection error" in str(failures[0].exc)  # openai's APIConnectionError
            time.sleep(0.5)
            with server:  # the service comes up; the next retry (after backoff) builds
                assert wait_until(lambda: r.exists(keys.built + group_id(log_id, s)), timeout=40)
    finally:
        task_retry.disconnect(on_retry)
        release_contexts(app)
        app.close()
    assert r.get(keys.built + group_id(log_id, s)) in ("built", "no_signal")


def test_score_gold_rewards_answers_equal_to_known_answer_first_g_kept():
    texts = ("7 + 5 = 12", "The answer is 12.", "11", "twelve?", "12")
    samples = Samples("base", "base", texts, ((),) * len(texts))
    answers = extract_answers(list(texts))

    scored = score_gold(samples, answers, gold="12", n_train=4)

    assert scored.method == "gold" and scored.drop is None
    assert scored.rewards == (1.0, 1.0, 0.0, 0.0) and scored.kept == (0, 1, 2, 3)


def test_score_gold_keeps_a_right_answer_sampled_after_the_first_g():
    # a weak model: one right answer in eight, the last; the first four alone teach nothing
    texts = ("11", "13", "11", "10", "14", "11", "13", "12")
    samples = Samples("base", "base", texts, ((),) * len(texts))

    scored = score_gold(samples, extract_answers(list(texts)), gold="12", n_train=4)

    assert scored.drop is None and scored.kept == (0, 1, 2, 7)
    assert scored.rewards == (0.0, 0.0, 0.0, 1.0)


def test_score_gold_rewards_the_known_answer_only_by_working_that_holds():
    # as a vote's or a user's label: ending on the right number after a false step, or
    # stating the right result and ending on another, earns nothing
    prompt = "What is 9 + 4?"
    texts = ("9 + 4 = 13, so 13.", "9 + 4 = 12, so 13.", "13", "9 + 4 = 13, or 7")
    samples = Samples("base", "base", texts, ((),) * len(texts))

    scored = score_gold(samples, extract_answers(list(texts)), "13", n_train=4, prompt=prompt)

    assert scored.drop is None and scored.rewards == (1.0, 0.0, 1.0, 0.0)


def test_score_gold_unknown_prompt_dropped_unscored_all_right_no_signal():
    samples = Samples("base", "base", ("12", "12"), ((), ()))
    answers = extract_answers(["12", "12"])
    assert score_gold(samples, answers, gold=None, n_train=2).drop == "unscored"
    assert score_gold(samples, answers, gold="12", n_train=2).drop == "no_signal"


def test_score_ttrl_one_true_equation_labels_a_group_a_lone_final_answer_does_not():
    prompt = "16 + 4 = ?"  # replies SmolLM2-135M gave (bench samples, T=1), shortened
    texts = (
        "16 + 4 = 18. So the answer is 18.",  # its own working is false: no vote, no reward
        "The sum is 16 + 4 = 20.",
        "16 + 4 = 10",
        "We add them up: 4",
        "The answer is 20.",  # no working, ends on the label: rewarded
        "16 × 4 = 64 is a product.",  # true, but alone against 20's one vote: a tie
        "I think 16",
        "Adding gives 6.",
    )
    samples = Samples("base", "base", texts, ((),) * len(texts))
    answers = extract_answers(list(texts))

    tied = score_ttrl(samples, answers, 8, 0.25, prompt, min_verified_votes=1)
    assert tied.drop == "tie"

    texts = texts[:5] + ("16 plus 4 makes 16 + 4 = 20",) + texts[6:]
    samples = Samples("base", "base", texts, ((),) * len(texts))
    answers = extract_answers(list(texts))
    scored = score_ttrl(samples, answers, 8, 0.25, prompt, min_verified_votes=1)
    assert scored.drop is None and scored.vote.label == "20"
    assert scored.rewards == (0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    strict = score_ttrl(samples, answers, 8, 0.25, prompt, min_verified_votes=3)
    assert strict.drop == "weak_majority"

    # no equation anywhere: the final answers vote, and one vote of 8 is under the bar
    facts = ("The answer is Paris.",) + ("I am not sure.",) * 7
    samples = Samples("base", "base", facts, ((),) * len(facts))
    weak = score_ttrl(samples, extract_answers(list(facts)), 8, 0.25, "Capital of France?")
    assert weak.drop == "weak_majority"
