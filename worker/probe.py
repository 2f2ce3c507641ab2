"""Honest label-free monitoring: how right TTRL's pseudo-labels are, on labeled probe prompts.

The probe file (JSONL, {"prompt": ..., "answer": ...}) holds gold answers. They are read
here and only here, and `probe_obs` runs after a group's rewards are final: it turns
gold answers into monitoring series (label_accuracy, reward_accuracy) and nothing else.
No reward, group or pair ever sees a gold answer.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from judge import VoteResult, extract_answer, same_answer
from strop.labeled import read_jsonl
from strop.series import Obs
from worker.prompts import last_user_text, normalise

log = logging.getLogger("strop.worker.probe")


def load_probes(path: Path | None) -> dict[str, str]:
    """Normalised probe prompt -> gold answer (empty without a file). A malformed file
    raises ValueError naming the line (`strop.labeled.read_jsonl`)."""
    if path is None:
        return {}
    probes = {normalise(q.prompt): q.answer for q in read_jsonl(path)}
    log.info("probe file %s: %d labeled prompts", path, len(probes))
    return probes


def probe_key(messages: list[dict[str, Any]]) -> str:
    """What a probe prompt is compared with: the last user message, normalised."""
    return normalise(last_user_text(messages))


def probe_obs(
    probes: dict[str, str],
    messages: list[dict[str, Any]],
    answers: list[str | None],
    vote: VoteResult | None,
    rewards: Sequence[float] | None,
    version: str,
) -> list[Obs]:
    """TTRL's label accuracy (majority label vs gold) and reward accuracy (share of the N
    rewards equal to the rewards gold would give), if the prompt is a probe."""
    gold_text = probes.get(probe_key(messages)) if probes else None
    if gold_text is None or vote is None or rewards is None:
        return []
    gold = extract_answer(gold_text) or gold_text.strip()
    label_ok = vote.label is not None and same_answer(vote.label, gold)
    gold_rewards = [1.0 if a and same_answer(a, gold) else 0.0 for a in answers]
    agree = sum(r == g for r, g in zip(rewards, gold_rewards, strict=True))
    return [
        Obs("label_accuracy", version, float(label_ok)),
        Obs("reward_accuracy", version, agree / len(answers)),
    ]
