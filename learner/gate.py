"""The promotion gate: a candidate version is promoted only if, on a probe set of recent
user prompts,

1. its weights are finite;
2. it stays close to its parent: the mean per-token KL(candidate || parent), over full
   next-token distributions at the positions of the parent's greedy answer, is at most
   `kl_limit`;
3. with a canary set (`STROP_CANARY_FILE`, labeled), its greedy accuracy there is at most
   `canary_tolerance` below the parent's;
   without one, a label-free check takes its place (vote agreement, TTRL's majority as
   the label): each probe prompt's pseudo-label is the vote label of a group the worker
   built on it (`labelled_prompts`: the newest groups the candidate did not train on),
   or, with fewer such groups than the check needs, the majority of `vote_n` answers the
   parent samples to the probe prompts; the candidate's greedy answers must match those
   labels on at most `vote_tolerance` fewer prompts than the parent's own greedy answers
   do (see `vote_verdict` for why a count of prompts, and its figures);
4. its self-reward has not dropped: the parent, as judge (the same judge for both sides,
   and not the candidate grading itself), scores the candidate's and the parent's greedy
   answers with the judge rubric (judge/llm_score.py, K=1); the candidate's mean may be at
   most `reward_tolerance` below the parent's. When no judgment of one side parses there
   is no evidence either way, and the check is skipped (recorded as `gate/reward_skipped`);
   a judge whose first `JUDGE_SCOUTS` judgments do not parse is not asked the rest.

Every generation (both sides' greedy answers, the parent's judgments and votes) is an
internal request to the service, which serves the candidate to it pinned before any user
can reach it (learner/serving.py); the learner computes only what needs its own weights:
the KL. Generations are short; all but the parent's votes are greedy (the votes are
sampled, so the vote labels, and only they, vary from one run of the gate to the next).
"""

import json
import logging
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import redis
import torch
from safetensors import safe_open

from learner.logprobs import build_batch, prompt_ids
from learner.policy import Policy
from learner.serving import Answer, ask
from strop.labeled import LabeledQuestion
from strop.records import Keys, PromptLogRecord

log = logging.getLogger("strop.learner.gate")

# Used when the prompt log is empty (a fresh deployment): everyday requests, short answers.
BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 7?",
    "Give me three tips for better sleep.",
    "Write a haiku about the sea.",
    "What does a compiler do?",
    "Name a mammal that can fly.",
    "How many days are in a leap year?",
]
MAX_PROBE_PROMPT_TOKENS = 256  # longer prompts would make the gate slow, not more telling
# Judgments asked before the rest: the rubric prompt is ~450 tokens, the priciest thing the
# gate asks on a CPU, and SmolLM2-135M parsed none of 320 in 20 gates (bench/results), so
# a judge that fails these is not asked the others.
JUDGE_SCOUTS = 2


@dataclass
class GateResult:
    passed: bool
    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Checks that passed without evidence, and why (e.g. too few voted prompts)."""

    def record(self) -> dict:
        """What goes into a version's metadata and the registry."""
        notes = {"notes": list(self.notes)} if self.notes else {}
        return {"passed": self.passed, "reason": self.reason, **self.metrics, **notes}


def last_user_text(messages: Sequence[dict]) -> str | None:
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    text = users[-1] if users else None
    return text if isinstance(text, str) and text.strip() else None


def probe_prompts(
    r: redis.Redis, keys: Keys, size: int, scan: int = 500, exclude: Collection[str] = ()
) -> list[str]:
    """The last `size` distinct user prompts of the prompt log, newest first, leaving out
    `exclude` (the prompts the candidate trained on, `trained_prompts`: a check on them
    would flatter it); the built-in prompts when the log has none left.

    Even without `exclude` the newest prompts are mostly held back already: the worker
    builds groups behind the log and the learner trains behind the worker, so a candidate
    has rarely consumed the last prompts logged. Where traffic is sparse it may have (all
    of a short log trained on), and `exclude` makes sure."""
    found: list[str] = []
    for _, fields in r.xrevrange(keys.prompt_log, count=scan):
        try:
            record = PromptLogRecord.from_stream(fields)
        except ValueError:
            continue
        text = last_user_text(record.messages)
        if text is not None and text not in found and text not in exclude:
            found.append(text)
        if len(found) >= size:
            break
    return found or BUILTIN_PROMPTS[:size]


def labelled_prompts(
    r: redis.Redis, keys: Keys, size: int, scan: int = 200, exclude: Collection[str] = ()
) -> list[tuple[str, str]]:
    """The last `size` distinct user prompts of the groups stream that carry a vote label
    (the worker's majority: TTRL groups, feedback groups too), newest first, with that
    label, leaving out `exclude` (the candidate's trained prompts).

    Why these: the gate's own vote labels about a quarter of recent prompts (8 votes, any
    answer length: bench/README.md, "Gate"), so an 8-prompt probe rarely reaches the 3
    labels its check needs; every built TTRL group has a label that passed the worker's
    bars, and reading it costs the gate no sampling. The label comes from the version that
    sampled the group, not the parent: both sides are measured against the same labels."""
    found: dict[str, str] = {}
    for _, fields in r.xrevrange(keys.groups, count=scan):
        text, data = record_prompt(fields)
        label = data.get("majority_label")
        if text is None or text in found or text in exclude or not isinstance(label, str):
            continue
        found[text] = label
        if len(found) >= size:
            break
    return list(found.items())


def trained_prompts(r: redis.Redis, consumed: dict[str, list[str]]) -> set[str]:
    """The user prompts of the records a version consumed (its metadata's `consumed`:
    stream -> ids of groups or pairs), read back from their streams: what `probe_prompts`
    holds back from its gate. One round trip; records already trimmed from a capped
    stream are missed, but those are the oldest, and the probe takes the newest prompts."""
    pipe = r.pipeline(transaction=False)
    for stream, ids in consumed.items():
        for i in ids:
            pipe.xrange(stream, min=i, max=i, count=1)
    found: set[str] = set()
    for entries in pipe.execute():
        for _, fields in entries:
            text, _ = record_prompt(fields)
            if text is not None:
                found.add(text)
    return found


def record_prompt(fields: dict) -> tuple[str | None, dict]:
    """The user prompt of a group or pair stream entry (None if unreadable), and its data."""
    try:
        data = json.loads(fields.get("data", fields.get(b"data")))
        messages = data["messages"]
    except (TypeError, ValueError, KeyError):
        return None, {}
    return (last_user_text(messages) if isinstance(messages, list) else None), data


def weights_finite(path: Path) -> bool:
    with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as f:
        return all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())  # noqa: SIM118


@torch.no_grad()
def mean_kl(
    policy: Policy,
    candidate: str,
    parent: str,
    messages_list: list[list[dict]],
    completions: list[list[int]],
    max_len: int,
    chunk: int = 4,
) -> float:
    """Mean per-token KL(candidate || parent) over the completions' positions."""
    total, tokens = 0.0, 0
    for i in range(0, len(messages_list), chunk):
        batch = build_batch(
            policy.tokenizer,
            messages_list[i : i + chunk],
            completions[i : i + chunk],
            max_len,
            append_eos=False,  # greedy ids already end with eos where the model stopped
        )
        ids = batch["input_ids"].to(policy.device)  # (B, T)
        attn = batch["attention_mask"].to(policy.device)  # (B, T)
        mask = batch["completion_mask"][:, 1:].to(policy.device).float()  # (B, T-1)
        logps = {}
        for name in (candidate, parent):
            with policy.use(name) as model:
                logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
                logps[name] = torch.log_softmax(logits.float(), dim=-1)
        lc, lp = logps[candidate], logps[parent]
        kl = (lc.exp() * (lc - lp)).sum(-1)  # (B, T-1)
        total += (kl * mask).sum().item()
        tokens += int(mask.sum().item())
    return total / max(tokens, 1)


def canary_accuracy(
    client: openai.OpenAI, version: str, canary: Sequence[LabeledQuestion], max_tokens: int
) -> float:
    """Share of the canary questions `version` answers right (greedy, through the service;
    the answer is extracted and compared as the worker's vote does)."""
    from judge import extract_answer, same_answer

    messages = [[{"role": "user", "content": q.prompt}] for q in canary]
    answers = [extract_answer(a[0].text) for a in ask(client, version, messages, max_tokens)]
    right = [
        a is not None and same_answer(a, q.answer) for a, q in zip(answers, canary, strict=True)
    ]
    return sum(right) / len(canary)


def vote_labels(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> list[str | None]:
    """The parent's majority answer to each prompt (TTRL's pseudo-label), voted from its
    sampled answers `samples` as the worker votes (stated results that hold where the group
    states any, judge/equation.py, else extracted final answers); None where the vote says
    nothing: the worker would not vote there (too few answers carry one,
    `judge.choose_method`), the top answers tie, or fewer than 2 samples agree. (Not the
    worker's bars: a label here only has to be the parent's likeliest answer, and both
    sides are measured against the same labels.)"""
    from judge import choose_method, extract_answers, majority_vote, vote_answers

    labels: list[str | None] = []
    for prompt, texts in zip(prompts, samples, strict=True):
        texts = list(texts)
        if choose_method(texts, prompt=prompt) != "ttrl":
            labels.append(None)
            continue
        vote = majority_vote(vote_answers(texts, prompt, extract_answers(texts)))
        labels.append(None if vote.tie or vote.majority_count < 2 else vote.label)
    return labels


def agrees(
    prompts: Sequence[str], labels: Sequence[str | None], answers: Sequence[str]
) -> list[bool]:
    """For each prompt with a label, whether the answer to it votes for the label (its
    stated result if it states one that holds, else its extracted final answer)."""
    from judge import extract_answer, same_answer, vote_answers

    out = []
    for prompt, label, text in zip(prompts, labels, answers, strict=True):
        if label is not None:
            answer = vote_answers([text], prompt, [extract_answer(text)])[0]
            out.append(answer is not None and same_answer(answer, label))
    return out


def judge_scores(
    client: openai.OpenAI,
    judge: str,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_tokens: int,
    scouts: int = JUDGE_SCOUTS,
) -> list[float | None]:
    """One greedy judgment per answer by version `judge` with the rubric, through the
    service; None where it does not parse. The first `scouts` are asked alone: when none
    of them parses the judge cannot score, and the rest are not asked (all None)."""
    from judge.llm_score import judge_messages, parse_score

    def scored(questions: Sequence[str], texts: Sequence[str]) -> list[float | None]:
        if not texts:
            return []
        messages = [judge_messages(q, t) for q, t in zip(questions, texts, strict=True)]
        judgments = [a[0].text for a in ask(client, judge, messages, max_tokens)]
        return [parse_score(j, t) for j, t in zip(judgments, texts, strict=True)]

    scores = scored(prompts[:scouts], answers[:scouts])
    if any(s is not None for s in scores):
        return scores + scored(prompts[scouts:], answers[scouts:])
    return scores + [None] * (len(answers) - len(scores))


def answer_ids(tokenizer, answer: Answer) -> list[int]:
    """The token ids of a served answer, ending in eos where the model ended it (the KL
    then also covers the choice to stop)."""
    ids = tokenizer.encode(answer.text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if answer.finished or not ids else ids


def run_gate(
    policy: Policy,
    client: openai.OpenAI,
    candidate: str,
    candidate_version: str,
    parent: str,
    candidate_path: Path,
    prompts: Sequence[str],
    kl_limit: float,
    reward_tolerance: float,
    max_tokens: int = 32,
    judge_tokens: int = 64,
    max_len: int = 1024,
    canary: Sequence[LabeledQuestion] = (),
    canary_tolerance: float = 0.05,
    canary_tokens: int = 64,
    vote_n: int = 16,
    vote_tolerance: int = 1,
    vote_min_prompts: int = 3,
    labels: Sequence[str | None] | None = None,
) -> GateResult:
    """Check `candidate_version` (registered, on disk at `candidate_path`, and loaded in
    `policy` as adapter `candidate`) against `parent` (`base` or vN). Answers and judgments
    come from the service (`client`); raises ServiceUnavailable when it cannot answer.
    Without a `canary`, the label-free vote check runs instead (`vote_verdict`), against
    `labels` (one per prompt, None: no label) where given, else the parent's votes."""
    from judge.llm_score import mean_score

    start = time.perf_counter()
    m: dict[str, float] = {}
    # --- 1. finite weights (before anything runs on them) ---
    finite = weights_finite(candidate_path)
    m["gate/finite"] = float(finite)
    if not finite:
        return GateResult(False, "weights are not finite (nan or inf)", m)

    given = list(labels) if labels is not None else [None] * len(prompts)
    short = [
        (p, label)
        for p, label in zip(prompts, given, strict=True)
        if len(prompt_ids(policy.tokenizer, [{"role": "user", "content": p}]))
        <= MAX_PROBE_PROMPT_TOKENS
    ]
    prompts = [p for p, _ in short] or BUILTIN_PROMPTS
    labelled = labels is not None and bool(short)  # else the parent votes
    messages = [[{"role": "user", "content": p}] for p in prompts]
    m["gate/probe_prompts"] = float(len(prompts))

    with ThreadPoolExecutor(max_workers=3) as pool:
        # --- 2. both sides' greedy answers, asked at once (the engine batches them), and,
        # with no canary to check against, the parent's sampled votes (T=1, as TTRL's) ---
        asked = {
            v: pool.submit(ask, client, v, messages, max_tokens)
            for v in (parent, candidate_version)
        }
        voted = (
            None
            if canary or labelled
            else pool.submit(ask, client, parent, messages, max_tokens, 1.0, vote_n)
        )
        parent_answers = [a[0] for a in asked[parent].result()]
        candidate_answers = [a[0].text for a in asked[candidate_version].result()]

        # --- 3. self-reward: the parent judges both sides' answers (served) ...
        judged = pool.submit(
            judge_scores,
            client,
            parent,
            list(prompts) * 2,
            candidate_answers + [a.text for a in parent_answers],
            judge_tokens,
        )
        # --- ... while the learner computes the KL to the parent on the parent's answers
        parent_ids = [answer_ids(policy.tokenizer, a) for a in parent_answers]
        kl = mean_kl(policy, candidate, parent, messages, parent_ids, max_len)
        m["gate/kl"] = kl
        both = judged.result()
        votes = [[a.text for a in v] for v in voted.result()] if voted else []

    # --- 4. the labeled canary, if there is one: both sides, greedy ---
    if canary:
        accuracy = {
            v: canary_accuracy(client, v, canary, canary_tokens)
            for v in (parent, candidate_version)
        }
        m["gate/canary_parent"], m["gate/canary_candidate"] = (
            accuracy[parent],
            accuracy[candidate_version],
        )
    # --- ... or, label-free: both sides' greedy answers against the groups' vote labels
    # (or the parent's majority vote)
    else:
        targets = [label for _, label in short] if labelled else vote_labels(prompts, votes)
        parent_agree = agrees(prompts, targets, [a.text for a in parent_answers])
        candidate_agree = agrees(prompts, targets, candidate_answers)
        n_voted = len(parent_agree)
        m["gate/vote_prompts"] = float(n_voted)
        m["gate/vote_from_groups"] = float(labelled)
        if n_voted:
            m["gate/vote_parent"] = sum(parent_agree) / n_voted
            m["gate/vote_candidate"] = sum(candidate_agree) / n_voted

    cand_scores, parent_scores = both[: len(prompts)], both[len(prompts) :]
    cand_mean, parent_mean = mean_score(cand_scores), mean_score(parent_scores)
    m["gate/judged_candidate"] = float(sum(s is not None for s in cand_scores))
    m["gate/judged_parent"] = float(sum(s is not None for s in parent_scores))
    skipped = cand_mean is None or parent_mean is None
    m["gate/reward_skipped"] = float(skipped)
    if not skipped:
        m["gate/reward_candidate"] = cand_mean
        m["gate/reward_parent"] = parent_mean
        m["gate/reward_drop"] = parent_mean - cand_mean
    m["gate/seconds"] = time.perf_counter() - start

    # --- verdict ---
    reason = verdict(kl, cand_mean, parent_mean, kl_limit, reward_tolerance, parent)
    if reason is None and canary:
        reason = canary_verdict(
            m["gate/canary_parent"], m["gate/canary_candidate"], canary_tolerance
        )
    notes: list[str] = []
    if not canary:
        vote_reason, skipped_because = vote_verdict(
            n_voted,
            sum(parent_agree),
            sum(candidate_agree),
            vote_tolerance,
            vote_min_prompts,
            parent,
            "the groups' vote labels" if labelled else f"{parent}'s majority vote",
        )
        m["gate/vote_skipped"] = float(skipped_because is not None)
        notes += [skipped_because] if skipped_because else []
        reason = reason or vote_reason
    return GateResult(reason is None, reason, m, notes)


def verdict(
    kl: float,
    candidate_reward: float | None,
    parent_reward: float | None,
    kl_limit: float,
    reward_tolerance: float,
    parent: str = "parent",
) -> str | None:
    """Why the candidate fails, or None if it passes (a reward of None: not judged)."""
    if not kl <= kl_limit:  # also catches a nan KL
        return f"KL to {parent} {kl:.4f} > limit {kl_limit}"
    if candidate_reward is None or parent_reward is None:
        return None
    drop = parent_reward - candidate_reward
    if drop > reward_tolerance:
        return (
            f"self-reward dropped {drop:.3f} ({parent_reward:.3f} -> {candidate_reward:.3f}) "
            f"> tolerance {reward_tolerance}"
        )
    return None


def canary_verdict(
    parent_accuracy: float, candidate_accuracy: float, tolerance: float
) -> str | None:
    """Why the candidate fails the canary, or None if it passes."""
    drop = parent_accuracy - candidate_accuracy
    if drop > tolerance:
        return (
            f"canary accuracy dropped {drop:.3f} ({parent_accuracy:.3f} -> "
            f"{candidate_accuracy:.3f}) > tolerance {tolerance}"
        )
    return None


def vote_verdict(
    voted: int,
    parent_agree: int,
    candidate_agree: int,
    tolerance: int,
    min_prompts: int,
    parent: str = "parent",
    labels_from: str | None = None,
) -> tuple[str | None, str | None]:
    """The label-free check: (why the candidate fails, or None; why the check was
    skipped, or None).

    Of the `voted` probe prompts that have a majority label (`labelled_prompts` or
    `vote_labels`, named by `labels_from` in the reason), the parent's greedy answer
    matches it on `parent_agree`, the candidate's on `candidate_agree`. The
    candidate fails if it matches on more than `tolerance` prompts fewer. The parent's
    own greedy rate is the bar, not 100%: a greedy answer and a T=1 majority differ now
    and then even for one model.

    Why a count of prompts, not a fraction: the probe holds `gate_probe_size` prompts (8
    by default) and only some get a label, so a rate moves in steps of 1/voted (a third
    with 3 voted prompts, a fifth with 5): a tolerance of 0.1 would mean "none" on any
    probe this small, and what a fraction forgives would change with the number of
    labeled prompts. With fewer than `min_prompts` labeled prompts the check passes, with
    the note "too few voted prompts": no evidence is not a regression (the KL and
    self-reward checks still run).

    Figures, SmolLM2-135M as parent, 10 "What is a + b?" prompts, 32-token answers, three
    draws of 16 votes: 5-8 prompts got a label, and base's greedy answers matched 4, 4, 3
    of them. Random LoRAs on it (tests/service/harness.py `make_adapter`) matched, draw by
    draw: x0.25 (answers barely changed) 4, 3, 3; x0.5: 3, 2, 3; x1 (visibly worse,
    "4 + 4 = 4"): 2, 2, 3; x8 (noise): 0, 0, 0. So tolerance 1 refuses the noise every
    time, the x1 adapter 2 times of 3, x0.5 once, x0.25 never; tolerance 0 would also
    refuse the near-copy x0.25 once in 3. With 8 votes instead of 16 fewer prompts get a label (4-6
    of 10) and base matches fewer (1-3), and the noise adapter passed 2 draws of 6:
    hence 16 votes by default.
    """
    need = max(min_prompts, 1)
    if voted < need:
        return None, f"vote check skipped: too few voted prompts ({voted} < {need})"
    drop = parent_agree - candidate_agree
    if drop > tolerance:
        source = labels_from or f"{parent}'s majority vote"
        return (
            f"vote agreement dropped by {drop} prompts: {candidate_agree}/{voted} of the "
            f"candidate's greedy answers match {source}, {parent_agree}/"
            f"{voted} of {parent}'s own (tolerance {tolerance})"
        ), None
    return None, None
