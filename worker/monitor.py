"""The worker's Prometheus metrics: the same observations it writes to the time series
(`strop/series.py`), per process, for scraping."""

import logging
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from strop.series import VALUE_METRICS, Obs

log = logging.getLogger("strop.worker")

# --- Prometheus -------------------------------------------------------------------------

_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_SCORE_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)


class WorkerMetrics:
    """The worker's Prometheus metrics, on a registry of their own.

    Under prefork each child process counts its own; with PROMETHEUS_MULTIPROC_DIR set
    (`strop worker` sets it) they are summed across the children at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.counts = {
            "ingested": Counter(
                "strop_worker_prompts_ingested",
                "Prompt-log entries read by ingest",
                ["version"],
                registry=r,
            ),
            "enqueued": Counter(
                "strop_worker_builds_enqueued", "Build tasks enqueued", ["version"], registry=r
            ),
            "dropped": Counter(
                "strop_worker_dropped",
                "Prompts and groups dropped, by reason",
                ["version", "reason"],
                registry=r,
            ),
            "built": Counter(
                "strop_worker_groups_built",
                "Scored groups written",
                ["version", "method"],
                registry=r,
            ),
            "pairs": Counter(
                "strop_worker_pairs", "Preference pairs written", ["version"], registry=r
            ),
            "paused": Counter(
                "strop_worker_ingest_paused",
                "Ingest runs that found the build queue full",
                ["version"],
                registry=r,
            ),
            "feedback": Counter(
                "strop_worker_feedback",
                "User feedback read, by the version that served the rated reply and kind",
                ["version", "kind"],
                registry=r,
            ),
        }
        self.values = {
            name: Histogram(
                f"strop_worker_{name}",
                f"{name.replace('_', ' ').capitalize()} (per group, or per completion for scores)",
                ["version"],
                buckets=_SCORE_BUCKETS if name in ("reward", "judge_score") else _RATIO_BUCKETS,
                registry=r,
            )
            for name in VALUE_METRICS
        }
        self.queue_length = Gauge(
            "strop_worker_queue_length",
            "Build tasks waiting in the queue at the last ingest",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.build_seconds = Histogram(
            "strop_worker_build_seconds",
            "Duration of a build task",
            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=r,
        )

    def observe(self, obs: Iterable[Obs]) -> None:
        for o in obs:
            if o.metric in self.counts:
                labels = [o.version] + (
                    [o.label or ""] if o.metric in ("dropped", "built", "feedback") else []
                )
                self.counts[o.metric].labels(*labels).inc(o.count)
            elif o.metric in self.values and o.count:
                self.values[o.metric].labels(o.version).observe(o.value / o.count)


def start_metrics_server(port: int, host: str, metrics: WorkerMetrics | None = None) -> bool:
    """Serve /metrics on `port` (0: don't); True if it does. Under PROMETHEUS_MULTIPROC_DIR,
    the sum over every process of this worker; else `metrics`' own registry. A port in use
    (a second worker on this host) is logged, not fatal: building matters more."""
    if not port:
        return False
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = (metrics or WorkerMetrics()).registry
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        log.warning("worker metrics not served on %s:%d: %s", host, port, e)
        return False
    return True
