"""Label-free, honestly: gold answers of probe prompts feed monitoring, never a reward."""

import json
import time

import pytest

from strop.records import ScoredGroup
from strop.series import read_series
from tests.worker.conftest import log_record
from worker.build import build_group, sample, score
from worker.context import make_context
from worker.probe import load_probes, probe_obs

PROMPT = "Pick: 1 or 2?"


def probe_file(tmp_path, answer: str, *extra: str):
    path = tmp_path / "probe.jsonl"
    lines = [json.dumps({"prompt": "  pick: 1 OR 2? ", "answer": answer}), "", *extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_probes_normalises_prompts_and_skips_blank_lines(tmp_path):
    assert load_probes(probe_file(tmp_path, "\\boxed{7}")) == {"pick: 1 or 2?": "\\boxed{7}"}
    assert load_probes(None) == {}


def test_load_probes_bad_line_raises_naming_it(tmp_path):
    # a silently shorter probe set would skew the accuracy series: refuse the file
    with pytest.raises(ValueError, match="line 3 is not a"):
        load_probes(probe_file(tmp_path, "7", "not json"))


def test_probe_rewards_identical_with_and_without_probe_file(ctx, worker_settings, tmp_path):
    probed_ctx = make_context(
        worker_settings.model_copy(update={"probe_file": probe_file(tmp_path, "\\boxed{7}")})
    )
    messages = [{"role": "user", "content": PROMPT}]
    deadline = time.monotonic() + 30
    samples = sample(ctx, messages, deadline)  # one draw, scored twice
    plain, probed = (
        score(ctx, messages, samples, deadline),
        score(probed_ctx, messages, samples, deadline),
    )
    assert plain == probed
    assert (
        probe_obs(ctx.probes, messages, list(plain.answers), plain.vote, plain.vote_rewards, "base")
        == []
    )

    # gold says 7, which no sample answers: the label is wrong, and so is every reward 1.0
    label_acc, reward_acc = probe_obs(
        probed_ctx.probes, messages, list(probed.answers), probed.vote, probed.vote_rewards, "base"
    )
    assert (label_acc.metric, label_acc.value) == ("label_accuracy", 0.0)
    assert reward_acc.metric == "reward_accuracy"
    assert reward_acc.value == probed.vote_rewards.count(0.0) / 9


def test_probe_build_records_accuracy_and_rewards_follow_the_vote(worker_settings, tmp_path, r):
    c = make_context(worker_settings.model_copy(update={"probe_file": probe_file(tmp_path, "1")}))
    log_id = r.xadd(c.keys.prompt_log, log_record(PROMPT))
    outcome = build_group(c, log_id)
    assert outcome in ("built", "no_signal")

    label_acc = read_series(r, c.keys, "label_accuracy")["base"]
    reward_acc = read_series(r, c.keys, "reward_accuracy")["base"]
    assert sum(pt.count for pt in label_acc) == 1 and sum(pt.count for pt in reward_acc) == 1
    # with answers 1 and 2 only, the vote is right about every sample or about none
    right = label_acc[-1].sum == 1.0
    assert reward_acc[-1].sum == (1.0 if right else 0.0)
    # the trained-on label accuracy counts this prompt only if its group was written
    trained = read_series(r, c.keys, "trained_label_accuracy").get("base", [])
    assert [(pt.sum, pt.count) for pt in trained] == (
        [(label_acc[-1].sum, 1)] if outcome == "built" else []
    )
    if outcome == "built":
        (g,) = [ScoredGroup.from_stream(f) for _, f in r.xrange(c.keys.groups)]
        # the rewards are the vote's, even where gold disagrees with it
        assert g.rewards == [float(x == g.majority_label) for x in g.completions]
        assert (g.majority_label == "1") == right
