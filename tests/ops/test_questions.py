"""The labeled-question generator: deterministic, right gold answers, and a JSONL format
the worker's probe loader reads."""

import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from judge import extract_answer, majority_vote, same_answer
from ops.questions import SHORT_CUE, SHORT_QUESTIONS, make_labeled_set, make_learning_set
from strop.labeled import LabeledQuestion, read_jsonl, write_jsonl
from worker.probe import load_probes, probe_key, probe_obs

ARITHMETIC_RE = re.compile(r"^What is (\d+) ([+\-×]) (\d+)\?$")
ROOT = Path(__file__).resolve().parents[2]
OPS = {"+": operator.add, "-": operator.sub, "×": operator.mul}


def test_make_labeled_set_same_seed_same_questions():
    assert make_labeled_set(40, seed=7) == make_labeled_set(40, seed=7)
    assert make_labeled_set(40, seed=7) != make_labeled_set(40, seed=8)


def test_make_labeled_set_other_hash_seed_same_questions():
    """Nothing depends on Python's per-process string hashing."""
    code = "from ops.questions import make_labeled_set as m; print(repr(m(30, seed=3)))"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            cwd=ROOT,
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] == repr(make_labeled_set(30, seed=3)) + "\n"


def test_make_labeled_set_arithmetic_gold_is_recomputed_answer():
    questions = make_labeled_set(300, seed=0, kinds=("arithmetic",))
    assert {q.kind for q in questions} == {"arithmetic"}
    ops_seen = set()
    for q in questions:
        m = ARITHMETIC_RE.match(q.prompt)
        assert m, q.prompt
        a, op, b = int(m[1]), m[2], int(m[3])
        ops_seen.add(op)
        assert q.answer == str(OPS[op](a, b))
        assert int(q.answer) >= 0  # subtraction never goes below zero
    assert ops_seen == {"+", "-", "×"}


def test_make_labeled_set_short_gold_matches_builtin_list():
    gold = dict(SHORT_QUESTIONS)
    questions = make_labeled_set(len(SHORT_QUESTIONS), seed=1, kinds=("short",))
    assert len({q.prompt for q in questions}) == len(SHORT_QUESTIONS)
    for q in questions:
        assert q.kind == "short" and q.prompt.endswith(" " + SHORT_CUE)
        assert q.answer == gold[q.prompt.removesuffix(" " + SHORT_CUE)]


def test_make_labeled_set_both_kinds_half_short_and_all_distinct():
    questions = make_labeled_set(40, seed=2)
    assert sum(q.kind == "short" for q in questions) == 20
    # demo's traffic: more than the short list holds, so the rest is arithmetic
    big = make_labeled_set(400, seed=1)
    assert len({q.prompt for q in big}) == 400
    assert sum(q.kind == "short" for q in big) == len(SHORT_QUESTIONS)


def test_make_labeled_set_prefix_has_both_kinds():
    """The bench and demo take prefixes of a set: the kinds are interleaved, not blocked."""
    kinds = [q.kind for q in make_labeled_set(40, seed=0)]
    assert set(kinds[:8]) == {"arithmetic", "short"}


def test_make_labeled_set_impossible_requests_raise():
    with pytest.raises(ValueError):
        make_labeled_set(len(SHORT_QUESTIONS) + 1, seed=0, kinds=("short",))
    with pytest.raises(ValueError):
        make_labeled_set(5, seed=0, kinds=("trivia",))
    with pytest.raises(ValueError):
        make_labeled_set(-1, seed=0)
    assert make_labeled_set(0, seed=0) == []


def test_gold_answers_are_what_the_judge_extracts():
    """A reply stating the gold answer in the cued form is judged equal to the gold."""
    for _, answer in SHORT_QUESTIONS:
        got = extract_answer(f"The answer is {answer}.")
        assert got is not None and same_answer(got, answer), answer
    for q in make_labeled_set(30, seed=4, kinds=("arithmetic",)):
        got = extract_answer(f"{q.prompt.removeprefix('What is ').rstrip('?')} = {q.answer}")
        assert got is not None and same_answer(got, q.answer), q


def test_write_jsonl_read_jsonl_round_trips(tmp_path):
    questions = make_labeled_set(25, seed=5)
    path = write_jsonl(questions, tmp_path / "labeled.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25
    assert set(json.loads(lines[0])) == {"prompt", "answer", "kind"}
    assert read_jsonl(path) == questions


def test_read_jsonl_probe_file_without_kind_guesses_it(tmp_path):
    path = tmp_path / "probe.jsonl"
    rows = [
        {"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": "Capital of Peru?", "answer": "Lima"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_jsonl(path) == [
        LabeledQuestion("What is 2 + 3?", "5", "arithmetic"),
        LabeledQuestion("Capital of Peru?", "Lima", "short"),
    ]


def test_read_jsonl_bad_line_raises_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n" + '{"prompt": "q"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_load_probes_reads_written_file(tmp_path):
    questions = make_labeled_set(20, seed=6)
    probes = load_probes(write_jsonl(questions, tmp_path / "probe.jsonl"))
    assert len(probes) == 20
    for q in questions:
        assert probes[probe_key([{"role": "user", "content": q.prompt}])] == q.answer


def test_probe_obs_with_written_gold_scores_right_vote_as_right(tmp_path):
    """The worker's monitoring, fed from the file: a majority on the gold is label-right."""
    q = LabeledQuestion("What is 3 + 4?", "7", "arithmetic")
    probes = load_probes(write_jsonl([q], tmp_path / "probe.jsonl"))
    answers = ["7", "7", "8", None]
    vote = majority_vote(answers)
    label_acc, reward_acc = probe_obs(
        probes, [{"role": "user", "content": q.prompt}], answers, vote, vote.rewards, "base"
    )
    assert (label_acc.metric, label_acc.value) == ("label_accuracy", 1.0)
    assert (reward_acc.metric, reward_acc.value) == ("reward_accuracy", 1.0)


def test_make_learning_set_parts_share_skills_not_wording_and_answers_are_right():
    stream, held = make_learning_set(300, 0, "stream"), make_learning_set(60, 0, "held_out")

    assert make_learning_set(300, 0, "stream") == stream  # deterministic
    assert {q.kind for q in stream} == {q.kind for q in held} == {"arithmetic", "word", "short"}
    assert not {q.prompt for q in stream} & {q.prompt for q in held}
    # held-out arithmetic is worded apart from the stream's ("What is 3 + 4?" never)
    assert not any(q.prompt.startswith("What is ") for q in held if q.kind == "arithmetic")
    for q in stream + held:
        if q.kind == "arithmetic":
            a, op, b = re.search(r"(\d+) (\+|-|×|plus|minus|times) (\d+)", q.prompt).groups()
            op = {"plus": "+", "minus": "-", "times": "×"}.get(op, op)
            assert str(OPS[op](int(a), int(b))) == q.answer
