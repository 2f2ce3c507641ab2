"""End to end: prompts sent to the real service become scored groups and pairs through a
real Celery worker, with no mock anywhere.

Why the voter model (tests/worker/voter.py) and not the tiny random model or SmolLM2:
the tiny model's gibberish carries no extractable answer, so every vote would be empty
and no group would ever be written; SmolLM2-135M answers arithmetic, but on these 2 CPUs
nine samples take tens of seconds and whether they disagree is luck. The voter model is
the tiny model rewired to answer "1" or "2" with probability 1/2 each, in one token: a
build takes a fraction of a second and with N = 9 the vote has a strict majority, so a
group has no signal only when all nine agree (p = 2/512, which the tests allow for).
"""

import openai

from strop.records import Keys, PreferencePair, ScoredGroup
from strop.series import live_reward, read_series
from tests.service.conftest import API_KEY
from tests.worker.conftest import log_ids, log_record, wait_until
from worker.build import group_id


def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0)


def ask(service, text: str, **kwargs) -> None:
    client(service).chat.completions.create(
        model="strop", messages=[{"role": "user", "content": text}], max_tokens=1, **kwargs
    )


def groups(r, keys: Keys) -> list[ScoredGroup]:
    return [ScoredGroup.from_stream(f) for _, f in r.xrange(keys.groups)]


def pairs(r, keys: Keys) -> list[PreferencePair]:
    return [PreferencePair.from_stream(f) for _, f in r.xrange(keys.pairs)]


def outcome(r, keys: Keys, settings, log_id: str) -> str | None:
    return r.get(keys.built + group_id(log_id, settings))


def ingest_until_logged(celery_app, r, keys: Keys, n: int) -> dict[str, str]:
    """Wait for the service to log n prompts, then run the ingest task on the worker."""
    assert wait_until(lambda: r.xlen(keys.prompt_log) >= n, timeout=10)
    celery_app.send_task("worker.ingest_prompts")
    return log_ids(r, keys)


def test_worker_logged_prompts_become_groups_and_pairs(
    service, worker_settings, celery_app, celery_worker, r
):
    keys = Keys(worker_settings.redis_prefix)
    texts = ["Pick one: 1 or 2?", "Pick again: 1 or 2?", "And once more: 1 or 2?"]
    for text in texts:
        ask(service, text)
    ids = ingest_until_logged(celery_app, r, keys, len(texts))
    assert sorted(ids) == sorted(texts)
    assert wait_until(
        lambda: all(outcome(r, keys, worker_settings, i) for i in ids.values()), timeout=60
    )

    outcomes = {t: outcome(r, keys, worker_settings, i) for t, i in ids.items()}
    # each prompt is built (the nine answers disagree) or dropped for having no signal
    assert set(outcomes.values()) <= {"built", "no_signal"}
    built = [t for t, o in outcomes.items() if o == "built"]
    assert built, "all three groups unanimous: p = 6e-8"
    gs, ps = groups(r, keys), pairs(r, keys)
    assert sorted(g.messages[-1]["content"] for g in gs) == sorted(built)
    assert len(ps) == len(gs)
    for g in gs:
        assert g.log_id == ids[g.messages[-1]["content"]]
        assert g.group_id == group_id(g.log_id, worker_settings)
        assert g.version == "base" and g.method == "ttrl"
        assert len(g.completions) == 9 and set(g.completions) <= {"1", "2"}
        assert g.majority_label == max("12", key=g.completions.count)
        assert g.majority_ratio == g.completions.count(g.majority_label) / 9 >= 5 / 9
        assert g.rewards == [float(c == g.majority_label) for c in g.completions]
        # one token each, sampled from a 50/50 distribution: logprob ln(1/2)
        assert [len(lp) for lp in g.token_logprobs] == [1] * 9
        assert all(abs(lp[0] + 0.6931) < 1e-3 for lp in g.token_logprobs)
        assert g.completion_token_ids == []
        assert g.completion_finished == [False] * 9  # cut at max_tokens=1: no eos after them
        p = next(p for p in ps if p.group_id == g.group_id)
        assert (p.chosen, p.rejected) == (g.majority_label, "21"[int(g.majority_label) - 1])
        assert (p.chosen_reward, p.rejected_reward) == (1.0, 0.0)
        assert (p.chosen_finished, p.rejected_finished) == (False, False)

    # monitoring: per version and minute, in Redis and in Prometheus
    built_series = read_series(r, keys, "built")
    assert sum(pt.count for pt in built_series["base"]) == len(built)
    assert sum(pt.labels.get("ttrl", 0) for pt in built_series["base"]) == len(built)
    ratio = read_series(r, keys, "majority_ratio", version="base")["base"]
    assert sum(pt.count for pt in ratio) == 3 and 5 / 9 <= ratio[-1].mean <= 1.0
    assert sum(pt.count for pt in read_series(r, keys, "ingested")["base"]) == 3
    assert read_series(r, keys, "extraction_rate")["base"][-1].mean == 1.0
    # the live reward: the rewards of the groups written, and only those
    reward = live_reward(r, keys)["base"]
    assert sum(pt.count for pt in reward) == 9 * len(built)
    assert sum(pt.sum for pt in reward) == sum(sum(g.rewards) for g in gs)


def test_worker_opted_out_prompt_never_becomes_group(
    service, worker_settings, celery_app, celery_worker, r
):
    keys = Keys(worker_settings.redis_prefix)
    ask(service, "opted out by metadata", metadata={"strop_log": "false"})
    ask(service, "opted out by header", extra_headers={"X-Strop-No-Log": "1"})
    ask(service, "an internal request", extra_headers={"X-Strop-Internal": "1"})
    ask(service, "a user prompt")
    # defensive: an entry that says it was internal is dropped, not built
    r.xadd(keys.prompt_log, log_record("internal, yet logged", internal=True))
    ids = ingest_until_logged(celery_app, r, keys, 2)
    assert sorted(ids) == ["a user prompt", "internal, yet logged"]
    assert wait_until(lambda: outcome(r, keys, worker_settings, ids["a user prompt"]), timeout=30)

    assert outcome(r, keys, worker_settings, ids["internal, yet logged"]) is None
    assert {g.messages[-1]["content"] for g in groups(r, keys)} <= {"a user prompt"}
    dropped = read_series(r, keys, "dropped")["base"]
    assert sum(pt.labels.get("internal", 0) for pt in dropped) == 1
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0


def test_worker_duplicate_prompt_built_once(service, worker_settings, celery_app, celery_worker, r):
    keys = Keys(worker_settings.redis_prefix)
    ask(service, "Heads or tails: 1 or 2?")
    ask(service, "  heads OR tails:\n1 or   2? ")  # the same prompt, normalised
    ask(service, "Something else: 1 or 2?")
    ids = ingest_until_logged(celery_app, r, keys, 3)
    first, again, other = (
        ids["Heads or tails: 1 or 2?"],
        ids["  heads OR tails:\n1 or   2? "],
        ids["Something else: 1 or 2?"],
    )
    assert wait_until(
        lambda: (
            outcome(r, keys, worker_settings, first) and outcome(r, keys, worker_settings, other)
        ),
        timeout=30,
    )
    assert outcome(r, keys, worker_settings, again) is None  # never built
    assert [g.log_id for g in groups(r, keys)].count(again) == 0
    dropped = read_series(r, keys, "dropped")["base"]
    assert sum(pt.labels.get("duplicate", 0) for pt in dropped) == 1
