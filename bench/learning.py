"""Learning benchmark: does strop make the model better on its own unlabeled traffic?

The measure of the whole product. Arms, one after the other on the same prompts and the
same wall-clock budget (`--minutes` of traffic each):

- `strop`: the whole loop as `strop up` runs it (service, Celery worker with beat,
  learner: separate processes, the product's defaults), fed a stream of unlabeled user
  prompts (`ops.questions.make_learning_set(part="stream")`: bare arithmetic, one-step
  word problems, short facts) through the `openai` client, paced by the worker's backlog
  as `strop demo` paces itself;
- `feedback`: the `strop` arm plus, on `--feedback-share` of the stream's prompts (the same
  ones every run: a seeded draw), the true answer posted as feedback on the served
  completion (POST /v1/strop/feedback, as `strop demo --feedback` does), as a user who
  sometimes corrects the service would; the worker takes it as those groups' label;
- `oracle`: the same loop with gold rewards (`STROP_REWARD_METHOD=gold`): the ceiling. If
  even this cannot lift the model in the budget, the budget or the model is the limit;
- `trl`: the peer a practitioner would pick: TRL's `GRPOTrainer` with LoRA (strop's rank,
  targets and learning rate) and the same label-free majority-vote reward, on the same
  prompts in the same order; its adapter is saved every `--trl-save-minutes`.

Then every version an arm produced (promoted or rejected) and the base model are scored on
a held-out labeled set that shares the skills but not the wording (`part="held_out"`),
never logged and never trained on: pass@1 and maj@8 (8 samples at T=1, internal requests
pinned to the version through a `strop serve` on the arm's adapters), the flip rate
(held-out questions whose majority answer was right under the version before and is wrong
now), mean answer length, and KL to base (on base's greedy held-out answers). For the
loop arms (all but trl), the worker's own monitoring of the groups each version sampled:
label accuracy and reward accuracy (the stream is also the worker's probe file: gold
answers for monitoring only, never a reward) and majority ratio, over every group sampled
and again over the groups written for training (`trained_*`).

Prints a table, writes bench/results/learning.json and bench/results/learning.png
(held-out pass@1 against minutes, per arm).

    python bench/learning.py [--minutes 60] [--arms strop,feedback,oracle,trl]
                             [--feedback-share 0.1] [--held-out 48] [--set STROP_NAME=VALUE ...]
                             [--tag TAG] [--add-to EARLIER.json]

Four 60-minute arms and their scoring take about 5 hours on 2 cores; `--add-to` joins
arms run in another sitting (same setup, checked) into one table and plot. A recipe trial
(`--set ...`) names its arms `ARM+TAG` with `--tag`, so it sits beside the defaults' arms.
"""

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/learner.py must not hide learner/

import openai  # noqa: E402
from gate import free_port, wait_healthy  # noqa: E402  (the gate bench's: one way)

from judge import extract_answer, extract_answers, majority_vote, same_answer  # noqa: E402
from ops.demo import FeedbackSender  # noqa: E402
from ops.questions import make_learning_set  # noqa: E402
from strop.connection import connect  # noqa: E402
from strop.headers import INTERNAL  # noqa: E402
from strop.labeled import LabeledQuestion, write_jsonl  # noqa: E402
from strop.records import Keys, ScoredGroup  # noqa: E402
from strop.registry import Registry  # noqa: E402
from strop.series import TRAINED_METRICS, read_series  # noqa: E402
from strop.settings import Settings  # noqa: E402
from strop.snapshot import queues  # noqa: E402
from strop.versions import pinned_model  # noqa: E402
from worker.build import Samples, score_ttrl  # noqa: E402

SAMPLES = 8  # held-out samples per question: pass@1 is their mean, maj@8 their vote
EVAL_TOKENS = 64
BACKLOG = 4  # prompts waiting for the worker before the feeder holds back
# the worker's series per version: every group sampled, then the groups trained on
MONITORED = TRAINED_METRICS + tuple(f"trained_{m}" for m in TRAINED_METRICS)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="traffic per arm")
    p.add_argument("--arms", default="strop,feedback,oracle,trl")
    p.add_argument(
        "--feedback-share",
        type=float,
        default=0.1,
        help="feedback arm: share of the stream's prompts whose true answer is sent as feedback",
    )
    p.add_argument("--stream", type=int, default=600, help="prompts in the traffic stream")
    p.add_argument("--held-out", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-save-minutes", type=float, default=10.0)
    p.add_argument(
        "--eval-max",
        type=int,
        default=0,
        help="score at most this many versions per arm, evenly spaced, the last always "
        "(0: every version; each costs 1-2 minutes on 2 cores)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learning.json")
    p.add_argument(
        "--add-to",
        type=Path,
        help="an earlier run's JSON with the same --minutes, --stream, --held-out, --seed and "
        "--feedback-share: its arms join this run's table and plot (an arm named in --arms is "
        "run again), so the arms of one comparison may run in different sittings",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STROP_NAME=VALUE",
        help="a setting for every arm instead of the product's default (recipe trials)",
    )
    p.add_argument(
        "--tag",
        help="name this run's arms ARM+TAG (a recipe trial beside the defaults' arms of "
        "--add-to); each arm records its --set values",
    )
    return p.parse_args()


def settings_of(env: dict) -> Settings:
    """The settings an arm's processes read from `env` (its STROP_ variables)."""
    fields = {k[6:].lower(): v for k, v in env.items() if k.startswith("STROP_")}
    return Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})


def stop(proc: subprocess.Popen, timeout: float = 120) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the loop arms: strop up, fed traffic ------------------------------------------------------


def run_loop_arm(
    name: str,
    env: dict,
    stream: list[LabeledQuestion],
    minutes: float,
    rated: frozenset[int] = frozenset(),
) -> dict:
    """`strop up` with `env`, fed the stream for `minutes`; returns what to evaluate. The
    prompts at the `rated` indices of the stream get their true answer sent as feedback."""
    port = int(env["STROP_PORT"])
    url = f"http://127.0.0.1:{port}"
    up = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up"],
        env=env,
        cwd=env["WORKDIR"],
        stdout=open(Path(env["WORKDIR"]) / "up.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(url + "/health", up, "strop up")
        settings = Settings(redis_prefix=env["STROP_REDIS_PREFIX"], service_url=url)
        r, keys = connect(settings.redis_url), Keys(settings.redis_prefix)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        fb = FeedbackSender(settings) if rated else None  # the same key as `client`'s

        def ask(q: LabeledQuestion, rate: bool) -> bool | None:
            resp = client.chat.completions.create(
                model="strop",
                max_tokens=EVAL_TOKENS,
                messages=[{"role": "user", "content": q.prompt}],
            )
            return fb.send(resp.id, q.answer) if rate else None  # retries the 404 of a fresh id

        start, sent, asked = time.time(), 0, []
        print(f"[{name}] traffic for {minutes:.0f} min", flush=True)
        with ThreadPoolExecutor(2) as pool:
            for i, q in enumerate(stream):
                if time.time() - start > minutes * 60:
                    break
                while time.time() - start < minutes * 60:
                    q_now = queues(r, keys, settings)
                    if (q_now["build"] or 0) + (q_now["prompt_log"]["lag"] or 0) < BACKLOG:
                        break
                    time.sleep(2)
                asked.append(pool.submit(ask, q, fb is not None and i in rated))
                sent += 1
                time.sleep(1.0)
            # A fast arm can send the whole stream early; it keeps its wall clock, so the
            # backlog still becomes versions and arms are compared at the same minutes.
            elapsed = (time.time() - start) / 60
            ran_out = elapsed if sent == len(stream) and elapsed < minutes else None
            if ran_out is not None:
                print(
                    f"[{name}] stream sent by {ran_out:.1f} min; waiting out the clock", flush=True
                )
                time.sleep(max(0.0, minutes * 60 - (time.time() - start)))
        # a failed request is one prompt less, as before: no feedback on it either
        rates = [f.result() for f in asked if f.exception() is None and f.result() is not None]
        feedback = {"sent": len(rates), "accepted": sum(rates)} if fb is not None else None
        if fb is not None:
            fb.close()
        # Leaving the pool waits for the last requests (and feedback retries), and the
        # learner goes on meanwhile: a version made after the clock is not the arm's.
        made = Registry(r, keys).all()
        versions = [v for v in made if v.created - start <= minutes * 60]
        late = len(made) - len(versions)
        print(
            f"[{name}] sent {sent} prompts; {len(versions)} versions"
            + (f" ({late} more after the clock, not scored)" if late else "")
            + (f"; feedback accepted {feedback['accepted']} of {feedback['sent']}" if fb else ""),
            flush=True,
        )
        monitoring = {
            metric: {
                v: _mean(points) for v, points in read_series(r, keys, metric, since=start).items()
            }
            for metric in MONITORED
        }
        by_kind = trained_by_kind(r, keys, stream)
        print(
            f"[{name}] groups written, by skill: "
            + ", ".join(
                f"{k} {c['groups']} (label right {c['label_right']} of {c['labelled']})"
                for k, c in by_kind.items()
            ),
            flush=True,
        )
        return {
            "start": start,
            "sent": sent,
            "stream_ran_out_min": ran_out,
            "versions_after_clock": late,
            "feedback": feedback,
            "trained_by_kind": by_kind,
            "versions": [
                {
                    "version": v.version,
                    "status": v.status,
                    "minutes": (v.created - start) / 60,
                    "gate": v.gate,
                    "reason": v.reason,
                }
                for v in versions
            ],
            "monitoring": monitoring,
        }
    finally:
        stop(up)


def trained_by_kind(r, keys: Keys, stream: list[LabeledQuestion]) -> dict[str, dict[str, int]]:
    """Groups the worker wrote for training, per skill of their prompt: how many, how many
    carry a majority label, and how many of those labels are the true answer (the short
    facts' lift differs most between arms, so: are they trained on at all?)."""
    kind_of = {q.prompt: q for q in stream}
    counts = {
        k: {"groups": 0, "labelled": 0, "label_right": 0}
        for k in sorted(Counter(q.kind for q in stream))
    }
    for _, fields in r.xrange(keys.groups):
        group = ScoredGroup.from_stream(fields)
        q = kind_of.get(group.messages[-1]["content"])
        if q is None:  # not a stream prompt: the arms send none, kept for safety
            continue
        c = counts[q.kind]
        c["groups"] += 1
        if group.majority_label is not None:
            c["labelled"] += 1
            c["label_right"] += same_answer(group.majority_label, q.answer)
    return counts


def _mean(points) -> float | None:
    total, count = sum(p.sum for p in points), sum(p.count for p in points)
    return total / count if count else None


# --- the TRL arm: GRPOTrainer with LoRA and the majority-vote reward ----------------------------


def run_trl_arm(env: dict, stream: list[LabeledQuestion], minutes: float, save_min: float) -> dict:
    """TRL's GRPOTrainer on the same prompts, for `minutes`; adapters saved as vN."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from strop.model import default_model_dir

    s = settings_of(env)
    torch.set_num_threads(os.cpu_count() or 1)
    adapters = Path(env["STROP_ADAPTER_DIR"])
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q.prompt}]} for q in stream])
    group = s.n_train  # completions per prompt, as strop trains on

    def majority_reward(prompts, completions, **_) -> list[float]:
        # strop's own reward and drop rule (worker/build.py), group by group: TRL hands the
        # batch's completions in groups of `num_generations` per prompt
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rewards: list[float] = []
        for i in range(0, len(texts), group):
            chunk, prompt = texts[i : i + group], prompts[i]
            prompt = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            scored = score_ttrl(
                Samples("trl", "trl", tuple(chunk), tuple(() for _ in chunk)),
                extract_answers(chunk),
                len(chunk),
                s.min_majority_ratio,
                prompt,
                s.min_verified_votes,
            )
            rewards += list(scored.rewards) if scored.drop is None else [0.0] * len(chunk)
        return rewards

    start = time.time()
    saved: list[dict] = []

    class Budget(TrainerCallback):
        last = start

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            if now - self.last >= save_min * 60 or now - start >= minutes * 60:
                version = f"v{len(saved) + 1}"
                trainer.model.save_pretrained(adapters / version)  # the LoRA weights only
                saved.append({"version": version, "status": "saved", "minutes": (now - start) / 60})
                print(f"[trl] step {state.global_step}: saved {version}", flush=True)
                self.last = now
            if now - start >= minutes * 60:
                control.should_training_stop = True

    config = GRPOConfig(
        output_dir=str(Path(env["WORKDIR"]) / "trl"),
        learning_rate=s.learning_rate,
        per_device_train_batch_size=group,
        num_generations=group,
        max_completion_length=s.sample_max_tokens,
        temperature=s.sample_temperature,
        beta=s.grpo_kl_coef,
        epsilon=s.grpo_clip,
        max_steps=10_000,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = GRPOTrainer(
        model=str(default_model_dir(s.model_cache_dir)),
        reward_funcs=majority_reward,
        args=config,
        train_dataset=data,
        peft_config=LoraConfig(
            r=s.lora_rank,
            lora_alpha=s.lora_alpha,
            target_modules=list(s.lora_target_modules),
            task_type="CAUSAL_LM",
        ),
        callbacks=[Budget()],
    )
    print(f"[trl] GRPOTrainer for {minutes:.0f} min", flush=True)
    trainer.train()
    return {"start": start, "sent": None, "versions": saved, "monitoring": {}}


# --- scoring every version on the held-out set ------------------------------------------------


def spaced(versions: list[dict], most: int) -> list[dict]:
    """At most `most` of the versions, evenly spaced in time, the latest always (0: all)."""
    if not most or len(versions) <= most:
        return versions
    step = (len(versions) - 1) / (most - 1) if most > 1 else 0
    picks = sorted({round(len(versions) - 1 - i * step) for i in range(most)})
    return [versions[i] for i in picks]


@contextlib.contextmanager
def served(env: dict) -> Iterator[openai.OpenAI]:
    """A `strop serve` on `env`'s adapters for the scoring, and an internal client to it
    (never logged, never trained on)."""
    port = free_port()
    serve_env = env | {"STROP_PORT": str(port), "STROP_TORCH_THREADS": "0"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)],
        env=serve_env,
        cwd=env["WORKDIR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/health", serve, "strop serve")
        yield openai.OpenAI(
            base_url=url + "/v1",
            api_key="none",
            max_retries=2,
            timeout=900,
            default_headers={INTERNAL: "1"},
        )
    finally:
        stop(serve, 60)


def evaluate(env: dict, arm: dict, held: list[LabeledQuestion]) -> list[dict]:
    """pass@1, maj@8, flips, length and KL to base of base and every version of the arm."""
    with served(env) as client:
        rows, before = [], None
        for v in [{"version": "base", "status": "base", "minutes": 0.0}] + arm["versions"]:
            t = time.time()
            if v["version"] == "base" and "base" in _scored:  # the same seeded draws
                row = dict(_scored["base"])
            else:
                row = v | score_version(client, v["version"], held)
                if v["version"] == "base":
                    _scored["base"] = dict(row)
            if before is not None:
                flips = sum(b and not a for b, a in zip(before, row["maj_right"], strict=True))
                row["flip_rate"] = flips / len(held)
            before = row["maj_right"]
            row["kl_to_base"] = kl_to_base(env, v["version"], held, client)
            print(
                f"  {v['version']:5} pass@1 {row['pass1']:.3f} maj@8 {row['maj8']:.3f} "
                f"({time.time() - t:.0f} s)",
                flush=True,
            )
            rows.append(row)
        return rows


def score_version(
    client: openai.OpenAI, version: str, held: list[LabeledQuestion], seed: int = 0
) -> dict:
    """Held-out scores of `version`: 8 samples per question, question i drawn with seed
    `seed + i` (the same draws for every version by default)."""

    def one(i: int, q: LabeledQuestion) -> tuple[list[bool], bool, float]:
        r = client.chat.completions.create(
            model=pinned_model(version),
            messages=[{"role": "user", "content": q.prompt}],
            n=SAMPLES,
            temperature=1.0,
            max_tokens=EVAL_TOKENS,
            seed=seed + i,  # the same draws for every version: differences are the weights'
        )
        answers = [extract_answer(c.message.content or "") for c in r.choices]
        right = [a is not None and same_answer(a, q.answer) for a in answers]
        vote = majority_vote(answers)
        maj = vote.label is not None and not vote.tie and same_answer(vote.label, q.answer)
        return right, maj, r.usage.completion_tokens / SAMPLES

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(len(held)), held))
    return {
        "pass1": statistics.mean(sum(r) / SAMPLES for r, _, _ in results),
        "maj8": statistics.mean(m for _, m, _ in results),
        "length": statistics.mean(n for _, _, n in results),
        "maj_right": [m for _, m, _ in results],
        "right": [sum(r) for r, _, _ in results],  # of SAMPLES, per question
        "by_kind": {
            kind: statistics.mean(
                sum(r) / SAMPLES
                for (r, _, _), q in zip(results, held, strict=True)
                if q.kind == kind
            )
            for kind in sorted({q.kind for q in held})
        },
    }


_policy = None
_scored: dict[str, dict] = {}  # base's held-out scores, measured once for every arm


def kl_to_base(env: dict, version: str, held: list[LabeledQuestion], client) -> float:
    """Mean per-token KL(version || base) on base's greedy answers to the held-out set."""
    global _policy
    if version == "base":
        return 0.0
    from peft import LoraConfig

    from learner.gate import answer_ids, mean_kl
    from learner.policy import Policy
    from learner.serving import ask
    from strop.adapters import AdapterStore
    from strop.model import load_model

    s = Settings()
    if _policy is None:
        model, tok = load_model(s.model, s.model_cache_dir, "cpu")
        _policy = Policy(model, tok, AdapterStore(env["STROP_ADAPTER_DIR"]), LoraConfig(r=8))
    if _policy.store.root != Path(env["STROP_ADAPTER_DIR"]):  # a new arm: its own v1, v2...
        _policy.store = AdapterStore(env["STROP_ADAPTER_DIR"])
        _policy.reset("base")  # drops the adapters of the arm before
    messages = [[{"role": "user", "content": q.prompt}] for q in held]
    base = [a[0] for a in ask(client, "base", messages, EVAL_TOKENS)]
    ids = [answer_ids(_policy.tokenizer, a) for a in base]
    return mean_kl(_policy, version, "base", messages, ids, max_len=1024)


# --- report ------------------------------------------------------------------------------------


def earlier_arms(path: Path, params: dict, arms: list[str]) -> dict:
    """The arms of an earlier run that this one does not run again; refuses another setup."""
    earlier = json.loads(path.read_text())
    theirs = earlier.get("params", {"minutes": earlier["minutes"]})  # older files: minutes only
    clash = {k: (v, params[k]) for k, v in theirs.items() if params.get(k) != v}
    if clash:
        sys.exit(f"--add-to {path}: another setup (theirs, this run's): {clash}")
    return {arm: res for arm, res in earlier["arms"].items() if arm not in arms}


def report(results: dict, out: Path, params: dict) -> None:
    print(
        "\n| arm | version | status | minutes | pass@1 | maj@8 | flip rate | length | KL to base"
        " | label acc. | reward acc. | majority ratio | trained: label acc. | reward acc. | majority |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm, res in results.items():
        mon = res.get("monitoring", {})
        for row in res["rows"]:
            v = row["version"]
            cells = [
                arm,
                v,
                row["status"],
                f"{row['minutes']:.1f}",
                f"{row['pass1']:.3f}",
                f"{row['maj8']:.3f}",
                _f(row.get("flip_rate")),
                f"{row['length']:.1f}",
                _f(row.get("kl_to_base"), ".2e"),
                *(_f(mon.get(metric, {}).get(v)) for metric in MONITORED),
            ]
            print("| " + " | ".join(cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "minutes": params["minutes"],
                "params": params,
                "arms": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if len(results) > 10:  # the default cycle has 10 colours: two arms would share one
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for arm, res in results.items():
        rows = [
            r for r in res["rows"] if r["status"] in ("base", "promoted", "saved", "rolled_back")
        ]
        ax.plot([r["minutes"] for r in rows], [r["pass1"] for r in rows], marker="o", label=arm)
    base = next(iter(results.values()))["rows"][0]
    ax.axhline(base["maj8"], linestyle=":", color="grey", label="base maj@8")
    ax.set_xlabel("minutes of traffic")
    ax.set_ylabel("held-out pass@1 (T=1)")
    # beside the axes: with a dozen arms a legend inside hides the lines it names
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def main() -> None:
    args = parse()
    stream = make_learning_set(args.stream, args.seed, "stream")
    held = make_learning_set(args.held_out, args.seed, "held_out")
    pick = random.Random(args.seed + 1)  # its own: the stream's draw is unchanged
    rated = frozenset(i for i in range(len(stream)) if pick.random() < args.feedback_share)
    kinds = Counter(q.kind for q in stream)
    print(
        f"stream: {len(stream)} prompts {dict(kinds)} ({len(rated)} with feedback in the "
        f"feedback arm); held-out: {len(held)}",
        flush=True,
    )
    params = {
        k: getattr(args, k) for k in ("minutes", "stream", "held_out", "seed", "feedback_share")
    }
    arms = args.arms.split(",")
    names = [f"{arm}+{args.tag}" if args.tag else arm for arm in arms]
    results = earlier_arms(args.add_to, params, names) if args.add_to else {}
    for arm, res in results.items():
        ran = res.get("ran", {})
        print(f"[{arm}] from {args.add_to} (ran {ran.get('at', '?')} at {ran.get('commit', '?')})")
    # The same held-out set and seeds (earlier_arms checked), so base's draws; files from
    # before 2026-12-06 lack the per-question majorities that flips need.
    bases = (res["rows"][0] for res in results.values())
    earlier_base = next((row for row in bases if "maj_right" in row), None)
    if earlier_base is not None:
        _scored["base"] = dict(earlier_base)
        print(f"[base] scores from {args.add_to}, not measured again", flush=True)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for arm, name in zip(arms, names, strict=True):
        work = Path(tempfile.mkdtemp(prefix=f"strop-learning-{arm}-"))
        gold = write_jsonl(stream, work / "stream.jsonl")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STROP_")},
            "WORKDIR": str(work),
            "STROP_PORT": str(free_port()),
            "STROP_REDIS_PREFIX": f"bench-learning-{arm}-{uuid.uuid4().hex[:6]}:",
            "STROP_ADAPTER_DIR": str(work / "adapters"),
            "STROP_PROBE_FILE": str(gold),  # monitoring only: label and reward accuracy
            "STROP_WORKER_METRICS_PORT": "0",
            "STROP_LEARNER_METRICS_PORT": "0",
            "STROP_LOG_LEVEL": "INFO",
        }
        env |= dict(kv.split("=", 1) for kv in args.set)
        if arm == "oracle":
            env |= {"STROP_REWARD_METHOD": "gold", "STROP_GOLD_FILE": str(gold)}
        if arm == "trl":
            res = run_trl_arm(env, stream, args.minutes, args.trl_save_minutes)
        else:
            res = run_loop_arm(
                arm, env, stream, args.minutes, rated if arm == "feedback" else frozenset()
            )
        print(
            f"[{arm}] scoring {len(res['versions'])} versions on {len(held)} held-out questions",
            flush=True,
        )
        res["scored_of"] = len(res["versions"])
        res["versions"] = spaced(res["versions"], args.eval_max)
        res["rows"] = evaluate(env, res, held)
        res["ran"] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit}
        res["set"] = args.set
        results[name] = res
        r = connect(Settings().redis_url)
        for key in r.scan_iter(env["STROP_REDIS_PREFIX"] + "*"):
            r.delete(key)
        # after every arm, so a long run cut short still leaves the arms it finished
        report(results, args.out, params)


if __name__ == "__main__":
    main()
