"""User feedback as reward: a user's answer labels its prompt's group (the vote beside it),
feedback after the build gives one late group however often it is delivered, a request
that was never logged is never trained on, and a thumbs or a preferred reply makes the
pair. Real Redis and the real service on the voter model (answers "1" or "2")."""

import httpx
import openai

from judge import extract_answers
from strop.records import FeedbackRecord, Keys, PreferencePair, PromptLogRecord, ScoredGroup
from strop.series import read_series
from tests.service.conftest import API_KEY
from tests.worker.conftest import log_record, wait_until
from worker.build import Samples, build_group, group_id, score_ttrl
from worker.feedback import (
    FEEDBACK_GROUP,
    feedback_gid,
    label_with_feedback,
    run_feedback,
)


def rate(r, keys, rid: str, revision: int = 1, **verdict) -> None:
    """What POST /v1/strop/feedback writes: the latest record, and a stream entry."""
    fb = FeedbackRecord(request_id=rid, key_id="test", revision=revision, **verdict)
    r.set(keys.feedback_of + rid, fb.model_dump_json())
    r.xadd(keys.feedback, fb.to_stream())


def logged(r, keys, text: str) -> tuple[str, str]:
    """A prompt-log entry as the service writes it: (entry id, request id)."""
    fields = log_record(text)
    return r.xadd(keys.prompt_log, fields), PromptLogRecord.from_stream(fields).request_id


def groups_of(r, keys, log_id: str) -> list[ScoredGroup]:
    return [
        g for _, f in r.xrange(keys.groups) if (g := ScoredGroup.from_stream(f)).log_id == log_id
    ]


def test_build_answer_feedback_labels_group_by_user_answer_vote_beside(ctx, r):
    log_id, rid = logged(r, ctx.keys, "Pick: 1 or 2?")
    rate(r, ctx.keys, rid, answer="2")
    outcome = build_group(ctx, log_id)
    assert outcome in ("built", "no_signal")  # no_signal: all nine said "1" (p = 1/512)
    if outcome == "no_signal":
        return
    (g,) = groups_of(r, ctx.keys, log_id)
    # the user's answer is the label, whatever the majority said
    assert g.method == "gold" and g.weight == 2.0 and g.feedback["answer"] == "2"
    assert g.rewards == [float(c == "2") for c in g.completions]
    majority = max("12", key=g.completions.count)
    assert g.majority_label == majority  # the vote, recorded beside it
    (pt,) = read_series(r, ctx.keys, "feedback_agreement")["base"]
    assert pt.count == 1 and pt.mean == float(majority == "2")
    # the build used it: the feedback task will not build it again
    assert r.get(ctx.keys.built + feedback_gid(rid)) == "built"
    assert run_feedback(ctx, lambda *a: None).outcomes == {"already": 1}


def test_late_feedback_builds_one_group_duplicates_and_revisions_ignored(ctx, r):
    log_id, rid = logged(r, ctx.keys, "Pick: 1 or 2?")
    first = build_group(ctx, log_id)  # before any feedback: a plain TTRL group
    assert first in ("built", "no_signal")
    rate(r, ctx.keys, rid, answer="2")
    late: list[tuple[str, str]] = []
    report = run_feedback(ctx, lambda *a: late.append(a))
    assert report.outcomes == {"late": 1} and late == [(log_id, rid)]
    assert build_group(ctx, log_id, late=rid) in ("built", "no_signal")
    # the same entry delivered again (a consumer died before acknowledging), the task run
    # twice, and a newer revision after the late build: still one feedback group
    r.xgroup_setid(ctx.keys.feedback, FEEDBACK_GROUP, "0")
    rate(r, ctx.keys, rid, revision=2, answer="1")
    assert run_feedback(ctx, lambda *a: late.append(a)).outcomes == {"already": 2}
    assert len(late) == 1
    assert build_group(ctx, log_id, late=rid).startswith("already:")
    gs = groups_of(r, ctx.keys, log_id)
    with_fb = [g for g in gs if g.feedback is not None]
    assert len(gs) == (first == "built") + len(with_fb) and len(with_fb) <= 1
    if with_fb:
        (g,) = with_fb
        assert g.group_id == feedback_gid(rid) != group_id(log_id, ctx.settings)
        assert g.feedback["answer"] == "2" and g.weight == 2.0
        assert g.rewards == [float(c == "2") for c in g.completions]
    assert r.xpending(ctx.keys.feedback, FEEDBACK_GROUP)["pending"] == 0
    kinds = read_series(r, ctx.keys, "feedback")["base"]
    assert sum(p.labels.get("answer", 0) for p in kinds) == 3  # every entry read, once


def test_worker_feedback_through_endpoint_and_opted_out_never_trained(
    service, worker_settings, celery_app, celery_worker, r
):
    """The real service, its feedback endpoint and a real Celery worker."""
    keys = Keys(worker_settings.redis_prefix)
    oa = openai.OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0)

    def ask(text: str, **kw) -> str:
        msgs = [{"role": "user", "content": text}]
        return oa.chat.completions.create(model="strop", messages=msgs, max_tokens=1, **kw).id

    hidden = ask("not for training: 1 or 2?", extra_headers={"X-Strop-No-Log": "1"})
    rid = ask("Pick for me: 1 or 2?")
    assert wait_until(lambda: r.xlen(keys.prompt_log) >= 1, timeout=10)

    def post() -> httpx.Response:
        return httpx.post(
            service.url + "/v1/strop/feedback",
            json={"id": rid, "answer": "2"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )

    assert wait_until(lambda: post().status_code == 200, timeout=10, interval=0.2)
    # a record for the opted-out id, as if written behind the endpoint's back
    rate(r, keys, hidden, answer="2")
    celery_app.send_task("worker.ingest_prompts")
    (log_id,) = [eid for eid, _ in r.xrange(keys.prompt_log)]
    assert wait_until(lambda: r.get(keys.built + group_id(log_id, worker_settings)), timeout=60)
    assert wait_until(lambda: r.xpending(keys.feedback, FEEDBACK_GROUP)["pending"] == 0)
    gs = [ScoredGroup.from_stream(f) for _, f in r.xrange(keys.groups)]
    assert {g.messages[-1]["content"] for g in gs} <= {"Pick for me: 1 or 2?"}
    for g in gs:
        assert g.feedback["request_id"] == rid and g.method == "gold"
        assert g.rewards == [float(c == "2") for c in g.completions]
    dropped = read_series(r, keys, "dropped").get("unknown", [])
    assert sum(p.labels.get("feedback_not_logged", 0) for p in dropped) == 1


# --- thumbs and preferred: the pair ------------------------------------------------------


def _labelled(worker_settings, texts: list[str], finished=(), reasons=(), **verdict):
    record = PromptLogRecord.from_stream(log_record("Pick: 1 or 2?", finish_reasons=reasons))
    fb = FeedbackRecord(request_id=record.request_id, key_id="test", **verdict)
    samples = Samples("base", "base", tuple(texts), tuple(() for _ in texts), finished=finished)
    scored = score_ttrl(samples, list(texts), len(texts), 0.3, "Pick: 1 or 2?")
    return label_with_feedback(
        "g",
        "1-0",
        record,
        fb,
        samples.texts,
        samples.token_logprobs,
        "base",
        scored,
        "",
        worker_settings,
        finished=tuple(finished),
    )


def test_thumbs_rate_served_reply_it_joins_group_and_forms_pair(worker_settings):
    # the served reply is "1" (log_record). Down, though the vote chose "1": every "1" is
    # wrong, the others (unrated by a discredited vote) sit in the middle
    down = _labelled(worker_settings, ["1", "1", "2"], score=-1.0)
    assert down.group.completions == ["1", "1", "2", "1"]
    assert down.group.rewards == [0.0, 0.0, 0.5, 0.0] and down.group.weight == 2.0
    assert (down.pair.chosen, down.pair.rejected) == ("2", "1")
    # up, though the vote chose "2": "1" is the label
    up = _labelled(worker_settings, ["2", "2", "1"], score=1.0)
    assert up.group.rewards == [0.0, 0.0, 1.0, 1.0] and up.group.method == "gold"
    assert (up.pair.chosen, up.pair.rejected, up.pair.weight) == ("1", "2", 2.0)


def test_feedback_pair_sides_keep_whether_the_model_ended_them(worker_settings):
    # the served reply was cut at max_tokens; of the samples, the "2" was cut too
    kw = dict(finished=(True, True, False), reasons=["length"])
    down = _labelled(worker_settings, ["1", "1", "2"], score=-1.0, **kw)
    assert down.group.completion_finished == [True, True, False, False]
    assert (down.pair.chosen, down.pair.chosen_finished) == ("2", False)
    assert (down.pair.rejected, down.pair.rejected_finished) == ("1", False)
    better = _labelled(worker_settings, ["1", "2", "1"], preferred="2, I think", **kw)
    assert (better.pair.chosen_finished, better.pair.rejected_finished) == (True, False)


def test_preferred_reply_is_the_chosen_side_served_the_rejected(worker_settings):
    lab = _labelled(worker_settings, ["1", "2", "1"], preferred="2, because I said so")
    assert isinstance(lab.pair, PreferencePair)
    assert (lab.pair.chosen, lab.pair.rejected) == ("2, because I said so", "1")
    assert lab.pair.weight == 2.0 and lab.pair.feedback["preferred"].startswith("2,")


def test_answer_feedback_rewards_the_users_answer_reached_by_working_that_holds(
    worker_settings,
):
    prompt = "What is 7 + 5?"
    texts = ["7 + 5 = 12.", "7 + 5 = 13, so 12.", "The answer is 12.", "7 + 5 = 13."]
    record = PromptLogRecord.from_stream(log_record(prompt))
    fb = FeedbackRecord(request_id=record.request_id, key_id="test", answer="12")
    samples = Samples("base", "base", tuple(texts), tuple(() for _ in texts))
    scored = score_ttrl(samples, extract_answers(texts), len(texts), 0.25, prompt)
    lab = label_with_feedback(
        "g", "1-0", record, fb, samples.texts, samples.token_logprobs, "base", scored,
        prompt, worker_settings,
    )  # fmt: skip
    # 12 through a false step teaches the false step; 12 with no working is still 12
    assert lab.group.rewards == [1.0, 0.0, 1.0, 0.0] and lab.group.method == "gold"


def test_answer_feedback_keeps_the_one_right_sample_beyond_the_first_g(worker_settings):
    # without the user's answer the vote says 1 and the first two samples agree with it;
    # the user's 2 makes the last sample the one worth learning from
    texts = ["1", "1", "1", "1", "2"]
    s = worker_settings.model_copy(update={"n_train": 2})
    record = PromptLogRecord.from_stream(log_record("Pick: 1 or 2?"))
    fb = FeedbackRecord(request_id=record.request_id, key_id="test", answer="2")
    samples = Samples("base", "base", tuple(texts), tuple((-0.5,) for _ in texts))
    scored = score_ttrl(samples, extract_answers(texts), s.n_train, 0.25)
    lab = label_with_feedback(
        "g", "1-0", record, fb, samples.texts, samples.token_logprobs, "base", scored,
        "Pick: 1 or 2?", s,
    )  # fmt: skip
    assert lab.drop is None and lab.group.completions == ["1", "2"]
    assert lab.group.rewards == [0.0, 1.0] and lab.group.token_logprobs == [[-0.5], [-0.5]]
