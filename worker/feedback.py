"""User feedback as reward: what a caller said of one of its completions (`FeedbackRecord`,
POST /v1/strop/feedback) shapes the group and pair built from that prompt.

- `answer`: the label of the group. A sample is rewarded 1 when its final answer equals
  the user's answer by working that holds (`judge.consistent_rewards`); a true label keeps
  right answers from all N samples, not only the first G (`judge.keep_both`); the vote is still
  taken and recorded beside it (`majority_label`), and `feedback_agreement` says whether
  they agreed (a live label accuracy). Method `gold`: a reward against a known answer.
- `score` (thumbs: +1 / -1): the served reply joins the group with a reward on the
  method's scale ((score + 1) / 2 of it), and forms the pair with the sampled alternative
  (of another text) it beats (up) or loses to (down). Where the reply states an answer, a
  thumbs up makes it the label (as `answer`), a thumbs down makes every sample stating it
  wrong. Where the method cannot rate the others (a weak vote, or the vote chose the
  answer turned down) they get the middle of the scale, so the reply is judged against
  them.
- `preferred`: the chosen side of the pair, the served reply the rejected one.

Groups and pairs built with feedback carry `weight = feedback_weight` for the learner.

Never trusted blindly: each `answer` rated against a trusted majority (more than half of
the votes) counts, per key, as agreeing or not (`strop.feedback_trust`, written with the
group). A key flagged there (it disagrees far more often than the other keys) still has
its group built, but as if it had said nothing: the vote labels it, thumbs and `preferred`
are ignored, its weight is 1 (a plain group's), and its answers leave `feedback_agreement`
alone. Its counts go on, so it is judged by its latest record.

When the feedback arrives decides who uses it. Before the build ran, the build reads
`feedback_of:<request id>` itself. After it, `run_feedback` (in the ingest task) reads the
feedback stream and enqueues a late build of that request: a second group, sampled anew,
with its own marker `built:<feedback_gid>`, which the first build also sets when it used
feedback. So a request gets one feedback group however often its feedback is delivered;
a newer revision that arrives after it is ignored (counted, never built again).
A request that was never logged (opted out, or internal) is never trained on.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from judge import (
    VoteResult,
    consistent_rewards,
    extract_answer,
    keep_both,
    majority_vote,
    same_answer,
    select_pair,
    vote_answers,
)
from strop.connection import ensure_group
from strop.feedback_trust import TRUSTED_MAJORITY
from strop.records import FeedbackRecord, PreferencePair, PromptLogRecord, ScoredGroup
from strop.series import Obs, write_series
from strop.settings import Settings
from worker.context import WorkerContext
from worker.ids import feedback_gid, group_id

log = logging.getLogger("strop.worker.feedback")

FEEDBACK_GROUP = "worker"  # consumer group of the worker on the feedback stream
SCAN_LIMIT = 20_000  # prompt-log entries searched for a request id its marker does not name
BATCH = 100  # feedback entries per run
CLAIM_IDLE_MS = 120_000  # pending this long: the consumer that read it died


def read_feedback(ctx: WorkerContext, record: PromptLogRecord) -> FeedbackRecord | None:
    """The latest feedback on `record`'s request by its own caller, or None."""
    raw = ctx.redis.get(ctx.keys.feedback_of + record.request_id)
    if raw is None:
        return None
    try:
        fb = FeedbackRecord.model_validate_json(raw)
    except (ValidationError, ValueError):
        log.warning("feedback of %s does not parse: ignored", record.request_id)
        return None
    # the endpoint checks the caller too; a record naming another key is never trusted
    return fb if fb.key_id == record.key_id else None


def feedback_label(fb: FeedbackRecord) -> str:
    """The `feedback` series label: up, down, answer or preferred."""
    if fb.score is not None and fb.score != 0:
        return "up" if fb.score > 0 else "down"
    return "answer" if fb.answer else "preferred" if fb.preferred else "neutral"


# --- the group and pair of a prompt with feedback ----------------------------------------


@dataclass
class Labelled:
    """A group and pair made with feedback, and why the group is dropped (if it is)."""

    group: ScoredGroup | None
    pair: PreferencePair | None
    drop: str | None
    obs: list[Obs]
    sampled_rewards: list[float]  # of the sampled completions only: the live reward's
    agreed: bool | None = None  # the user's answer vs a trusted majority label (None: unrated)


def trusted_majority(vote: VoteResult) -> bool:
    """Whether a vote is clear enough to judge a user's answer by: more than half agree."""
    return vote.label is not None and not vote.tie and vote.ratio > TRUSTED_MAJORITY


def label_with_feedback(
    gid: str,
    log_id: str,
    record: PromptLogRecord,
    fb: FeedbackRecord,
    texts: tuple[str, ...],
    logprobs: tuple[tuple[float, ...], ...],
    version: str,
    scored,  # worker.build.Scored
    prompt: str,
    s: Settings,
    trusted: bool = True,
    finished: tuple[bool, ...] = (),
) -> Labelled:
    """The group and pair of a prompt whose caller gave feedback (see the module docstring);
    `trusted` False: of a flagged key, whose feedback changes nothing but is still rated.
    `finished`: per sample, whether the model ended it (not cut at max_tokens)."""
    answers = list(scored.answers)
    vote: VoteResult = scored.vote or majority_vote(vote_answers(texts, prompt, answers))
    obs: list[Obs] = []
    lo, hi = (0.0, 5.0) if scored.method == "judge" else (0.0, 1.0)  # the method's scale
    served = record.responses[fb.choice] if 0 <= fb.choice < len(record.responses) else None
    score = None if fb.score is None or served is None else max(-1.0, min(1.0, fb.score))
    served_answer = extract_answer(served) if score is not None else None
    label = None
    agreed = None
    user_answer = (extract_answer(fb.answer) or fb.answer.strip()) if fb.answer else None
    if user_answer and trusted_majority(vote):
        agreed = same_answer(vote.label, user_answer)
    if not trusted:  # a flagged key: as if it had said nothing
        score = served_answer = user_answer = None
        fb_used = fb.model_copy(update={"answer": None, "score": None, "preferred": None})
    else:
        fb_used = fb
    if user_answer:
        label = user_answer
        if vote.label is not None:
            obs.append(Obs("feedback_agreement", version, float(same_answer(vote.label, label))))
    elif score is not None and score > 0 and served_answer:
        label = served_answer  # a thumbs up on an answer says it is the right one
    if label is not None:  # a true label: a right answer anywhere in the N is kept
        every = consistent_rewards(label, answers, texts, prompt)
        kept = keep_both(every, s.n_train)
        rewards = [every[i] for i in kept]
        method, lo, hi = "gold", 0.0, 1.0
    else:
        kept = list(scored.kept)
        # the method's rewards mean nothing if it could not rate, or if the user turned
        # down the very answer the vote chose
        rated = scored.drop in (None, "no_signal") and not (
            score is not None
            and score < 0
            and served_answer
            and vote.label is not None
            and same_answer(vote.label, served_answer)
        )
        rewards = list(scored.rewards) if rated else [(lo + hi) / 2] * len(kept)
        if score is not None and score < 0 and served_answer:  # its answer is wrong anywhere
            rewards = [
                lo if answers[i] and same_answer(answers[i], served_answer) else x
                for i, x in zip(kept, rewards, strict=True)
            ]
        method = scored.method
    comp = [texts[i] for i in kept]
    lps = [list(logprobs[i]) for i in kept]
    # per completion: the model ended it (True where the worker did not say)
    ended = [finished[i] if finished else True for i in kept]
    reasons = record.finish_reasons
    served_ended = reasons[fb.choice] == "stop" if 0 <= fb.choice < len(reasons) else True
    sampled = list(rewards)
    served_reward = None
    if score is not None:
        served_reward = lo + (hi - lo) * (score + 1) / 2
        comp.append(served)
        lps.append([])  # not sampled by the worker: the learner recomputes it anyway
        rewards.append(served_reward)
        ended.append(served_ended)
    fb_json = fb.model_dump(mode="json")
    w = s.feedback_weight if trusted else min(1.0, s.feedback_weight)
    drop = "no_signal" if len(set(rewards)) < 2 else None
    if not trusted and scored.drop is not None:
        drop = scored.drop  # the vote alone decides, as for a group without feedback
    group = None
    if drop is None:
        group = ScoredGroup(
            group_id=gid,
            log_id=log_id,
            messages=record.messages,
            completions=comp,
            token_logprobs=lps,
            completion_finished=ended,
            rewards=rewards,
            version=version,
            method=method,
            majority_label=vote.label,
            majority_ratio=vote.ratio if vote.label is not None else None,
            judge_scores=list(scored.judge_scores) if scored.judge_scores else None,
            weight=w,
            feedback=fb_json,
        )
    pick = (
        None  # a flagged key's dropped group: no pair either, as without feedback
        if drop is not None and not trusted
        else _pair(comp, rewards, ended, sampled, served, served_reward, served_ended, fb_used, s)
    )
    pair = None
    if pick is not None:
        chosen, rejected, rc, rr, chosen_ended, rejected_ended = pick
        pair = PreferencePair(
            group_id=gid,
            messages=record.messages,
            chosen=chosen,
            rejected=rejected,
            chosen_reward=rc,
            rejected_reward=rr,
            version=version,
            method=method,
            chosen_finished=chosen_ended,
            rejected_finished=rejected_ended,
            weight=w,
            feedback=fb_json,
        )
    return Labelled(group, pair, drop, obs, sampled, agreed)


def _pair(
    comp: list[str],
    rewards: list[float],
    ended: list[bool],
    sampled: list[float],
    served: str | None,
    served_reward: float | None,
    served_ended: bool,
    fb: FeedbackRecord,
    s: Settings,
) -> tuple[str, str, float, float, bool, bool] | None:
    """(chosen, rejected, their rewards, whether the model ended each): the user's preferred
    reply over the served one, else the rated served reply against the sampled alternative
    furthest from it, else the group's own pair."""
    preferred = (fb.preferred or "").strip()
    if preferred and served is not None and preferred != served.strip():
        return fb.preferred, served, 1.0, 0.0, True, served_ended  # the user's reply is whole
    if served_reward is not None:
        # an alternative that reads the same as the served reply teaches nothing
        others = [j for j in range(len(sampled)) if comp[j].strip() != served.strip()]
        if others and fb.score > 0:
            j = min(others, key=sampled.__getitem__)
            if sampled[j] < served_reward:
                return served, comp[j], served_reward, sampled[j], served_ended, ended[j]
        elif others and fb.score < 0:
            j = max(others, key=sampled.__getitem__)
            if sampled[j] > served_reward:
                return comp[j], served, sampled[j], served_reward, ended[j], served_ended
        return None
    p = select_pair(comp, rewards, s.pair_min_margin, s.length_tolerance)
    if p is None:
        return None
    c, r = p.chosen, p.rejected
    return comp[c], comp[r], p.chosen_reward, p.rejected_reward, ended[c], ended[r]


# --- late feedback: the feedback stream --------------------------------------------------


def find_logged(ctx: WorkerContext, request_id: str) -> tuple[str, PromptLogRecord] | None:
    """The prompt-log entry (id, record) of a request: through its marker `logged:<id>`
    ("key_id|entry id|version|n"), else by searching the newest SCAN_LIMIT entries."""
    r, keys = ctx.redis, ctx.keys
    raw = r.get(keys.logged + request_id)
    parts = raw.rsplit("|", 3) if raw else []
    if len(parts) == 4:
        for eid, fields in r.xrange(keys.prompt_log, parts[1], parts[1], count=1):
            rec = _parse_log(fields)
            if rec is not None and rec.request_id == request_id:
                return eid, rec
    end, seen = "+", 0
    while seen < SCAN_LIMIT:
        entries = r.xrevrange(keys.prompt_log, end, "-", count=500)
        if not entries:
            return None
        for eid, fields in entries:
            data = fields.get("data", "")
            rec = _parse_log(fields) if request_id in data else None
            if rec is not None and rec.request_id == request_id:
                return eid, rec
        seen += len(entries)
        end = "(" + entries[-1][0]  # exclusive: the next page starts below it
        if len(entries) < 500:
            return None
    return None


def _parse_log(fields: dict) -> PromptLogRecord | None:
    try:
        return PromptLogRecord.from_stream(fields)
    except (ValidationError, ValueError, TypeError):
        return None


@dataclass
class FeedbackReport:
    """What one run over the feedback stream did."""

    read: int = 0
    late: list[str] = field(default_factory=list)  # request ids whose late build was enqueued
    outcomes: Counter = field(default_factory=Counter)


def run_feedback(ctx: WorkerContext, enqueue: Callable[[str, str], None]) -> FeedbackReport:
    """Read new feedback; `enqueue(log_id, request_id)` sends the late build of a request
    whose prompt was built before its feedback came. Acknowledged with its counts, at once."""
    r, keys = ctx.redis, ctx.keys
    report = FeedbackReport()
    ensure_group(r, keys.feedback, FEEDBACK_GROUP)
    _next, entries, _deleted = r.xautoclaim(
        keys.feedback, FEEDBACK_GROUP, ctx.consumer, CLAIM_IDLE_MS, start_id="0-0", count=BATCH
    )
    entries = [e for e in entries if e[1]]
    if len(entries) < BATCH:
        reply = r.xreadgroup(
            FEEDBACK_GROUP, ctx.consumer, {keys.feedback: ">"}, count=BATCH - len(entries)
        )
        entries += [e for _s, es in reply or [] for e in es]
    done: list[str] = []
    obs: list[Obs] = []
    try:
        for eid, fields in entries:
            report.read += 1
            outcome, o = _one(ctx, fields, enqueue, report)
            report.outcomes[outcome] += 1
            obs += o
            done.append(eid)
    finally:
        with r.pipeline(transaction=True) as pipe:
            if done:
                pipe.xack(keys.feedback, FEEDBACK_GROUP, *done)
            write_series(pipe, keys, obs, time.time())
            pipe.execute()
        ctx.metrics.observe(obs)
    if report.read:
        log.info("feedback: read %d, %s", report.read, dict(report.outcomes))
    return report


def _one(
    ctx: WorkerContext, fields: dict, enqueue: Callable[[str, str], None], report: FeedbackReport
) -> tuple[str, list[Obs]]:
    r, keys = ctx.redis, ctx.keys
    try:
        fb = FeedbackRecord.from_stream(fields)
    except (ValidationError, ValueError, TypeError):
        return "bad_record", [Obs("dropped", "unknown", label="bad_feedback")]
    found = find_logged(ctx, fb.request_id)
    if found is None or found[1].key_id != fb.key_id or found[1].internal:
        # opted out, internal, trimmed from the log, or not the caller's: never trained on
        return "not_logged", [Obs("dropped", "unknown", label="feedback_not_logged")]
    log_id, record = found
    obs = [Obs("feedback", record.version, label=feedback_label(fb))]
    if r.exists(keys.built + feedback_gid(fb.request_id)):
        return "already", obs  # built with feedback, or a redelivery: once per request
    built = r.get(keys.built + group_id(log_id, ctx.settings))
    if built is None or built.startswith("dead:"):
        return "pending", obs  # its build (or requeue) reads feedback_of itself
    enqueue(log_id, fb.request_id)
    report.late.append(fb.request_id)
    return "late", obs
