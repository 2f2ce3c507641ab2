"""Rewards benchmark: how right TTRL's label-free rewards are, and how fast one worker builds.

On a labeled set strop generates (`ops.questions.make_labeled_set`: small arithmetic and
short factual questions with gold answers), with the default model (SmolLM2-135M-Instruct)
served by a real `strop serve` process (embedded engine):

1. **Rewards vs gold.** Each question is asked once with n=16 (temperature 1.0, the
   worker's default; internal requests, never logged); N = 4 and 8 use the first 4 and 8
   of those same 16 samples, so the three N are compared on identical draws. Per N:
   - extraction rate: samples with an extractable answer (judge/extract.py);
   - sample accuracy: samples whose answer equals the gold one (a single sample's odds);
   - label accuracy: the majority answer (the pseudo-label) equals the gold one;
   - reward accuracy: share of the N vote rewards equal to the reward the gold answer
     would give (TTRL's measure; computed by worker/probe.py's own `probe_obs`);
   - majority ratio: majority count / N, over questions with any answer;
   - groups kept: share the worker would build rather than drop (no answer, weak or tied
     majority, no signal), with its rule (`worker.build.score_ttrl`, G = 8), and label
     and reward accuracy over those kept groups only (what training would see).
2. **Worker throughput.** The first `--worker-prompts` questions are sent as ordinary
   (logged) chat requests; one real Celery worker (one process, solo pool, the worker's
   own ingest and build tasks) then builds them with the default N=16, G=8 (reward method
   `ttrl`, answers of `--max-tokens` tokens) for at most `--worker-seconds`. Reported:
   groups built and dropped per minute, seconds per build, and the worker's own probe
   monitoring (the labeled set is its STROP_PROBE_FILE).

The server runs with one torch thread (`--threads 1`): on 2 cores shared with other work,
torch's two threads wait on each other and a decode step can take 30x longer (measured: a
16 x 64-token request went from 5 s to 160 s when another process started), which made
timings meaningless; one thread costs about a quarter of the speed on an idle machine.

Prints markdown tables; writes bench/results/rewards.json.

    python bench/rewards.py [--questions 32] [--worker-prompts 24] [--worker-seconds 180]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
import redis  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402
from celery.signals import task_failure, task_prerun, task_success  # noqa: E402

from judge import extract_answer, extract_answers, majority_vote, same_answer  # noqa: E402
from ops.questions import make_labeled_set  # noqa: E402
from strop.labeled import LabeledQuestion, write_jsonl  # noqa: E402
from strop.records import Keys  # noqa: E402
from strop.settings import Settings  # noqa: E402
from worker.app import create_app  # noqa: E402
from worker.context import release_contexts  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from serve import start_server  # noqa: E402  (the serving bench's: one way to start strop)

from strop.series import read_series  # noqa: E402
from worker.build import Samples, score_ttrl  # noqa: E402
from worker.probe import probe_key, probe_obs  # noqa: E402

VOTE_SIZES = (4, 8, 16)
N_TRAIN = 8  # G: the worker's default; groups of N=4 keep all 4
MIN_MAJORITY_RATIO = Settings().min_majority_ratio  # the worker's drop threshold
INTERNAL = {"X-Strop-Internal": "1"}  # the worker's header: the service logs none of these


@dataclass
class Draw:
    """The 16 samples of one question."""

    question: LabeledQuestion
    texts: list[str]
    seconds: float
    completion_tokens: int


# --- the service ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. rewards vs gold -----------------------------------------------------------------


def sample_all(url: str, questions: list[LabeledQuestion], args: argparse.Namespace) -> list[Draw]:
    """max(VOTE_SIZES) samples per question, `args.concurrency` questions at a time."""
    client = openai.OpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, timeout=600, default_headers=INTERNAL
    )
    n = max(VOTE_SIZES)
    # warm-up: the first large batch after start-up is much slower than the rest
    client.chat.completions.create(
        model="strop",
        messages=[{"role": "user", "content": "What is 1 + 1?"}],
        n=n,
        max_tokens=8,
        temperature=args.temperature,
    )
    t0 = time.perf_counter()

    def one(i: int) -> Draw:
        q = questions[i]
        t = time.perf_counter()
        resp = client.chat.completions.create(
            model="strop",
            messages=[{"role": "user", "content": q.prompt}],
            n=n,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            # distinct per question (the engine seeds choice k with seed + k): reproducible
            seed=args.seed * 1_000_000 + i * 1000,
        )
        choices = sorted(resp.choices, key=lambda c: c.index)
        return Draw(
            q,
            [c.message.content or "" for c in choices],
            time.perf_counter() - t,
            resp.usage.completion_tokens if resp.usage else 0,
        )

    draws: list[Draw | None] = [None] * len(questions)
    with ThreadPoolExecutor(args.concurrency) as pool:  # the engine batches concurrent ones
        futures = {pool.submit(one, i): i for i in range(len(questions))}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            d = draws[i] = fut.result()
            vote = majority_vote(extract_answers(d.texts))
            print(
                f"[{time.perf_counter() - t0:6.1f}s] {done:>3}/{len(questions)} "
                f"({d.seconds:4.1f}s) {d.question.prompt[:48]!r} gold {d.question.answer!r}: "
                f"majority {vote.label!r} {vote.majority_count}/{n}",
                flush=True,
            )
    return [d for d in draws if d is not None]


def score_draw(draw: Draw, n: int) -> dict[str, Any]:
    """The figures of one question, on its first `n` samples."""
    q = draw.question
    texts = draw.texts[:n]
    answers = extract_answers(texts)
    messages = [{"role": "user", "content": q.prompt}]
    samples = Samples("base", "base", tuple(texts), tuple(() for _ in texts))
    # the worker's own scoring and probe computation, so these numbers mean what its
    # monitoring means (checked votes included)
    scored = score_ttrl(
        samples,
        answers,
        N_TRAIN,
        MIN_MAJORITY_RATIO,
        q.prompt,
        Settings().min_verified_votes,
    )
    label_obs, reward_obs = probe_obs(
        {probe_key(messages): q.answer},
        messages,
        list(scored.answers),
        scored.vote,
        scored.vote_rewards,
        "base",
    )
    vote = scored.vote
    gold = extract_answer(q.answer) or q.answer.strip()
    return {
        "extraction_rate": sum(a is not None for a in answers) / n,
        "sample_accuracy": sum(a is not None and same_answer(a, gold) for a in answers) / n,
        "label_accuracy": label_obs.value,
        "reward_accuracy": reward_obs.value,
        "majority_ratio": vote.ratio if vote is not None and vote.label is not None else None,
        "drop": scored.drop,
        "label": vote.label if vote is not None else None,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over questions (majority ratio: over questions with a label)."""
    ratios = [r["majority_ratio"] for r in rows if r["majority_ratio"] is not None]
    out: dict[str, Any] = {"questions": len(rows)}
    for k in ("extraction_rate", "sample_accuracy", "label_accuracy", "reward_accuracy"):
        out[k] = statistics.fmean(r[k] for r in rows) if rows else None
    out["majority_ratio"] = statistics.fmean(ratios) if ratios else None
    out["groups_kept"] = sum(r["drop"] is None for r in rows) / len(rows) if rows else None
    out["drops"] = dict(Counter(r["drop"] for r in rows if r["drop"] is not None))
    # what training would see: only the groups the worker keeps (TTRL reports these)
    kept = [r for r in rows if r["drop"] is None]
    out["kept"] = len(kept)
    for k in ("label_accuracy", "reward_accuracy"):
        out[f"kept_{k}"] = statistics.fmean(r[k] for r in kept) if kept else None
    return out


# --- 2. worker throughput ---------------------------------------------------------------


def log_prompts(url: str, questions: list[LabeledQuestion], r: redis.Redis, prefix: str) -> None:
    """Send the questions as ordinary user requests, so the service logs them."""
    with httpx.Client(timeout=120) as http:
        for q in questions:
            body = {
                "model": "strop",
                "messages": [{"role": "user", "content": q.prompt}],
                "max_tokens": 1,  # the worker re-samples; the logged reply does not matter
            }
            http.post(url + "/v1/chat/completions", json=body).raise_for_status()
    log_key = Keys(prefix).prompt_log
    deadline = time.time() + 30  # the log writer is asynchronous
    while r.xlen(log_key) < len(questions) and time.time() < deadline:
        time.sleep(0.1)
    if r.xlen(log_key) < len(questions):
        raise RuntimeError(f"only {r.xlen(log_key)} of {len(questions)} prompts were logged")


def run_worker(
    url: str, prefix: str, probe_path: Path, n_prompts: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One Celery worker (solo pool: one task at a time) builds the logged prompts."""
    settings = Settings(
        redis_prefix=prefix,
        service_url=url,
        service_api_key=None,
        reward_method="ttrl",
        n_votes=args.worker_n,
        n_train=N_TRAIN,
        sample_temperature=args.temperature,
        sample_max_tokens=args.max_tokens,
        min_majority_ratio=MIN_MAJORITY_RATIO,
        ingest_batch=n_prompts,  # one ingest run enqueues them all
        worker_metrics_port=0,
        probe_file=probe_path,
    )
    app = create_app(settings)
    started: dict[str, float] = {}
    finished: list[tuple[float, float, str]] = []  # (end time, seconds, outcome)
    lock = threading.Lock()

    def on_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
        if task is not None and task.name == "worker.build_group":
            started[task_id] = time.perf_counter()

    def on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
        if sender is not None and sender.name == "worker.build_group":
            now = time.perf_counter()
            with lock:
                finished.append((now, now - started.get(sender.request.id, now), str(result)))

    def on_failure(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if sender is not None and sender.name == "worker.build_group":
            now = time.perf_counter()
            with lock:
                finished.append((now, now - started.get(task_id, now), "failed"))

    hooks = ((task_prerun, on_prerun), (task_success, on_success), (task_failure, on_failure))
    for sig, handler in hooks:
        sig.connect(handler, weak=False)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        # a warm shutdown waits for the build in flight: allow one build's worth of time
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=600):
            t0 = time.perf_counter()
            app.send_task("worker.ingest_prompts")
            last_print = 0.0
            while time.perf_counter() - t0 < args.worker_seconds:
                with lock:
                    done = len(finished)
                if done >= n_prompts:
                    break
                if time.perf_counter() - last_print >= 15:
                    last_print = time.perf_counter()
                    outcomes = Counter(o for _, _, o in finished)
                    print(
                        f"[worker {time.perf_counter() - t0:6.1f}s] {done}/{n_prompts} done "
                        f"{dict(outcomes)}",
                        flush=True,
                    )
                time.sleep(0.5)
            window_end = time.perf_counter()
            with lock:  # only what finished inside the window counts
                counted = [f for f in finished if f[0] <= window_end]
            print("[worker] window over; stopping the worker after its build in flight", flush=True)
        # all done early: the rate is over the time they took, not the whole window
        elapsed = max(f[0] for f in counted) - t0 if len(counted) >= n_prompts else window_end - t0
        series = {
            m: read_series(r, Keys(prefix), m).get("base", [])
            for m in ("label_accuracy", "reward_accuracy", "majority_ratio", "extraction_rate")
        }
    finally:
        for sig, handler in hooks:
            sig.disconnect(handler)
        release_contexts(app)
        app.close()
        r.close()
    outcomes = Counter(o for _, _, o in counted)
    built = outcomes.get("built", 0)
    failed = outcomes.get("failed", 0)
    dropped = sum(v for k, v in outcomes.items() if k not in ("built", "failed"))
    minutes = elapsed / 60

    def series_mean(points: list) -> float | None:
        total, count = sum(p.sum for p in points), sum(p.count for p in points)
        return total / count if count else None

    return {
        "n_votes": args.worker_n,
        "n_train": N_TRAIN,
        "max_tokens": args.max_tokens,
        "reward_method": "ttrl",
        "prompts": n_prompts,
        "window_s": args.worker_seconds,
        "elapsed_s": elapsed,
        "finished": len(counted),
        "built": built,
        "dropped": dropped,
        "failed": failed,
        "outcomes": dict(outcomes),
        "groups_per_min": built / minutes if minutes else None,
        "drops_per_min": dropped / minutes if minutes else None,
        "prompts_per_min": len(counted) / minutes if minutes else None,
        "build_s_median": statistics.median(f[1] for f in counted) if counted else None,
        "monitoring": {m: series_mean(pts) for m, pts in series.items()},
    }


# --- report -----------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_tables(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(
        f"\nTTRL rewards vs gold: {cfg['model']}, temperature {cfg['temperature']}, "
        f"max_tokens {cfg['max_tokens']}, server threads {cfg['server_threads']}, "
        f"{cfg['questions']} labeled questions "
        f"({cfg['kinds']}), seed {cfg['seed']}.\nOne draw of {max(VOTE_SIZES)} samples "
        f"per question; N = 4 and 8 use the first 4 and 8 of the same 16 (side by side on "
        f"identical samples).\n"
    )
    print(
        "| N | questions | extraction rate | sample accuracy | label accuracy "
        "| reward accuracy | majority ratio | groups kept | label acc. (kept) "
        "| reward acc. (kept) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in VOTE_SIZES:
        for subset, s in results["by_n"][str(n)].items():
            print(
                f"| {n} | {subset} ({s['questions']}) | {fmt(s['extraction_rate'])} "
                f"| {fmt(s['sample_accuracy'])} | {fmt(s['label_accuracy'])} "
                f"| {fmt(s['reward_accuracy'])} | {fmt(s['majority_ratio'])} "
                f"| {fmt(s['groups_kept'])} ({s['kept']}) | {fmt(s['kept_label_accuracy'])} "
                f"| {fmt(s['kept_reward_accuracy'])} |"
            )
    w = results.get("worker")
    if not w:
        return
    print(
        f"\nOne Celery worker (one process, solo pool), N={w['n_votes']} G={w['n_train']}, "
        f"reward {w['reward_method']}, max_tokens {w['max_tokens']}, {w['prompts']} logged "
        f"prompts, window {w['window_s']} s:\n"
    )
    print(
        "| finished | built | dropped | failed | elapsed s | groups/min | drops/min "
        "| prompts/min | s per build (median) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {w['finished']} | {w['built']} | {w['dropped']} | {w['failed']} "
        f"| {w['elapsed_s']:.0f} | {fmt(w['groups_per_min'], 2)} | {fmt(w['drops_per_min'], 2)} "
        f"| {fmt(w['prompts_per_min'], 2)} | {fmt(w['build_s_median'], 1)} |"
    )
    m = w["monitoring"]
    print(
        f"\noutcomes {w['outcomes']}; the worker's own probe monitoring over these builds: "
        f"label accuracy {fmt(m['label_accuracy'])}, reward accuracy "
        f"{fmt(m['reward_accuracy'])}, majority ratio {fmt(m['majority_ratio'])}, "
        f"extraction rate {fmt(m['extraction_rate'])}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=32, help="labeled questions (half short)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the labeled set and sampling")
    ap.add_argument("--max-tokens", type=int, default=64, help="length limit of each sample")
    ap.add_argument("--temperature", type=float, default=1.0, help="the worker's default")
    ap.add_argument("--concurrency", type=int, default=2, help="questions sampled at a time")
    ap.add_argument("--worker-prompts", type=int, default=24, help="0 skips the worker part")
    ap.add_argument("--worker-seconds", type=float, default=180, help="worker time window")
    ap.add_argument("--worker-n", type=int, default=16, help="N of the worker part")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (0: one per core). 1 by default: on a CPU shared "
        "with other work, 2 threads spin on each other and a step can take 30x longer",
    )
    args = ap.parse_args()
    # a SIGTERM (e.g. `timeout`) must still stop the server and clean Redis in `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wall0 = time.perf_counter()

    questions = make_labeled_set(args.questions, seed=args.seed)
    kinds = Counter(q.kind for q in questions)
    print(f"{len(questions)} labeled questions: {dict(kinds)}", flush=True)
    port, prefix = free_port(), f"bench-rewards-{uuid.uuid4().hex[:6]}:"
    r = redis.Redis()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "model": "SmolLM2-135M-Instruct (strop serve, embedded engine, CPU)",
            "questions": len(questions),
            "kinds": ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
            "seed": args.seed,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "samples_per_question": max(VOTE_SIZES),
            "vote_sizes": list(VOTE_SIZES),
            "n_train": N_TRAIN,
            "min_majority_ratio": MIN_MAJORITY_RATIO,
            "cpu_count": os.cpu_count(),
            "server_threads": args.threads or "torch default",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = write_jsonl(questions, Path(tmp) / "labeled.jsonl")
        proc = start_server(port, prefix, str(Path(tmp) / "adapters"), args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"strop serve up after {time.perf_counter() - wall0:.0f}s", flush=True)
            t = time.perf_counter()
            results["load_avg"] = {"start": os.getloadavg()[0]}
            draws = sample_all(url, questions, args)
            results["sampling_s"] = time.perf_counter() - t
            results["load_avg"]["after_sampling"] = os.getloadavg()[0]
            results["by_n"] = {}
            for n in VOTE_SIZES:
                rows = [score_draw(d, n) for d in draws]
                results["by_n"][str(n)] = {"all": summarise(rows)} | {
                    kind: summarise(
                        [row for row, d in zip(rows, draws, strict=True) if d.question.kind == kind]
                    )
                    for kind in sorted(kinds)
                }
            results["questions"] = [
                {
                    "prompt": d.question.prompt,
                    "gold": d.question.answer,
                    "kind": d.question.kind,
                    "answers": extract_answers(d.texts),
                    "labels": {str(n): score_draw(d, n)["label"] for n in VOTE_SIZES},
                    "seconds": round(d.seconds, 2),
                    "completion_tokens": d.completion_tokens,
                }
                for d in draws
            ]
            if args.worker_prompts > 0:
                batch = questions[: args.worker_prompts]
                print(f"\nworker: logging {len(batch)} prompts", flush=True)
                log_prompts(url, batch, r, prefix)
                results["worker"] = run_worker(url, prefix, probe_path, len(batch), args)
                results["load_avg"]["after_worker"] = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(60)
            keys = list(r.scan_iter(match=f"{prefix}*"))
            if keys:
                r.delete(*keys)
    results["total_s"] = time.perf_counter() - wall0
    print_tables(results)
    print(
        f"\ntotal {results['total_s'] / 60:.1f} min (sampling {results['sampling_s']:.0f} s); "
        f"1-min load average {results['load_avg']} on {os.cpu_count()} cores shared with "
        "other work"
    )
    out = ROOT / "bench" / "results" / "rewards.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
