"""`strop demo`: drive a running stack with traffic and report what the loop produced.

Sends a mix of verifiable questions (arithmetic and short answers) and open-ended ones
through the `openai` client, shows progress (prompts, groups, pairs, versions), and stops
once enough versions were promoted (or time is up). Then: a table of versions with their
mean reward, and the accuracy of `base` vs the promoted `strop` version on a held-out
labeled set that is sent with `X-Strop-No-Log: 1`, so it never enters the prompt log.

`--feedback SHARE`: on that share of its verifiable questions the demo tells the service
the true answer (POST /v1/strop/feedback), as a user who knows it would; the worker then
labels those prompts' groups with it.
"""

import random
import statistics
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import redis

from judge.extract import extract_answer
from judge.vote import same_answer
from ops.questions import make_labeled_set
from strop.connection import connect
from strop.records import Keys, ScoredGroup
from strop.registry import Registry
from strop.settings import Settings
from strop.snapshot import queues

OPEN_ENDED = [
    "Write a haiku about the sea.",
    "Give me three tips for a good night's sleep.",
    "Explain what a rainbow is to a child.",
    "Describe your ideal weekend in two sentences.",
    "What makes a good friend?",
    "Suggest a name for a small bakery.",
    "Write a short thank-you note to a teacher.",
    "Why do people enjoy music?",
    "Give one reason to learn a second language.",
    "Describe the smell of rain.",
    "What should I pack for a day at the beach?",
    "Write a two-line poem about coffee.",
]
TRAIN_SEED, HELD_OUT_SEED = 1, 20261123
CONCURRENCY = 4  # client threads: enough to keep the engine's batches full
BACKLOG = 4  # prompts logged but not yet built: more would only compete for the CPU


def _client(settings: Settings) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=settings.service_url + "/v1", api_key=_key(settings), max_retries=2, timeout=600
    )


def _key(settings: Settings) -> str:
    return settings.service_api_key or (settings.api_keys[0] if settings.api_keys else "none")


class FeedbackSender:
    """Posts the true answer of a question as feedback on its completion. A service without
    the endpoint (a plain 404) gets one warning line and no more feedback."""

    RETRIES_S = (1.0, 2.0, 4.0)  # the prompt log is buffered: a fresh id may not be rateable

    def __init__(self, settings: Settings):
        self.http = httpx.Client(
            base_url=settings.service_url,
            headers={"Authorization": f"Bearer {_key(settings)}"},
            timeout=30,
        )
        self.sent = self.failed = 0
        self.off = False

    def send(self, request_id: str, answer: str) -> bool:
        """True once the service stored it."""
        for wait in (0.0, *self.RETRIES_S):
            if self.off:
                return False
            time.sleep(wait)
            try:
                resp = self.http.post(
                    "/v1/strop/feedback", json={"id": request_id, "answer": answer}
                )
            except httpx.HTTPError as e:
                print(f"feedback failed: {e}", flush=True)
                break
            if resp.status_code == 200:
                self.sent += 1
                return True
            code = _error_code(resp)
            if resp.status_code == 404 and code != "completion_not_found":
                if not self.off:
                    self.off = True
                    print(
                        "warning: the service has no feedback endpoint (POST /v1/strop/feedback "
                        "answered 404); the demo goes on without feedback",
                        flush=True,
                    )
                return False
            if code != "completion_not_found":  # anything else will not get better
                print(f"feedback refused: {resp.status_code} {resp.text[:200]}", flush=True)
                break
        self.failed += 1
        return False

    def close(self) -> None:
        self.http.close()


def _error_code(resp: httpx.Response) -> str | None:
    try:
        return (resp.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None


def _wait_healthy(url: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the service at {url} is not healthy; is `strop up` running?")


def accuracy(client: openai.OpenAI, model: str, questions) -> float:
    """Greedy answers of `model`, never logged; the share whose answer matches the gold."""

    def one(q) -> bool:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q.prompt}],
            max_tokens=64,
            temperature=0,
            extra_headers={"X-Strop-No-Log": "1"},
        )
        got = extract_answer(r.choices[0].message.content or "")
        return got is not None and same_answer(got, q.answer)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return sum(pool.map(one, questions)) / max(1, len(questions))


def rewards_by_version(r: redis.Redis, keys: Keys) -> dict[str, list[float]]:
    """Every group's rewards, keyed by the version that sampled it."""
    out: dict[str, list[float]] = defaultdict(list)
    for _, fields in r.xrange(keys.groups):
        g = ScoredGroup.from_stream(fields)
        out[g.version].extend(g.rewards)
    return out


def run_demo(
    settings: Settings,
    versions: int = 2,
    minutes: float = 30,
    held_out: int = 40,
    feedback: float = 0.0,
) -> int:
    """Send traffic until `versions` promotions happened (or `minutes` passed); report.
    `feedback`: the share of verifiable questions whose true answer is sent as feedback."""
    keys = Keys(settings.redis_prefix)
    r = connect(settings.redis_url)
    registry = Registry(r, keys)
    client = _client(settings)
    print(f"waiting for the service at {settings.service_url} ...", flush=True)
    _wait_healthy(settings.service_url)

    held = make_labeled_set(held_out, seed=HELD_OUT_SEED)
    held_prompts = {q.prompt for q in held}
    answers = {
        q.prompt: q.answer
        for q in make_labeled_set(400, seed=TRAIN_SEED)
        if q.prompt not in held_prompts
    }
    train = list(answers)
    rng = random.Random(TRAIN_SEED)
    # chosen up front, so a rerun rates the same questions
    pick = random.Random(TRAIN_SEED + 1)  # its own, so the traffic's order is unchanged
    rated = {p for p in train if pick.random() < feedback}
    fb = FeedbackSender(settings) if rated else None
    traffic = train + OPEN_ENDED
    rng.shuffle(traffic)

    promoted_before = {v.version for v in registry.all() if v.status == "promoted"}
    sent, failed = [0], [0]
    stop = threading.Event()

    def send(prompt: str) -> None:
        try:
            resp = client.chat.completions.create(
                model="strop", max_tokens=64, messages=[{"role": "user", "content": prompt}]
            )
            sent[0] += 1
        except openai.OpenAIError as e:
            failed[0] += 1
            print(f"request failed: {e}", flush=True)
            return
        if fb is not None and prompt in rated:
            fb.send(resp.id, answers[prompt])

    def backlog() -> int:
        q = queues(r, keys, settings)
        return (q["build"] or 0) + (q["prompt_log"]["lag"] or 0)

    def traffic_loop() -> None:
        # As fast as the worker builds, no faster: on a small machine the demo's own
        # requests would otherwise take the CPU the worker and learner need.
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for prompt in traffic:
                while not stop.is_set() and backlog() >= BACKLOG:
                    stop.wait(2.0)
                if stop.is_set():
                    break
                pool.submit(send, prompt)
                time.sleep(1.0)

    sender = threading.Thread(target=traffic_loop, daemon=True)
    sender.start()
    start, last = time.time(), 0.0
    new_promoted: list[str] = []
    while time.time() - start < minutes * 60:
        all_versions = registry.all()
        new_promoted = [
            v.version
            for v in all_versions
            if v.status == "promoted" and v.version not in promoted_before
        ]
        reached = len(new_promoted) >= versions
        if time.time() - last >= 10 or reached:  # and a last line showing the promotion
            last = time.time()
            print(
                f"[{time.time() - start:5.0f}s] prompts sent {sent[0]} (failed {failed[0]}) | "
                f"groups {r.xlen(keys.groups)} | pairs {r.xlen(keys.pairs)} | versions "
                f"{len(all_versions)} ({len(new_promoted)} promoted now, strop -> "
                f"{registry.promoted() or 'base'})"
                + (f" | feedback {fb.sent}" if fb is not None else ""),
                flush=True,
            )
        if reached:
            break
        time.sleep(2)
    stop.set()
    if fb is not None:
        sender.join(timeout=60)  # its last requests may still post feedback
        fb.close()

    # --- the report -------------------------------------------------------------------
    print("\nversions:")
    print("| version | status | parent | groups' mean reward | samples | reason |")
    print("|---|---|---|---|---|---|")
    by_version = rewards_by_version(r, keys)
    base = by_version.get("base", [])
    print(
        f"| base | - | - | {statistics.fmean(base) if base else float('nan'):.3f} | {len(base)} | |"
    )
    for v in registry.all():
        rw = by_version.get(v.version, [])
        mean = f"{statistics.fmean(rw):.3f}" if rw else "n/a"
        print(f"| {v.version} | {v.status} | {v.parent} | {mean} | {len(rw)} | {v.reason or ''} |")
    latest = registry.promoted()
    print(f"\nheld-out accuracy ({len(held)} labeled questions, never logged, greedy):")
    base_acc = accuracy(client, "base", held)
    print(f"| model | accuracy |\n|---|---|\n| base | {base_acc:.3f} |")
    if latest:
        print(f"| strop@{latest} | {accuracy(client, f'strop@{latest}', held):.3f} |")
    reached = len(new_promoted) >= versions
    print(
        f"\n{len(new_promoted)} version(s) promoted during the demo "
        f"({'target reached' if reached else f'target {versions} not reached in {minutes} min'})"
    )
    return 0 if reached else 1
