"""The learner process (`strop learner`): train LoRA versions on the worker's records.

One long-running loop, nanoGPT-style. For each version:

    setup   start from the promoted version (or a new LoRA while none is promoted)
    data    read `batch_size` records (pairs for DPO, groups for GRPO) from Redis
    loss    DPO against the base model (adapter disabled), or GRPO's clipped ratio against
            the behaviour version, with a KL to the base model; in micro-batches if
            `micro_batch_size` is set (same update, less memory)
    log     namespaced metrics (`loss/dpo`, `reward/mean`, ...) every step
    save    after `steps_per_version` steps: write `adapter_dir/vN` atomically, register
            it, and only then acknowledge the records it consumed
    gate    promote it if it passes the gate (learner/gate.py), else keep it as rejected
            (and start the next version from the promoted one again)

Crash safety. Records stay pending in the consumer group until the version trained on them
is on disk, and the consumer name is stable, so a learner killed at any moment re-reads
them after a restart. On start, `reconcile` finishes what a crash interrupted: temporary
directories are removed, records already consumed by a version on disk are acknowledged,
a version on disk missing from the registry is registered, and a version not yet decided
is gated (or its recorded gate decision applied). Version numbers are never reused, even
the number of a save that crashed (vLLM must never see one name with two weights).

GRPO's behaviour policy. The ratio needs log p_behaviour of the sampled tokens. The
service does return raw (temperature 1) log-probs, but over the API they arrive per
token *string*, and re-tokenising the text need not give the same tokens; and a serving
engine (vLLM, bf16 kernels, a KV cache) computes them with other numerics than this
forward pass, so even on-policy data would show ratios != 1. So the learner recomputes
them: it loads the group's version (`vN` from the adapter store, `base` = adapter
disabled) as a frozen adapter and scores the completions under it. It uses the sampled
token ids when the worker logged them (`completion_token_ids`), else the text. Groups
older than `max_staleness` versions, or whose version is no longer on disk, are dropped
(and counted); so are records whose prompt does not fit `max_len`.
"""

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import redis
import torch
from peft import LoraConfig

from learner import rollback
from learner.args import Args
from learner.feed import Feed
from learner.gate import GateResult, probe_prompts, run_gate
from learner.logprobs import build_batch, prompt_ids, reference_logps, token_logps
from learner.losses import dpo_loss, group_advantages, grpo_loss
from learner.metrics import PHASES, LearnerMetrics
from learner.policy import BASE, TRAIN, Policy
from learner.store import AdapterStore
from strop.records import AdapterVersion, Keys, PreferencePair, ScoredGroup
from strop.registry import Registry, version_number
from strop.settings import Settings

log = logging.getLogger("strop.learner")

PAUSE_ENV = "STROP_LEARNER_TEST_PAUSE"  # test only: "step", "save" or "saved" (see _pause)


def version_index(version: str) -> int:
    """`base` is version 0, `vN` is N (staleness counts in version numbers)."""
    return 0 if version == BASE else version_number(version)


class Learner:
    def __init__(
        self,
        args: Args,
        r: redis.Redis,
        keys: Keys,
        store: AdapterStore,
        policy: Policy,
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
        self.optimizer: torch.optim.Optimizer | None = None
        self.buffer: list[tuple[str, PreferencePair | ScoredGroup]] = []
        self.dropped: dict[str, int] = defaultdict(int)  # reason -> records dropped
        self.versions_written: list[str] = []
        self._last_check = 0.0
        self._discard = False  # the weights in memory are a rejected (or unfinished) version

    # --- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile disk, registry and stream after whatever happened before, then load
        the promoted version."""
        self.feed.setup()
        self.reconcile()
        self._rebase()
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

    def reconcile(self) -> None:
        for path in self.store.clean():
            log.warning("crash debris removed: %s", path.name)
        pending = self.feed.pending_ids()
        for version in self.store.versions():
            meta = self.store.read(version)
            # Records a version on disk consumed are done, whether or not the ack happened.
            for stream, ids in meta.consumed.items():
                done = [i for i in ids if i in pending] if stream == self.feed.stream else ids
                if done:
                    n = self.r.xack(stream, self.keys.learner_group, *done)
                    if n:
                        log.warning("acked %d records %s had consumed", n, version)
            if self.registry.get(version) is None:
                log.warning("%s is on disk but not in the registry: registering it", version)
                self.registry.add(meta.model_copy(update={"status": "candidate"}))
        for v in self.registry.all():
            if v.status != "candidate":
                continue
            if v.version not in self.store.versions():
                self.registry.reject(v.version, "not on disk (or no strop.json)")
                continue
            log.warning("%s was never decided: deciding now", v.version)
            self.decide(self.store.read(v.version), candidate=v.version)

    def _rebase(self) -> None:
        """Train on top of the promoted version: reload it if the pointer moved."""
        pointer = self.registry.promoted() or BASE
        if pointer != self.policy.parent or self.optimizer is None or self._discard:
            if pointer != BASE and not self.store.has_adapter(pointer):
                raise FileNotFoundError(
                    f"the promoted version {pointer} is not in {self.store.root}: restore it, "
                    "or point `strop` elsewhere (strop adapters rollback)"
                )
            if pointer != self.policy.parent or self._discard:
                self.policy.reset(pointer, seed=self.args.seed)
                self._discard = False
            self.optimizer = torch.optim.AdamW(
                self.policy.trainable_parameters(), lr=self.args.learning_rate, weight_decay=0.0
            )

    # --- the loop -------------------------------------------------------------------------

    def run(self, max_versions: int | None = None) -> list[str]:
        """Train versions until stopped (or `max_versions` were written)."""
        while not self.stop.is_set():
            if max_versions is not None and len(self.versions_written) >= max_versions:
                break
            self.train_version()
        self._state(phase="stopped")
        return self.versions_written

    def train_version(self) -> AdapterVersion | None:
        # --- setup ---
        a = self.args
        self._rebase()
        parent = self.policy.parent
        consumed: list[str] = []
        history: dict[str, list[float]] = defaultdict(list)
        dropped_before = dict(self.dropped)
        t0 = time.perf_counter()
        for step in range(a.steps_per_version):
            # --- data ---
            batch = self.next_batch(a.batch_size)
            if batch is None:
                self._discard = True
                return None  # stopping: the records read stay pending, re-read next time
            ids, records = [i for i, _ in batch], [rec for _, rec in batch]
            # --- loss ---
            t_step = time.perf_counter()
            self.policy.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            metrics = self.backward(records)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.policy.trainable_parameters(), a.max_grad_norm
            )
            self._pause("step")
            self.optimizer.step()
            consumed += ids
            # --- log ---
            metrics["grad/norm"] = grad_norm.item()
            metrics["time/step_s"] = time.perf_counter() - t_step
            for k, v in metrics.items():
                history[k].append(v)
            self._observe_step(metrics, len(ids))
            shown = " | ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.split("/")[0] in SHOWN
            )
            log.info("step %d/%d from %s | %s", step + 1, a.steps_per_version, parent, shown)
            self._state(phase="training", step=step + 1, metrics=metrics)

        # --- save ---
        train_metrics = {k: sum(v) / len(v) for k, v in history.items()}
        train_metrics["data/records"] = float(len(consumed))
        for reason, n in self.dropped.items():
            train_metrics[f"data/dropped_{reason}"] = float(n - dropped_before.get(reason, 0))
        train_metrics["time/train_s"] = time.perf_counter() - t0
        meta = self.save(parent, {self.feed.stream: consumed}, train_metrics)
        # --- gate ---
        meta = self.decide(meta, candidate=TRAIN)
        if meta.status == "promoted":
            self.policy.parent = meta.version  # the weights in memory are that version
        else:
            self._discard = True  # the next version starts again from the promoted one
        return meta

    # --- data -----------------------------------------------------------------------------

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
            staleness = version_index(self.policy.parent) - version_index(record.version)
            if staleness > self.args.max_staleness:
                return "stale"
            if record.version != BASE and not self.store.has_adapter(record.version):
                return "unknown_version"
        return None

    # --- loss -----------------------------------------------------------------------------

    def dpo_step(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, float], float]:
        """DPO loss of some pairs: (loss, metrics, pairs it is a mean over)."""
        a, model = self.args, self.policy.model
        # chosen and rejected in one forward pass: rows [0, B) chosen, [B, 2B) rejected
        batch = build_batch(
            self.policy.tokenizer,
            [p.messages for p in pairs] * 2,
            [p.chosen for p in pairs] + [p.rejected for p in pairs],
            a.max_len,
        )
        ref = reference_logps(model, batch)  # (2B, T), adapter disabled, no grad
        logps = token_logps(model, batch)  # (2B, T)
        if a.dpo_loss == "ipo":  # IPO wants length-normalised log-probs (see dpo_loss)
            n = batch["completion_mask"].sum(1).clamp(min=1)  # (2B,)
            seq, ref_seq = logps.sum(1) / n, ref.sum(1) / n  # (2B,)
        else:
            seq, ref_seq = logps.sum(1), ref.sum(1)  # (2B,)
        pc, pr = seq.chunk(2)  # (B,) each
        rc, rr = ref_seq.chunk(2)  # (B,) each
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=a.dpo_beta, loss_type=a.dpo_loss)
        return loss, metrics, float(len(pairs))

    def grpo_step(self, groups: list[ScoredGroup]) -> tuple[torch.Tensor, dict[str, float], float]:
        """GRPO loss of some groups: (loss, metrics, completion tokens it is a mean over)."""
        a, model = self.args, self.policy.model
        rows = [(g, i) for g in groups for i in range(len(g.completions))]
        completions = [
            g.completion_token_ids[i]
            if len(g.completion_token_ids) == len(g.completions)
            else g.completions[i]
            for g, i in rows
        ]
        eos = self.policy.tokenizer.eos_token_id
        batch = build_batch(
            self.policy.tokenizer,
            [g.messages for g, _ in rows],
            completions,
            a.max_len,
            # logged ids that end with eos already have it
            append_eos=[not (isinstance(c, list) and c and c[-1] == eos) for c in completions],
        )
        mask = batch["completion_mask"]  # (B*G, T)
        ref = reference_logps(model, batch)  # (B*G, T), adapter disabled, no grad
        # behaviour log-probs, recomputed under the version that sampled each group
        behaviour = torch.zeros_like(ref)  # (B*G, T)
        by_version: dict[str, list[int]] = defaultdict(list)
        for row, (g, _) in enumerate(rows):
            by_version[g.version].append(row)
        for version, idx in by_version.items():
            if version == BASE:
                behaviour[idx] = ref[idx]  # the base model is the reference: no extra pass
                continue
            sub = {k: v[idx] for k, v in batch.items()}
            with torch.no_grad(), self.policy.use(version) as m:
                behaviour[idx] = token_logps(m, sub)
        logps = token_logps(model, batch)  # (B*G, T)
        # advantages per group (groups may differ in size), in row order
        advantages = torch.cat(
            [group_advantages(torch.tensor([g.rewards], dtype=torch.float32)) for g in groups]
        ).to(logps.device)  # (B*G,)
        loss, metrics = grpo_loss(
            logps, behaviour, ref, advantages, mask, clip_eps=a.grpo_clip, kl_coef=a.grpo_kl_coef
        )
        return loss, metrics, float(mask.sum())

    def backward(self, records: list[PreferencePair] | list[ScoredGroup]) -> dict[str, float]:
        """Gradients of the batch's loss, built `micro_batch_size` records at a time.

        Each loss is a mean (over pairs, or over completion tokens); a micro-batch's loss
        times its count, summed, then divided by the batch's count is exactly the batch's
        mean, so micro-batching changes peak memory, not the update. Returns the metrics
        averaged the same way (`_max`/`_min` ones: over the batch).
        """
        size = self.args.micro_batch_size or len(records)
        loss_fn = self.dpo_step if self.args.algorithm == "dpo" else self.grpo_step
        parts, total = [], 0.0
        for i in range(0, len(records), size):
            loss, metrics, n = loss_fn(records[i : i + size])
            (loss * n).backward()
            parts.append((metrics, n))
            total += n
        for p in self.policy.trainable_parameters():
            if p.grad is not None:
                p.grad /= total
        merged = {}
        for key in parts[0][0]:
            values = [(m[key], n) for m, n in parts]
            if key.endswith("_max"):
                merged[key] = max(v for v, _ in values)
            elif key.endswith("_min"):
                merged[key] = min(v for v, _ in values)
            else:
                merged[key] = sum(v * n for v, n in values) / total
        # --- what the batch was made of ---
        if self.args.algorithm == "dpo":
            merged["reward/mean"] = sum(p.chosen_reward + p.rejected_reward for p in records) / (
                2 * len(records)
            )
            merged["reward/pair_margin"] = sum(
                p.chosen_reward - p.rejected_reward for p in records
            ) / len(records)
        else:
            rewards = [x for g in records for x in g.rewards]
            merged["reward/mean"] = sum(rewards) / len(rewards)
            merged["data/staleness"] = sum(
                version_index(self.policy.parent) - version_index(g.version) for g in records
            ) / len(records)
        return merged

    # --- save and gate ----------------------------------------------------------------------

    def save(
        self, parent: str, consumed: dict[str, list[str]], train_metrics: dict[str, float]
    ) -> AdapterVersion:
        """Write the candidate (atomically), register it, then acknowledge its records."""
        version = self.registry.next_version(at_least=self.store.highest() + 1)
        self._state(phase="saving", version=version)
        meta = AdapterVersion(
            version=version,
            parent=parent,
            path="",
            algorithm=self.args.algorithm,
            hyperparameters=self.args.hyperparameters(),
            consumed=consumed,
            train_metrics=train_metrics,
        )

        def save_files(tmp: Path) -> None:
            self.policy.save(tmp)
            self._pause("save")  # test only: killed here, a half-written version exists

        self.store.write(meta, save_files)
        self._pause("saved")  # test only: on disk, but neither registered nor acknowledged
        self.registry.add(meta)
        acked = sum(self.feed.ack(ids) for ids in consumed.values())
        self.versions_written.append(version)
        log.info("%s saved (parent %s, %d records acknowledged)", version, parent, acked)
        return meta

    def decide(self, meta: AdapterVersion, candidate: str) -> AdapterVersion:
        """Gate `meta` (loaded in the policy as adapter `candidate`) unless a decision is
        recorded already, record it on disk, then apply it in the registry."""
        a = self.args
        if "passed" not in meta.gate:
            self._state(phase="gating", version=meta.version)
            pointer = self.registry.promoted() or BASE
            if pointer != meta.parent:
                result = GateResult(
                    False, f"parent {meta.parent} is no longer promoted ({pointer} is)"
                )
            else:
                try:
                    result = run_gate(
                        self.policy,
                        candidate,
                        meta.parent,
                        self.store.path(meta.version),
                        probe_prompts(self.r, self.keys, a.gate_probe_size),
                        kl_limit=a.gate_kl_limit,
                        reward_tolerance=a.gate_reward_tolerance,
                        max_tokens=a.gate_max_tokens,
                        judge_tokens=a.gate_judge_tokens,
                        max_len=a.max_len,
                    )
                except (redis.ConnectionError, redis.TimeoutError):
                    raise  # transient: decided after the restart
                except Exception as e:
                    # A gate that cannot run must not promote, nor crash-loop the learner
                    # on the same version after every restart.
                    log.exception("gate of %s failed", meta.version)
                    result = GateResult(False, f"gate failed: {e.__class__.__name__}: {e}")
            meta.gate = result.record()
            meta.status = "promoted" if result.passed else "rejected"
            meta.reason = result.reason
            self.store.update(meta)  # disk first: after a crash the decision is re-applied
        if meta.status == "promoted" and (self.registry.promoted() or BASE) != meta.parent:
            meta.status = "rejected"
            meta.reason = f"parent {meta.parent} was replaced while {meta.version} was gated"
            self.store.update(meta)
        self.metrics.versions.labels(meta.status).inc()
        if "gate/kl" in meta.gate:
            self.metrics.gate_kl.set(meta.gate["gate/kl"])
        if meta.status == "promoted":
            self.registry.promote(meta.version, gate=meta.gate)
            log.info("%s promoted: %s", meta.version, _brief(meta.gate))
        else:
            self.registry.reject(meta.version, meta.reason or "rejected", gate=meta.gate)
            log.warning("%s rejected: %s (%s)", meta.version, meta.reason, _brief(meta.gate))
        return meta

    # --- housekeeping -----------------------------------------------------------------------

    def housekeeping(self, waiting: int = 0, since: float | None = None) -> None:
        now = time.time()
        if now - self._last_check >= self.args.rollback_check_s:
            self._last_check = now
            try:
                rollback.check(
                    self.registry,
                    self.r,
                    self.keys,
                    self.args.rollback_window_s,
                    self.args.rollback_margin,
                    self.args.rollback_min_samples,
                )
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # the read loop reports Redis being down
            except Exception:  # a failed check must not stop training
                log.exception("rollback check failed")
        self.metrics.buffered.set(waiting)
        self._state(phase="waiting", buffered=waiting, waiting_s=round(now - (since or now), 1))

    def _observe_step(self, metrics: dict[str, float], records: int) -> None:
        m = self.metrics
        m.steps.inc()
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
        self.metrics.promoted.set(version_index(self.policy.parent))
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


SHOWN = {"loss", "reward", "rewards", "policy", "grad"}  # metric namespaces in the step line


def _brief(gate: dict) -> str:
    keys = ("gate/kl", "gate/reward_candidate", "gate/reward_parent", "gate/reward_skipped")
    return ", ".join(f"{k.split('/')[1]} {gate[k]:.4g}" for k in keys if k in gate)


def build(settings: Settings, args: Args | None = None, pause_at: str | None = None) -> Learner:
    """A learner on the configured model, Redis and adapter directory (not started)."""
    from strop.model import load_model

    args = args or Args.from_settings(settings)
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
    r = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=30, socket_connect_timeout=5
    )
    return Learner(args, r, Keys(settings.redis_prefix), store, policy, pause_at=pause_at)


def main(settings: Settings, max_versions: int | None = None) -> int:
    """Run the learner until SIGTERM/SIGINT (or `max_versions` versions were written)."""
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
