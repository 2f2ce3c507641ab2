"""The promotion gate: a candidate version is promoted only if, on a probe set of recent
user prompts,

1. its weights are finite;
2. it stays close to its parent: the mean per-token KL(candidate || parent), over full
   next-token distributions at the positions of the parent's greedy answer, is at most
   `kl_limit`;
3. with a canary set (`STROP_CANARY_FILE`, labeled), its greedy accuracy there is at most
   `canary_tolerance` below the parent's;
4. its self-reward has not dropped: the parent, as judge (the same judge for both sides,
   and not the candidate grading itself), scores the candidate's and the parent's greedy
   answers with the judge rubric (judge/llm_score.py, K=1); the candidate's mean may be at
   most `reward_tolerance` below the parent's. When no judgment of one side parses there
   is no evidence either way, and the check is skipped (recorded as `gate/reward_skipped`).

Every generation (both sides' greedy answers, the parent's judgments) is an internal
request to the service, which serves the candidate to it pinned before any user can reach
it (learner/serving.py); the learner computes only what needs its own weights: the KL.
Generations are greedy and short, so the gate is deterministic and cheap.
"""

import logging
import time
from collections.abc import Sequence
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


@dataclass
class GateResult:
    passed: bool
    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """What goes into a version's metadata and the registry."""
        return {"passed": self.passed, "reason": self.reason, **self.metrics}


def probe_prompts(r: redis.Redis, keys: Keys, size: int, scan: int = 500) -> list[str]:
    """The last `size` distinct user prompts of the prompt log, newest first; the built-in
    prompts when the log is empty."""
    found: list[str] = []
    for _, fields in r.xrevrange(keys.prompt_log, count=scan):
        try:
            record = PromptLogRecord.from_stream(fields)
        except ValueError:
            continue
        users = [m.get("content") for m in record.messages if m.get("role") == "user"]
        text = users[-1] if users else None
        if isinstance(text, str) and text.strip() and text not in found:
            found.append(text)
        if len(found) >= size:
            break
    return found or BUILTIN_PROMPTS[:size]


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


def judge_scores(
    client: openai.OpenAI,
    judge: str,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_tokens: int,
) -> list[float | None]:
    """One greedy judgment per answer by version `judge` with the rubric, through the
    service; None where it does not parse."""
    from judge.llm_score import judge_messages, parse_score

    messages = [judge_messages(p, a) for p, a in zip(prompts, answers, strict=True)]
    judgments = [a[0].text for a in ask(client, judge, messages, max_tokens)]
    return [parse_score(j, a) for j, a in zip(judgments, answers, strict=True)]


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
) -> GateResult:
    """Check `candidate_version` (registered, on disk at `candidate_path`, and loaded in
    `policy` as adapter `candidate`) against `parent` (`base` or vN). Answers and judgments
    come from the service (`client`); raises ServiceUnavailable when it cannot answer."""
    from judge.llm_score import mean_score

    start = time.perf_counter()
    m: dict[str, float] = {}
    # --- 1. finite weights (before anything runs on them) ---
    finite = weights_finite(candidate_path)
    m["gate/finite"] = float(finite)
    if not finite:
        return GateResult(False, "weights are not finite (nan or inf)", m)

    prompts = [
        p
        for p in prompts
        if len(prompt_ids(policy.tokenizer, [{"role": "user", "content": p}]))
        <= MAX_PROBE_PROMPT_TOKENS
    ] or BUILTIN_PROMPTS
    messages = [[{"role": "user", "content": p}] for p in prompts]
    m["gate/probe_prompts"] = float(len(prompts))

    with ThreadPoolExecutor(max_workers=2) as pool:
        # --- 2. both sides' greedy answers, asked at once (the engine batches them) ---
        asked = {
            v: pool.submit(ask, client, v, messages, max_tokens)
            for v in (parent, candidate_version)
        }
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
    return GateResult(reason is None, reason, m)


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
