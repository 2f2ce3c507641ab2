"""Build: one prompt-log entry becomes a scored group (and a preference pair), or a drop.

In order, each step its own function:

1. `sample`: N answers from the service as the promoted version (`model="strop"`), as
   internal requests (never logged), with token logprobs. The version that answered is
   the group's behaviour policy; if N needs several requests, the later ones are pinned
   to it.
2. `score`: rewards, from the sampled texts alone: `ttrl` (majority vote over the N
   extracted answers), `judge` (K judgments of each kept answer, by the same version
   through the same service) or `auto` (TTRL if most answers are extractable). Gold
   answers are not an input: see worker/probe.py, which runs after this.
3. drop the group (no signal, weak or tied majority, nothing scorable) or make the
   ScoredGroup of the first G answers and its PreferencePair.
4. `commit`: group, pair, metrics and the "built" marker in one Redis transaction, run
   only if the marker is absent (WATCH). A retried or redelivered task finds the marker
   and writes nothing, so a prompt gives one group however often its task runs. The
   idempotency key is a hash of the log entry id, the method and N/G. The `reward`
   series (the live reward) gets the rewards of written groups only; a dropped group
   counts in the other metrics.

A build that fails for a reason no retry cures (the service refuses the worker's key,
answers another 4xx, or the record does not parse) goes to the dead-letter stream with its
reason, in the same transaction as its marker (`dead:<reason>`); `strop worker requeue`
builds them again once the cause is fixed. What a retry can cure (connection errors, 5xx,
429) raises, and Celery retries it.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import openai
import redis
from pydantic import ValidationError

from judge import (
    VoteResult,
    answer_entropy,
    choose_method,
    consistent_rewards,
    extract_answer,
    extract_answers,
    extraction_rate,
    judge_messages,
    judge_rewards,
    keep_both,
    majority_vote,
    select_pair,
    verified,
    vote_answers,
)
from strop.feedback_trust import is_flagged, trust_field
from strop.queues import dead_letter_key
from strop.records import PreferencePair, PromptLogRecord, ScoredGroup
from strop.series import TRAINED_METRICS, Obs, write_series
from strop.settings import Settings
from strop.versions import version_of_model
from worker.context import WorkerContext
from worker.feedback import label_with_feedback, read_feedback
from worker.ids import feedback_gid, group_id
from worker.probe import probe_key, probe_obs
from worker.prompts import last_user_text

log = logging.getLogger("strop.worker.build")

JUDGE_TEMPERATURE = 0.7  # moderate: K judgments should differ, yet stay on the rubric
MARKER_TTL_S = 7 * 24 * 3600  # far longer than any redelivery or retry of the same entry
DETAIL_CHARS = 500  # of an error message kept in a dead letter


class ServiceBusy(Exception):
    """The service answered 5xx, 408 or 409: try again later."""


# What a retry can cure. A 4xx answer is dead-lettered (`refusal`); anything else (a bug)
# fails the task at once, and BuildTask.on_failure dead-letters it.
TRANSIENT_ERRORS = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    ServiceBusy,
    redis.ConnectionError,
    redis.TimeoutError,
)

Method = Literal["ttrl", "judge", "gold"]


@dataclass(frozen=True)
class Samples:
    """The N answers to one prompt, from one version."""

    served_model: str  # the response's `model`: `base` or `strop@vN`, to pin follow-ups
    version: str  # `base` or `vN`
    texts: tuple[str, ...]
    token_logprobs: tuple[tuple[float, ...], ...]
    finished: tuple[bool, ...] = ()  # per answer: ended by the model, not cut at max_tokens


@dataclass(frozen=True)
class Scored:
    """The rewards of a group, and why it is dropped (if it is)."""

    method: Method
    kept: tuple[int, ...]  # indices into the samples of the group's completions
    rewards: tuple[float, ...]  # one per kept completion
    drop: str | None  # reason the group is not written, or None
    answers: tuple[str | None, ...]  # the N extracted answers
    vote: VoteResult | None  # TTRL only
    vote_rewards: tuple[float, ...] | None  # TTRL only: the rewards of all N samples
    judge_scores: tuple[float, ...] | None  # judge only: the kept completions' mean scores
    obs: tuple[Obs, ...]  # what scoring measured; the reward itself only once written


def build_group(
    ctx: WorkerContext, log_id: str, deadline: float | None = None, late: str | None = None
) -> str:
    """Build the group of prompt-log entry `log_id`; returns its outcome (`built`, a drop
    reason, or `already:<outcome>` when an earlier run wrote it). `deadline` is a
    time.monotonic() instant every service call must end by. `late`: a request id whose
    feedback came after its prompt was built; builds its feedback group (worker/feedback.py)."""
    s, r, keys = ctx.settings, ctx.redis, ctx.keys
    deadline = deadline if deadline is not None else time.monotonic() + s.task_time_limit_s
    gid = feedback_gid(late) if late else group_id(log_id, s)
    done = r.get(keys.built + gid)
    if done is not None:  # a redelivered or retried task: the work is already durable
        return f"already:{done}"
    started = time.monotonic()
    record = read_record(ctx, log_id)
    if record == "bad_record" and not late:  # a newer writer's schema: a fixed worker may
        return dead_letter(ctx, log_id, "bad_record", "the prompt-log record does not parse")
    if not isinstance(record, PromptLogRecord):
        return _finish(ctx, gid, None, None, [Obs("dropped", "unknown", label=record)], record)
    fb = read_feedback(ctx, record)
    if late and (fb is None or record.request_id != late):
        return "no_feedback"
    # a build that uses the feedback is its feedback group: no late build after it
    also = [keys.built + feedback_gid(record.request_id)] if fb and not late else []
    log.info("build %s: sampling %d answers", log_id, s.n_votes)
    try:
        samples = sample(ctx, record.messages, deadline)
        scored = score(ctx, record.messages, samples, deadline)
    except openai.APIStatusError as e:
        reason = refusal(e)
        if reason is None:
            raise  # 429: Celery retries it
        if late:  # its prompt's own build went through; this one is not worth a dead letter
            return _finish(
                ctx,
                gid,
                None,
                None,
                [Obs("dropped", record.version, label=reason)],
                f"dead:{reason}",
            )
        # a wrong key, a prompt too long for the service's context...: no retry helps
        return dead_letter(ctx, log_id, reason, f"{e.status_code}: {e.message}", record.version)
    version = samples.version
    # monitoring only, after the rewards are final: the gold answers never reach them
    obs = list(scored.obs) + probe_obs(
        ctx.probes, record.messages, list(scored.answers), scored.vote, scored.vote_rewards, version
    )
    obs.append(Obs("answer_length", samples.version, mean_length(samples)))
    trust: list[str] = []
    if fb is not None:
        lab = label_with_feedback(
            gid,
            log_id,
            record,
            fb,
            samples.texts,
            samples.token_logprobs,
            version,
            scored,
            last_user_text(record.messages),
            s,
            trusted=not is_flagged(
                r, keys, record.key_id, s.feedback_trust_min, s.feedback_trust_margin
            ),
            finished=samples.finished,
        )
        group, pair, drop, rewards = lab.group, lab.pair, lab.drop, lab.sampled_rewards
        if lab.agreed is not None:  # counted with the group: once, however often it runs
            trust = [trust_field(record.key_id, lab.agreed)]
        obs += lab.obs
        method = group.method if group else pair.method if pair else scored.method
    else:
        group = pair = None
        drop, rewards, method = scored.drop, list(scored.rewards), scored.method
        if drop is None:
            group, pair = make_records(gid, log_id, record, samples, scored, s)
    if group is None and pair is None:
        obs.append(Obs("dropped", version, label=drop))
        outcome = _finish(ctx, gid, None, None, obs, drop, also=also, trust=trust)
    else:
        if group is not None:
            obs.append(Obs("built", version, label=method))
            if fb is None:
                # the same signals again, for the groups the vote labelled and training
                # sees: the unprefixed ones count every sampled group, dropped or not
                obs += [
                    Obs(f"trained_{o.metric}", o.version, o.value, o.count)
                    for o in obs
                    if o.metric in TRAINED_METRICS
                ]
            # live reward (strop.series.live_reward): the written groups' rewards only, so
            # the dashboard and the rollback see what training sees
            obs.append(Obs("reward", version, sum(rewards), len(rewards)))
        if pair is not None:
            obs.append(Obs("pairs", version))
        outcome = _finish(ctx, gid, group, pair, obs, "built", also=also, trust=trust)
    ctx.metrics.build_seconds.observe(time.monotonic() - started)
    log.info("build %s: %s (version %s, %s)", log_id, outcome, version, method)
    # feedback that came while this build sampled (too early for the feedback task to see
    # it built): its feedback group, now
    fresh = not fb and not late and not outcome.startswith("already:")
    if fresh and r.exists(keys.feedback_of + record.request_id):
        build_group(ctx, log_id, deadline, late=record.request_id)
    return outcome


def read_record(ctx: WorkerContext, log_id: str) -> PromptLogRecord | str:
    """The prompt-log record, or why there is none (`missing`: trimmed from the log)."""
    entries = ctx.redis.xrange(ctx.keys.prompt_log, log_id, log_id, count=1)
    if not entries:
        return "missing"
    try:
        return PromptLogRecord.from_stream(entries[0][1])
    except (ValidationError, ValueError, TypeError):
        return "bad_record"


# --- 1. sample --------------------------------------------------------------------------


def sample(ctx: WorkerContext, messages: list[dict[str, Any]], deadline: float) -> Samples:
    """N answers from the promoted version (several requests if N is above max_n)."""
    s = ctx.settings
    chunk = max(1, min(s.n_votes, s.max_n))  # the service refuses a larger `n`
    sizes = [chunk] * (s.n_votes // chunk) + ([s.n_votes % chunk] if s.n_votes % chunk else [])

    def ask(model: str, n: int) -> Any:
        return _chat(
            ctx,
            deadline,
            model=model,
            messages=messages,
            n=n,
            temperature=s.sample_temperature,
            max_tokens=s.sample_max_tokens,
            logprobs=True,
        )

    first = ask("strop", sizes[0])
    responses = [first]
    if len(sizes) > 1:  # the rest from the version that answered first, even mid-swap
        with ThreadPoolExecutor(len(sizes) - 1) as pool:
            responses += list(pool.map(lambda n: ask(first.model, n), sizes[1:]))
    choices = [c for resp in responses for c in sorted(resp.choices, key=lambda c: c.index)]
    return Samples(
        served_model=first.model,
        version=version_of_model(first.model),
        texts=tuple(c.message.content or "" for c in choices),
        token_logprobs=tuple(
            tuple(t.logprob for t in (c.logprobs.content or [])) if c.logprobs else ()
            for c in choices
        ),
        finished=tuple(c.finish_reason == "stop" for c in choices),
    )


def mean_length(samples: Samples) -> float:
    """Mean answer length of the group, in tokens (characters / 4 where a sample has no
    logprobs): the collapse detector watches it."""
    lengths = [
        len(lp) if lp else len(t) / 4
        for t, lp in zip(samples.texts, samples.token_logprobs, strict=True)
    ]
    return sum(lengths) / max(1, len(lengths))


def _chat(ctx: WorkerContext, deadline: float, **kwargs: Any) -> Any:
    """One internal chat completion, ending by `deadline`; 5xx, 408 and 409 answers become
    ServiceBusy."""
    timeout = max(1.0, deadline - time.monotonic())
    try:
        return ctx.service.chat.completions.create(timeout=timeout, **kwargs)
    except openai.APIStatusError as e:
        if e.status_code >= 500 or e.status_code in (408, 409):
            raise ServiceBusy(f"service answered {e.status_code}") from e
        raise


def refusal(e: openai.APIStatusError) -> str | None:
    """The dead-letter reason of a service answer no retry cures, None if one may."""
    if e.status_code == 401:
        return "unauthorized"
    if e.status_code == 403:
        return "forbidden"
    if 400 <= e.status_code < 500 and e.status_code not in (408, 409, 429):
        return "rejected"
    return None


# --- 2. score ---------------------------------------------------------------------------


def score(
    ctx: WorkerContext, messages: list[dict[str, Any]], samples: Samples, deadline: float
) -> Scored:
    """Rewards of the G kept answers, by the configured method. Sees no gold answer."""
    s = ctx.settings
    answers = extract_answers(list(samples.texts))
    auto = s.reward_method == "auto"
    method: Method = (
        choose_method(list(samples.texts), prompt=last_user_text(messages))
        if auto
        else s.reward_method
    )
    if method == "ttrl":
        return score_ttrl(
            samples,
            answers,
            s.n_train,
            s.min_majority_ratio,
            last_user_text(messages),
            s.min_verified_votes,
        )
    if method == "gold":
        gold = ctx.gold.get(probe_key(messages))
        return score_gold(samples, answers, gold, s.n_train, last_user_text(messages))
    return score_judge(ctx, messages, samples, answers, deadline)


def score_gold(
    samples: Samples, answers: list[str | None], gold: str | None, n_train: int, prompt: str = ""
) -> Scored:
    """Reward 1 for answers equal to the known answer by working that holds, as a vote's
    or a user's label is rewarded (judge.consistent_rewards), 0 otherwise: the ceiling the
    label-free rewards are measured against. G of the N are kept, with both kinds where
    the N have both (judge.keep_both); a prompt with no known answer is dropped."""
    v = samples.version
    if gold is None:
        kept: list[int] = []
        rewards: tuple[float, ...] = ()
        drop: str | None = "unscored"
    else:
        label = extract_answer(gold) or gold.strip()
        every = consistent_rewards(label, answers, samples.texts, prompt)
        kept = keep_both(every, n_train)
        rewards = tuple(every[i] for i in kept)
        drop = "no_signal" if len(set(rewards)) < 2 else None
    return Scored(
        method="gold",
        kept=tuple(kept),
        rewards=rewards,
        drop=drop,
        answers=tuple(answers),
        vote=None,
        vote_rewards=None,
        judge_scores=None,
        obs=(Obs("extraction_rate", v, extraction_rate(answers)),),
    )


def score_ttrl(
    samples: Samples,
    answers: list[str | None],
    n_train: int,
    min_majority_ratio: float,
    prompt: str = "",
    min_verified_votes: int = 1,
) -> Scored:
    """Majority vote over all N answers (their checked stated results where the group
    states any: judge/equation.py); the first G are kept, rewarded where they end on the
    label by working that holds. A label from checked results needs `min_verified_votes`
    votes, any other `min_majority_ratio` of the N."""
    v = samples.version
    vote = majority_vote(vote_answers(samples.texts, prompt, answers))
    strong = (
        vote.majority_count >= min_verified_votes
        if verified(samples.texts, prompt)
        else vote.ratio >= min_majority_ratio
    )
    g = min(n_train, len(answers))
    all_rewards = tuple(consistent_rewards(vote.label, answers, samples.texts, prompt))
    rewards = all_rewards[:g]
    obs = [Obs("extraction_rate", v, extraction_rate(answers))]
    if vote.label is not None:
        obs.append(Obs("majority_ratio", v, vote.ratio))
        obs.append(Obs("answer_entropy", v, answer_entropy(vote)))
    if vote.label is None:
        drop = "no_answer"
    elif not strong:
        drop = "weak_majority"
    elif vote.tie:  # the label would be a coin flip between equally voted answers
        drop = "tie"
    elif len(set(rewards)) < 2:
        drop = "no_signal"
    else:
        drop = None
    return Scored(
        method="ttrl",
        kept=tuple(range(g)),
        rewards=rewards,
        drop=drop,
        answers=tuple(answers),
        vote=vote,
        vote_rewards=all_rewards,
        judge_scores=None,
        obs=tuple(obs),
    )


def score_judge(
    ctx: WorkerContext,
    messages: list[dict[str, Any]],
    samples: Samples,
    answers: list[str | None],
    deadline: float,
) -> Scored:
    """K judgments of each of the first G answers, by the version that sampled them;
    answers no judgment could score leave the group."""
    s, v = ctx.settings, samples.version
    g = min(s.n_train, len(samples.texts))
    texts = list(samples.texts[:g])

    def judge_one(text: str) -> list[str]:
        try:
            resp = _chat(
                ctx,
                deadline,
                model=samples.served_model,
                messages=judge_messages(messages, text),
                n=s.judge_k,
                temperature=JUDGE_TEMPERATURE,
                max_tokens=s.sample_max_tokens,
            )
        except openai.BadRequestError:  # e.g. prompt + answer too long to judge
            return []
        return [c.message.content or "" for c in resp.choices]

    with ThreadPoolExecutor(min(8, g)) as pool:  # concurrent: the engine batches them
        judgments = list(pool.map(judge_one, texts))
    means = judge_rewards(texts, judgments)
    kept = tuple(i for i, m in enumerate(means) if m is not None)
    rewards = tuple(float(means[i]) for i in kept)
    obs = [Obs("extraction_rate", v, extraction_rate(answers))]
    obs += [Obs("judge_score", v, r, label=str(int(r + 0.5))) for r in rewards]
    if len(kept) < 2:
        drop = "unscored"
    elif len(set(rewards)) < 2:
        drop = "no_signal"
    else:
        drop = None
    return Scored(
        method="judge",
        kept=kept,
        rewards=rewards,
        drop=drop,
        answers=tuple(answers),
        vote=None,
        vote_rewards=None,
        judge_scores=rewards,
        obs=tuple(obs),
    )


# --- 3. records -------------------------------------------------------------------------


def make_records(
    gid: str,
    log_id: str,
    record: PromptLogRecord,
    samples: Samples,
    scored: Scored,
    s: Settings,
) -> tuple[ScoredGroup, PreferencePair | None]:
    texts = [samples.texts[i] for i in scored.kept]
    logprobs = [list(samples.token_logprobs[i]) for i in scored.kept]
    group = ScoredGroup(
        group_id=gid,
        log_id=log_id,
        messages=record.messages,
        completions=texts,
        completion_token_ids=[],  # not available over the OpenAI API
        token_logprobs=logprobs,
        completion_finished=[samples.finished[i] for i in scored.kept] if samples.finished else [],
        rewards=list(scored.rewards),
        version=samples.version,
        method=scored.method,
        majority_label=scored.vote.label if scored.vote else None,
        majority_ratio=scored.vote.ratio if scored.vote else None,
        judge_scores=list(scored.judge_scores) if scored.judge_scores is not None else None,
    )
    # lengths in tokens where every completion has its logprobs, else in characters
    lengths = [len(lp) for lp in logprobs] if all(logprobs) else None
    p = select_pair(texts, list(scored.rewards), s.pair_min_margin, s.length_tolerance, lengths)
    if p is None:
        return group, None
    pair = PreferencePair(
        group_id=gid,
        messages=record.messages,
        chosen=texts[p.chosen],
        rejected=texts[p.rejected],
        chosen_reward=p.chosen_reward,
        rejected_reward=p.rejected_reward,
        version=samples.version,
        method=scored.method,
        chosen_finished=group.completion_finished[p.chosen] if samples.finished else True,
        rejected_finished=group.completion_finished[p.rejected] if samples.finished else True,
    )
    return group, pair


# --- 4. commit --------------------------------------------------------------------------


def commit(
    ctx: WorkerContext,
    gid: str,
    group: ScoredGroup | None,
    pair: PreferencePair | None,
    obs: list[Obs],
    outcome: str,
    dead: dict[str, str] | None = None,
    also: list[str] = (),
    trust: list[str] = (),
) -> bool:
    """Write everything (and the dead letter `dead`, if given) and the marker (and the
    markers `also`, and the feedback-trust counts `trust`) atomically, unless the marker
    exists. True if this call wrote it."""
    s, keys = ctx.settings, ctx.keys
    marker = keys.built + gid
    with ctx.redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(marker)
            if pipe.exists(marker):
                return False
            pipe.multi()
            if group is not None:
                pipe.xadd(keys.groups, group.to_stream(), maxlen=s.stream_maxlen, approximate=True)
            if pair is not None:
                pipe.xadd(keys.pairs, pair.to_stream(), maxlen=s.stream_maxlen, approximate=True)
            if dead is not None:
                stream = dead_letter_key(keys.prefix)
                pipe.xadd(stream, dead, maxlen=s.stream_maxlen, approximate=True)
            write_series(pipe, keys, obs, time.time())
            pipe.set(marker, outcome, ex=MARKER_TTL_S)
            for m in also:
                pipe.set(m, outcome, ex=MARKER_TTL_S, nx=True)
            for f in trust:
                pipe.hincrby(keys.feedback_trust, f, 1)
            pipe.execute()
        except redis.WatchError:  # another run of this task wrote it in between
            return False
    ctx.metrics.observe(obs)
    return True


def dead_letter(
    ctx: WorkerContext, log_id: str, reason: str, detail: str, version: str = "unknown"
) -> str:
    """Put the build of `log_id` in the dead-letter stream (once, with its marker
    `dead:<reason>`); returns its outcome. Entry fields: strop/queues.py."""
    gid = group_id(log_id, ctx.settings)
    entry = {
        "log_id": log_id,
        "group_id": gid,
        "reason": reason,
        "detail": detail[:DETAIL_CHARS],
        "version": version,
        "time": f"{time.time():.3f}",
    }
    obs = [Obs("dropped", version, label=reason)]
    outcome = _finish(ctx, gid, None, None, obs, f"dead:{reason}", entry)
    if not outcome.startswith("already:"):
        log.warning(
            "build %s dead-lettered (%s): %s; `strop worker requeue` builds it again",
            log_id,
            reason,
            entry["detail"],
        )
    return outcome


def _finish(
    ctx: WorkerContext,
    gid: str,
    group: ScoredGroup | None,
    pair: PreferencePair | None,
    obs: list[Obs],
    outcome: str,
    dead: dict[str, str] | None = None,
    also: list[str] = (),
    trust: list[str] = (),
) -> str:
    if commit(ctx, gid, group, pair, obs, outcome, dead, also, trust):
        return outcome
    return f"already:{ctx.redis.get(ctx.keys.built + gid)}"
