"""A version's life around training: started from the promoted version, saved, gated, then
promoted or rejected; and, on start, whatever a crash left half done.

While the collapse guard has halted promotion (learner/collapse.py), `decide` rejects every
version without gating it, with the guard's reason, until an operator resumes.

Crash safety. Records stay pending in the consumer group until the version trained on them
is on disk, and the consumer name is stable, so a learner killed at any moment re-reads
them after a restart. On start, `reconcile` finishes what a crash interrupted: temporary
directories are removed, records already consumed by a version on disk are acknowledged,
a version on disk missing from the registry is registered, and a version not yet decided
is gated (or its recorded gate decision applied). Version numbers are never reused, even
the number of a save that crashed (vLLM must never see one name with two weights).

Disk trouble. A save that fails cleanly (read-only or full adapter directory: nothing was
renamed into place, so no reader saw the name) raises `SaveFailed` and hands its number
back; its records stay pending. `writable_error` is what the learner checks at start and
before each version, so it does not train what it cannot save.
"""

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import openai
import redis
from safetensors import SafetensorError

from learner.args import Args
from learner.feed import Feed
from learner.gate import (
    GateResult,
    labelled_prompts,
    probe_prompts,
    run_gate,
    trained_prompts,
)
from learner.metrics import LearnerMetrics
from learner.policy import Policy
from learner.serving import ServiceUnavailable
from strop.adapters import TMP_PREFIX, AdapterStore
from strop.labeled import read_jsonl
from strop.records import AdapterVersion, Keys, PromotionHalt
from strop.registry import Registry
from strop.versions import BASE, version_number

log = logging.getLogger("strop.learner")

PROBE_BYTES = 4096  # written and fsynced: a full disk refuses data blocks, not always inodes


class SaveFailed(Exception):
    """A version could not be written to the adapter directory (nothing was published)."""


def writable_error(root: Path, need_bytes: int = 0) -> str | None:
    """Why a version cannot be saved under `root` now (not writable, or under `need_bytes`
    free), or None if it can."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        # named like save debris, so a probe a crash leaves is removed by AdapterStore.clean
        with tempfile.NamedTemporaryFile(dir=root, prefix=f"{TMP_PREFIX}probe-") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(root).free
    except OSError as e:
        return f"{root} is not writable: {e.strerror or e}"
    if free < need_bytes:
        return (
            f"{root} has {free / 1e6:.1f} MB free, a version needs about {need_bytes / 1e6:.1f} MB"
        )
    return None


class Lifecycle:
    """The versions half of the learner: the disk (adapter store), the registry and the
    records' acknowledgements, kept consistent with each other across crashes."""

    def __init__(
        self,
        args: Args,
        r: redis.Redis,
        keys: Keys,
        store: AdapterStore,
        registry: Registry,
        policy: Policy,
        feed: Feed,
        metrics: LearnerMetrics,
        service: openai.OpenAI,
        stop: threading.Event,
        report: Callable[..., None] = lambda **fields: None,
        pause: Callable[[str], None] = lambda point: None,
    ):
        self.args, self.r, self.keys, self.store, self.registry = args, r, keys, store, registry
        self.policy, self.feed, self.metrics = policy, feed, metrics
        self.service = service  # the gate's generations go through it (learner/serving.py)
        self.stop = stop
        # labeled, never logged: read once, a malformed file stops the learner at start
        self.canary = read_jsonl(args.canary_file) if args.canary_file else []
        self.report = report  # what the learner is doing (the loop's `_state`)
        self.pause = pause  # test only: where a test may SIGKILL the process

    def reconcile(self) -> None:
        """Finish what a crash interrupted (see the module docstring)."""
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

    def rebase(self, discard: bool) -> bool:
        """Start the trainable adapter from the promoted version if the pointer moved, or
        if `discard` (the weights in memory are a rejected or unfinished version). True if
        it did (the optimizer must start afresh too)."""
        pointer = self.registry.promoted() or BASE
        if pointer == self.policy.parent and not discard:
            return False
        if pointer != BASE and not self.store.has_adapter(pointer):
            raise FileNotFoundError(
                f"the promoted version {pointer} is not in {self.store.root}: restore it, "
                "or point `strop` elsewhere (strop adapters rollback)"
            )
        self.policy.reset(pointer, seed=self.args.seed)
        return True

    def save(
        self, parent: str, consumed: dict[str, list[str]], train_metrics: dict[str, float]
    ) -> AdapterVersion:
        """Write the candidate (atomically), register it, then acknowledge its records.
        Raises SaveFailed (its number handed back, nothing acknowledged) if the adapter
        directory refuses it."""
        version = self.registry.next_version(at_least=self.store.highest() + 1)
        self.report(phase="saving", version=version)
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
            self.pause("save")  # test only: killed here, a half-written version exists

        try:
            self.store.write(meta, save_files)
        except (OSError, SafetensorError) as e:
            # unpublished (no vN, no debris holding the number): the next save may use it
            try:
                unpublished = self.store.highest() < version_number(version)
            except OSError:
                unpublished = False
            if unpublished:
                self.registry.release_version(version)
            cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SaveFailed(f"{version} not saved in {self.store.root}: {cause}") from e
        self.pause("saved")  # test only: on disk, but neither registered nor acknowledged
        self.registry.add(meta)
        acked = sum(self.feed.ack(ids) for ids in consumed.values())
        log.info("%s saved (parent %s, %d records acknowledged)", version, parent, acked)
        return meta

    def decide(self, meta: AdapterVersion, candidate: str) -> AdapterVersion:
        """Gate `meta` (loaded in the policy as adapter `candidate`) unless a decision is
        recorded already, record it on disk, then apply it in the registry. Returns `meta`
        still a candidate if the learner was stopped while the gate waited for the service
        (it is decided after the restart)."""
        if "passed" not in meta.gate:
            self.report(phase="gating", version=meta.version)
            pointer = self.registry.promoted() or BASE
            halt = self.registry.halted()
            if halt is not None:  # no gate run: nothing is promoted until an operator resumes
                result = GateResult(False, halted_reason(halt))
            elif pointer != meta.parent:
                result = GateResult(
                    False, f"parent {meta.parent} is no longer promoted ({pointer} is)"
                )
            else:
                try:
                    result = self._gate(meta, candidate)
                    if result is None:
                        return meta  # stopped while the service was away: undecided
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
        if meta.status == "promoted" and (halt := self.registry.halted()) is not None:
            meta.status = "rejected"  # the guard tripped while it was gated (or before a crash)
            meta.reason = halted_reason(halt)
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

    def _gate(self, meta: AdapterVersion, candidate: str) -> GateResult | None:
        """Run the gate, waiting out a service that does not answer (a missing answer is no
        evidence: never promote or reject on it); None if stopped meanwhile."""
        a, wait = self.args, 1.0
        trained = trained_prompts(self.r, meta.consumed)
        # without a canary, probe where the worker's groups already hold a vote label (no
        # sampling, and a label on every prompt); else the newest logged prompts
        labelled = (
            []
            if self.canary
            else labelled_prompts(self.r, self.keys, a.gate_probe_size, exclude=trained)
        )
        if len(labelled) >= a.gate_vote_min_prompts:
            prompts, labels = [p for p, _ in labelled], [label for _, label in labelled]
        else:
            prompts = probe_prompts(self.r, self.keys, a.gate_probe_size, exclude=trained)
            labels = None
        while True:
            try:
                return run_gate(
                    self.policy,
                    self.service,
                    candidate,
                    meta.version,
                    meta.parent,
                    self.store.path(meta.version),
                    prompts,
                    kl_limit=a.gate_kl_limit,
                    reward_tolerance=a.gate_reward_tolerance,
                    max_tokens=a.gate_max_tokens,
                    judge_tokens=a.gate_judge_tokens,
                    max_len=a.max_len,
                    canary=self.canary,
                    canary_tolerance=a.canary_tolerance,
                    vote_n=a.gate_vote_n,
                    vote_tolerance=a.gate_vote_tolerance,
                    vote_min_prompts=a.gate_vote_min_prompts,
                    labels=labels,
                )
            except ServiceUnavailable as e:
                log.warning("gate of %s waits for the service: %s", meta.version, e)
                self.report(phase="gating", version=meta.version, waiting_for="service")
                if self.stop.wait(wait):
                    return None
                wait = min(2 * wait, 30.0)


def halted_reason(halt: PromotionHalt) -> str:
    """Why a version is not promoted while promotion is halted."""
    return (
        f"collapse guard tripped: {halt.reason} (on {halt.version}; promotion halted until "
        "`strop adapters resume`)"
    )


def _brief(gate: dict) -> str:
    keys = ("gate/kl", "gate/reward_candidate", "gate/reward_parent", "gate/reward_skipped")
    return ", ".join(f"{k.split('/')[1]} {gate[k]:.4g}" for k in keys if k in gate)
