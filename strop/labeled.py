"""Labeled questions on disk: the JSONL format of probe, canary and held-out files.

One `{"prompt", "answer", "kind"}` object per line. The worker's probe file
(`STROP_PROBE_FILE`), `strop demo`'s held-out set and the benchmarks all use it; gold
answers are for measuring only and never reach a reward.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["arithmetic", "short", "word"]  # word: a one-step arithmetic word problem
KINDS: tuple[Kind, ...] = ("arithmetic", "short", "word")


@dataclass(frozen=True)
class LabeledQuestion:
    """One question and its gold answer."""

    prompt: str  # the user message, as sent to the model
    answer: str  # the gold answer, as the judge would extract it ("42", "Paris")
    kind: Kind


def write_jsonl(questions: Iterable[LabeledQuestion], path: str | Path) -> Path:
    """Write one `{"prompt", "answer", "kind"}` object per line: the probe-file format
    worker/probe.py reads (it uses `prompt` and `answer` and ignores `kind`)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            line = {"prompt": q.prompt, "answer": q.answer, "kind": q.kind}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[LabeledQuestion]:
    """Read a file `write_jsonl` wrote (or any probe file: `kind` defaults from the answer).

    Blank lines are skipped; a line that is not a `{prompt, answer}` object raises
    ValueError naming it, since a silently shorter labeled set would skew every figure.
    """
    out: list[LabeledQuestion] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                prompt, answer = str(item["prompt"]), str(item["answer"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {n} is not a {{prompt, answer}} object") from e
            kind = item.get("kind")
            if kind not in KINDS:  # a hand-written probe file: guess from the question
                kind = "arithmetic" if _is_arithmetic(prompt) else "short"
            out.append(LabeledQuestion(prompt, answer, kind))
    return out


def _is_arithmetic(prompt: str) -> bool:
    return prompt.startswith("What is ") and any(op in prompt for op in (" + ", " - ", " × "))
