"""The learner's Prometheus metrics, served on `STROP_LEARNER_METRICS_PORT` (0 = off).

One process, so one plain registry: no multiprocess collector as in the worker.
"""

import logging

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

log = logging.getLogger("strop.learner")

PHASES = ["starting", "waiting", "training", "saving", "gating", "stopped"]


class LearnerMetrics:
    """What an operator graphs about the learner: progress, losses, decisions, phase."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.steps = Counter("strop_learner_steps", "Optimizer steps taken", registry=r)
        self.records = Counter(
            "strop_learner_records", "Records (pairs or groups) trained on", registry=r
        )
        self.dropped = Counter(
            "strop_learner_dropped", "Records dropped untrained, by reason", ["reason"], registry=r
        )
        self.versions = Counter(
            "strop_learner_versions", "Versions written, by gate decision", ["status"], registry=r
        )
        self.step_seconds = Histogram(
            "strop_learner_step_seconds",
            "Duration of one optimizer step (forward, backward, update)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
            registry=r,
        )
        self.loss = Gauge("strop_learner_loss", "Loss of the last step", registry=r)
        self.reward = Gauge(
            "strop_learner_batch_reward", "Mean reward of the last step's records", registry=r
        )
        self.grad_norm = Gauge(
            "strop_learner_grad_norm",
            "Gradient norm of the last step (before clipping)",
            registry=r,
        )
        self.gate_kl = Gauge(
            "strop_learner_gate_kl", "KL(candidate || parent) of the last gated version", registry=r
        )
        self.promoted = Gauge(
            "strop_learner_promoted_version",
            "N of the promoted version vN (0: base) as the learner last saw it",
            registry=r,
        )
        self.buffered = Gauge(
            "strop_learner_buffered", "Records read and waiting for a full batch", registry=r
        )
        self.phase = Enum(
            "strop_learner_phase", "What the learner is doing", states=PHASES, registry=r
        )
        self.phase.state("starting")

    def serve(self, port: int, host: str) -> bool:
        """Serve /metrics on `port` (0: don't). A port in use is logged, not fatal:
        training matters more than its metrics."""
        if not port:
            return False
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.warning("learner metrics not served on %s:%d: %s", host, port, e)
            return False
        return True
