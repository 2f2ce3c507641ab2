"""Feedback is never trusted blindly: a key whose answers keep contradicting clear majority
votes (and the other keys) is flagged, and its later answers no longer label its groups.
Real Redis and the real build path on the voter model: greedy sampling (temperature 0)
makes every vote a clear "1" (the voter's two answers tie, and argmax takes the first)."""

from ops.status import render
from strop.feedback_trust import flagged_keys, read_counts
from strop.records import FeedbackRecord, PromptLogRecord, SamplingRecord, ScoredGroup
from strop.snapshot import gather
from worker.build import build_group
from worker.context import make_context

MIN = 3  # rated answers before a key can be flagged (STROP_FEEDBACK_TRUST_MIN)


def logged_by(r, keys, key_id: str, text: str) -> tuple[str, str]:
    """A prompt-log entry of caller `key_id`, as the service writes it: (entry id, request id)."""
    rec = PromptLogRecord(
        request_id=f"chatcmpl-trust-{key_id}-{abs(hash(text))}",
        messages=[{"role": "user", "content": text}],
        sampling=SamplingRecord(),
        responses=["1"],
        model="strop",
        version="base",
        prompt_tokens=10,
        completion_tokens=1,
        latency_ms=1.0,
        key_id=key_id,
    )
    return r.xadd(keys.prompt_log, rec.to_stream()), rec.request_id


def answered(ctx, r, key_id: str, text: str, answer: str) -> str:
    """Log a prompt of `key_id`, have that key answer it, and build it; the entry id."""
    log_id, rid = logged_by(r, ctx.keys, key_id, text)
    fb = FeedbackRecord(request_id=rid, key_id=key_id, answer=answer)
    r.set(ctx.keys.feedback_of + rid, fb.model_dump_json())
    outcome = build_group(ctx, log_id)
    assert outcome in ("built", "no_signal"), outcome
    return log_id


def test_key_contradicting_clear_majorities_flagged_after_n_and_stops_labelling(worker_settings, r):
    greedy = worker_settings.model_copy(
        update={"sample_temperature": 0.0, "feedback_trust_min": MIN, "feedback_trust_margin": 0.3}
    )
    ctx = make_context(greedy)
    try:
        # an honest key agrees with the clear majority "1"; a liar always says "2"
        for i in range(MIN):
            answered(ctx, r, "honest", f"Honest pick {i}: 1 or 2?", "1")
        for i in range(MIN - 1):
            answered(ctx, r, "liar", f"Liar pick {i}: 1 or 2?", "2")
        assert flagged_keys(r, ctx.keys, MIN, 0.3) == []  # not yet: too few rated answers
        answered(ctx, r, "liar", f"Liar pick {MIN}: 1 or 2?", "2")
        assert read_counts(r, ctx.keys) == {"honest": (MIN, 0), "liar": (0, MIN)}
        (flag,) = flagged_keys(r, ctx.keys, MIN, 0.3)
        assert flag.key_id == "liar" and flag.rate == 1.0 and flag.rest_rate == 0.0

        # `strop status` and the dashboard's data name it
        data = gather(r, greedy)
        assert [k["key_id"] for k in data["feedback"]["trust"]["flagged"]] == ["liar"]
        assert "untrusted key liar: disagreed with 3 of 3" in render(data)
    finally:
        ctx.redis.close()
        ctx.service.close()

    # the liar's next answer, on a mixed vote (temperature 1): the vote labels its group
    # and it weighs as a plain group; an honest key's answer still labels its own
    mixed = greedy.model_copy(update={"sample_temperature": 1.0})
    ctx = make_context(mixed)
    try:
        built: dict[str, ScoredGroup] = {}
        for key_id in ("liar", "honest"):
            for attempt in range(4):  # all nine alike (p = 2/512) leaves no group: again
                log_id = answered(ctx, r, key_id, f"{key_id} later {attempt}: 1 or 2?", "2")
                gs = [
                    g
                    for _, f in r.xrange(ctx.keys.groups)
                    if (g := ScoredGroup.from_stream(f)).log_id == log_id
                ]
                if gs:
                    built[key_id] = gs[0]
                    break
        liar, honest = built["liar"], built["honest"]
        assert liar.method == "ttrl" and liar.weight == 1.0
        assert liar.rewards == [float(c == liar.majority_label) for c in liar.completions]
        assert honest.method == "gold" and honest.weight == greedy.feedback_weight
        assert honest.rewards == [float(c == "2") for c in honest.completions]
    finally:
        ctx.redis.close()
        ctx.service.close()
