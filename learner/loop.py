"""The learner process (`strop learner`): train LoRA versions on the worker's records.

One long-running loop, nanoGPT-style. For each version:

    setup   start from the promoted version (or a new LoRA while none is promoted)
    batch   read `batch_size` records (pairs for DPO, groups for GRPO) from Redis
    step    DPO against the base model (adapter disabled), or GRPO's clipped ratio against
            the behaviour version (or decoupled, losses/grpo.py), with a KL to the base
            model; in micro-batches if `micro_batch_size` is set (same update, less
            memory) (learner/steps.py);
            GRPO takes `grpo_iterations` steps on each batch
    log     namespaced metrics (`loss/dpo`, `reward/mean`, ...) every step
    save    after `steps_per_version` steps: write `adapter_dir/vN` atomically, register
            it, and only then acknowledge the records it consumed (learner/lifecycle.py);
            no version is trained while the adapter directory cannot take one, and a save
            that fails keeps its records pending and its version number unused
    gate    promote it if it passes the gate (learner/gate.py), else keep it as rejected
            (and start the next version from the promoted one again)
    guard   while waiting for records: roll back a promoted version whose live reward
            dropped (learner/rollback.py), or whose answers collapsed, which also halts
            promotion until an operator resumes it (learner/collapse.py)

Crash safety: a learner killed at any moment loses no record and trains on none twice;
on start, `Lifecycle.reconcile` finishes what the crash interrupted (learner/lifecycle.py).
Groups older than `max_staleness` versions, or whose version is no longer on disk, are
dropped (and counted); so are records whose prompt does not fit `max_len`.
"""

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict

import openai
import redis
import torch
from peft import LoraConfig

from learner import collapse, rollback, steps
from learner.args import Args
from learner.feed import Feed
from learner.lifecycle import Lifecycle, SaveFailed, writable_error
from learner.logprobs import prompt_ids
from learner.metrics import PHASES, LearnerMetrics
from learner.policy import TRAIN, Policy
from learner.serving import connect_service
from strop.adapters import AdapterStore
from strop.connection import connect
from strop.records import AdapterVersion, Keys, PreferencePair, ScoredGroup
from strop.registry import Registry
from strop.settings import Settings
from strop.versions import BASE, version_number

log = logging.getLogger("strop.learner")

PAUSE_ENV = "STROP_LEARNER_TEST_PAUSE"  # test only: "step", "save" or "saved" (see _pause)
SHOWN = {"loss", "reward", "rewards", "policy", "grad"}  # metric namespaces in the step line


class Learner:
    def __init__(
        self,
        args: Args,
        r: redis.Redis,
        keys: Keys,
        store: AdapterStore,
        policy: Policy,
        service: openai.OpenAI,
        pause_at: str | None = None,
    ):
        self.args, self.r, self.keys, self.store, self.policy = args, r, keys, store, policy
        self.registry = Registry(r, keys)
        stream, record_type = (
            (keys.pairs, PreferencePair) if args.algorithm == "dpo" else (keys.groups, ScoredGroup)
        )
        self.feed = Feed(r, stream, keys.learner_group, args.consumer, record_type)
        self.pause_at = pause_at
        self.metrics = LearnerMetrics()
        self.stop = threading.Event()
        self.lifecycle = Lifecycle(
            args,
            r,
            keys,
            store,
            self.registry,
            policy,
            self.feed,
            self.metrics,
            service,
            self.stop,
            report=self._state,
            pause=self._pause,
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.buffer: list[tuple[str, PreferencePair | ScoredGroup]] = []
        self.dropped: dict[str, int] = defaultdict(int)  # reason -> records dropped
        self.versions_written: list[str] = []
        self._last_check = 0.0
        self._discard = False  # the weights in memory are a rejected (or unfinished) version

    def start(self) -> None:
        """Reconcile disk, registry and stream after whatever happened before, then load
        the promoted version."""
        self.feed.setup()
        self.lifecycle.reconcile()
        self.rebase()
        a = self.args
        log.info(
            "learner ready: %s, %d records per step, %d steps per version (%d records per "
            "version), lr %g, LoRA r=%d alpha=%d on %s, sequences up to %d tokens",
            a.algorithm,
            a.batch_size,
            a.steps_per_version,
            a.batch_size * a.steps_per_version,
            a.learning_rate,
            a.lora_rank,
            a.lora_alpha,
            ",".join(a.lora_target_modules),
            a.max_len,
        )

    def run(self, max_versions: int | None = None) -> list[str]:
        """Train versions until stopped (or `max_versions` were written)."""
        while not self.stop.is_set():
            if max_versions is not None and len(self.versions_written) >= max_versions:
                break
            self.train_version()
        self._state(phase="stopped")
        return self.versions_written

    def train_version(self) -> AdapterVersion | None:
        """Train one version on top of the promoted one, save it and gate it (None: stopped
        before it was saved)."""
        # --- setup ---
        a = self.args
        if not self.wait_writable():
            return None
        self.rebase()
        parent = self.policy.parent
        consumed: list[str] = []
        history: dict[str, list[float]] = defaultdict(list)
        dropped_before = dict(self.dropped)
        average = Average(self.policy.trainable_parameters()) if a.average_steps else None
        t0 = time.perf_counter()
        for step in range(a.steps_per_version):
            # --- batch ---
            batch = self.next_batch(a.batch_size)
            if batch is None:
                self._discard = True
                return None  # stopping: the records read stay pending, re-read next time
            ids, records = [i for i, _ in batch], [rec for _, rec in batch]
            # --- step ---
            t_step = time.perf_counter()
            self.policy.model.train()
            # sampling is what costs; GRPO's clipped ratio lets a batch be used mu times
            iterations = a.grpo_iterations if a.algorithm == "grpo" else 1
            proximal = {} if a.algorithm == "grpo" and a.grpo_decoupled else None
            for _ in range(iterations):
                self.optimizer.zero_grad(set_to_none=True)
                metrics = steps.backward(self.policy, records, a, proximal)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.policy.trainable_parameters(), a.max_grad_norm
                )
                self._pause("step")
                self.optimizer.step()
                metrics["grad/norm"] = grad_norm.item()
                for k, v in metrics.items():
                    history[k].append(v)
            if average is not None:
                average.add()
            consumed += ids
            # --- log ---
            metrics["time/step_s"] = time.perf_counter() - t_step
            history["time/step_s"].append(metrics["time/step_s"])
            self._observe_step(metrics, len(ids), iterations)
            shown = " | ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.split("/")[0] in SHOWN
            )
            log.info("step %d/%d from %s | %s", step + 1, a.steps_per_version, parent, shown)
            self._state(phase="training", step=step + 1, metrics=metrics)

        # --- save ---
        if average is not None:
            average.apply()
        train_metrics = {k: sum(v) / len(v) for k, v in history.items()}
        train_metrics["data/records"] = float(len(consumed))
        for reason, n in self.dropped.items():
            train_metrics[f"data/dropped_{reason}"] = float(n - dropped_before.get(reason, 0))
        train_metrics["time/train_s"] = time.perf_counter() - t0
        try:
            meta = self.lifecycle.save(parent, {self.feed.stream: consumed}, train_metrics)
        except SaveFailed as e:
            log.error("%s; its %d records stay pending for the next version", e, len(consumed))
            self._state(phase="waiting", error=str(e))
            # every record read so far is still pending: re-read them in order
            self.buffer.clear()
            self.feed.rewind()
            self._discard = True
            self.stop.wait(self.args.disk_retry_s)  # not a tight train-and-fail loop
            return None
        self.versions_written.append(meta.version)
        # --- gate ---
        meta = self.lifecycle.decide(meta, candidate=TRAIN)
        if meta.status == "candidate":  # stopped while the gate waited: decided on restart
            self._discard = True
        elif meta.status == "promoted":
            self.policy.parent = meta.version  # the weights in memory are that version
        else:
            self._discard = True  # the next version starts again from the promoted one
        return meta

    def wait_writable(self) -> bool:
        """Wait until the adapter directory can take a version (housekeeping meanwhile),
        saying why once; False if stopped first."""
        # a version's files are its LoRA weights, plus margin for metadata and the fs
        need = 2 * sum(p.numel() * p.element_size() for p in self.policy.trainable_parameters())
        reported = None
        while not self.stop.is_set():
            error = writable_error(self.store.root, need)
            if error is None:
                if reported is not None:
                    log.info("adapter directory writable again: training resumes")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    self.r.hdel(self.keys.learner_state, "error")
                return True
            if error != reported:
                log.error("not training: no version can be saved: %s", error)
                reported = error
            self.housekeeping()
            self._state(error=f"no version can be saved: {error}")
            self.stop.wait(self.args.disk_retry_s)
        return False

    def rebase(self) -> None:
        """Train on top of the promoted version: reload it if the pointer moved (or the
        weights in memory were discarded), with a fresh optimizer."""
        if self.lifecycle.rebase(discard=self._discard) or self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                self.policy.trainable_parameters(), lr=self.args.learning_rate, weight_decay=0.0
            )
        self._discard = False

    # --- batch ------------------------------------------------------------------------------

    def next_batch(self, size: int) -> list[tuple[str, PreferencePair | ScoredGroup]] | None:
        """`size` usable records, waiting for the worker as long as it takes; housekeeping
        (rollback check, state) runs while waiting. None once stopped."""
        waiting_since = time.time()
        while len(self.buffer) < size:
            if self.stop.is_set():
                return None
            self.housekeeping(waiting=len(self.buffer), since=waiting_since)
            try:
                entries = self.feed.read(size - len(self.buffer), self.args.read_block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("redis unreachable (%s); retrying", e.__class__.__name__)
                self.stop.wait(1.0)
                continue
            for sid, record in entries:
                reason = self.unusable(record)
                if reason is None:
                    self.buffer.append((sid, record))
                else:
                    # never trainable: acknowledge now, or it comes back after every restart
                    self.dropped[reason] += 1
                    self.metrics.dropped.labels(reason).inc()
                    self.feed.ack([sid])
                    log.info("dropped record %s: %s", sid, reason)
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        return batch

    def unusable(self, record: PreferencePair | ScoredGroup) -> str | None:
        """Why a record cannot be trained on now, or None."""
        if len(prompt_ids(self.policy.tokenizer, record.messages)) >= self.args.max_len:
            return "too_long"
        if isinstance(record, ScoredGroup):
            if not record.completions or len(record.rewards) != len(record.completions):
                return "malformed"
            staleness = version_number(self.policy.parent) - version_number(record.version)
            if staleness > self.args.max_staleness:
                return "stale"
            if record.version != BASE and not self.store.has_adapter(record.version):
                return "unknown_version"
        return None

    # --- housekeeping, state and metrics for operators -----------------------------------------

    def housekeeping(self, waiting: int = 0, since: float | None = None) -> None:
        """Run the collapse guard and the rollback check when due, and report that the
        learner waits for records."""
        now = time.time()
        if now - self._last_check >= self.args.rollback_check_s:
            self._last_check = now
            # The collapse guard first: it also halts promotion, and a version it rolled
            # back is not the rollback check's to judge (it checks promotions only).
            for name, check in (
                ("collapse guard", self.check_collapse),
                ("rollback", self.check_rollback),
            ):
                try:
                    check()
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # the read loop reports Redis being down
                except Exception:  # a failed check must not stop training
                    log.exception("%s check failed", name)
        self.metrics.buffered.set(waiting)
        self._state(phase="waiting", buffered=waiting, waiting_s=round(now - (since or now), 1))

    def check_collapse(self) -> collapse.Verdict:
        """The collapse guard (learner/collapse.py): a collapsing promoted version is rolled
        back to its last good version on disk, and promotion halts."""
        a = self.args
        return collapse.check(
            self.registry,
            self.r,
            self.keys,
            a.collapse_window_s,
            a.collapse_min_groups,
            a.collapse_majority_ratio,
            a.collapse_answer_entropy,
            a.collapse_length_factor,
            available=self.store.has_adapter,
        )

    def check_rollback(self) -> rollback.Verdict:
        """The live reward check (learner/rollback.py)."""
        a = self.args
        return rollback.check(
            self.registry,
            self.r,
            self.keys,
            a.rollback_window_s,
            a.rollback_margin,
            a.rollback_min_samples,
        )

    def _observe_step(self, metrics: dict[str, float], records: int, n_steps: int) -> None:
        m = self.metrics
        m.steps.inc(n_steps)
        m.records.inc(records)
        m.step_seconds.observe(metrics["time/step_s"])
        m.grad_norm.set(metrics["grad/norm"])
        m.reward.set(metrics["reward/mean"])
        m.loss.set(next(v for k, v in metrics.items() if k.startswith("loss/")))

    def _state(self, **fields) -> None:
        """What the learner is doing, for operators (`strop adapters list`, Prometheus)
        and tests."""
        if fields.get("phase") in PHASES:
            self.metrics.phase.state(fields["phase"])
        self.metrics.promoted.set(version_number(self.policy.parent))
        fields = {
            k: json.dumps(v) if isinstance(v, dict) else v
            for k, v in fields.items()
            if v is not None
        }
        fields |= {
            "updated": time.time(),
            "pid": os.getpid(),
            "parent": self.policy.parent,
            "dropped": json.dumps(self.dropped),
            "invalid": self.feed.invalid,
        }
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.r.hset(self.keys.learner_state, mapping=fields)

    def _pause(self, point: str) -> None:
        # Test only: park at `point` so a test can SIGKILL the process exactly there.
        if self.pause_at == point:
            self._state(phase=f"paused:{point}")
            log.warning("paused at %s (%s)", point, PAUSE_ENV)
            while True:
                time.sleep(1)


class Average:
    """The running mean of some parameters over the points `add` is called at (`apply`
    writes it into them): a version made of all its steps, not only the last one."""

    def __init__(self, params):
        self.params = list(params)
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.n = 0

    @torch.no_grad()
    def add(self) -> None:
        """Count the parameters' current values in."""
        for total, p in zip(self.sums, self.params, strict=True):
            total += p.detach().float()
        self.n += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Set the parameters to their mean (unchanged if nothing was added)."""
        if self.n:
            for total, p in zip(self.sums, self.params, strict=True):
                p.copy_(total / self.n)


def build(settings: Settings, args: Args | None = None, pause_at: str | None = None) -> Learner:
    """A learner on the configured model, Redis and adapter directory (not started)."""
    from strop.model import load_model

    args = args or Args(settings)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(settings.model, settings.model_cache_dir, settings.device)
    store = AdapterStore(settings.adapter_dir)
    lora = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=list(args.lora_target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    policy = Policy(model, tokenizer, store, lora)
    r = connect(settings.redis_url, timeout=30)  # reads block up to read_block_ms
    service = connect_service(settings.service_url, settings.service_api_key)
    return Learner(args, r, Keys(settings.redis_prefix), store, policy, service, pause_at=pause_at)


def main(settings: Settings, max_versions: int | None = None) -> int:
    """Run the learner until SIGTERM/SIGINT (or `max_versions` versions were written);
    returns 2 at once if the adapter directory cannot take a version."""
    error = writable_error(settings.adapter_dir)
    if error is not None:  # before the model loads: nothing trained is lost
        log.error("learner: cannot save versions (STROP_ADAPTER_DIR): %s", error)
        return 2
    learner = build(settings, pause_at=os.environ.get(PAUSE_ENV) or None)

    def stop(signum, _frame) -> None:
        # Stop at the next safe point; an unfinished version is dropped, its records stay
        # pending and are trained on after the restart.
        log.info("signal %d: stopping", signum)
        learner.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if learner.metrics.serve(settings.learner_metrics_port, settings.host):
        log.info("learner metrics on :%d", settings.learner_metrics_port)
    learner.start()
    written = learner.run(max_versions)
    log.info("learner stopped; wrote %s", ", ".join(written) or "no version")
    return 0
