"""`strop worker` and `strop beat`: start Celery for these settings, programmatically.

This module imports no Prometheus code at import time: a prefork worker's children each
count their own metrics, and prometheus_client only sums them across processes if
PROMETHEUS_MULTIPROC_DIR is set before it is first imported.
"""

import logging
import os
import shutil
import tempfile

from strop.logs import setup_logging
from strop.settings import Settings

log = logging.getLogger("strop.worker")


def _keep_strop_logging(settings: Settings) -> None:
    """Celery would set the root logger to the worker's level (every library's INFO
    lines); a `setup_logging` receiver keeps strop's: logfmt, libraries only warn."""
    from celery.signals import setup_logging as celery_setup_logging

    @celery_setup_logging.connect(weak=False)
    def _setup(**_: object) -> None:
        setup_logging(settings.log_level)


def run_worker(
    settings: Settings, beat: bool = True, concurrency: int | None = None, pool: str = "prefork"
) -> int:
    """Run a worker on the build and ingest queues until it is stopped; `beat` embeds the
    ingest schedule (run only one beat per deployment)."""
    own_dir = None
    if settings.worker_metrics_port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        own_dir = tempfile.mkdtemp(prefix="strop-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    from celery.signals import worker_process_shutdown

    from worker.app import create_app
    from worker.context import process_metrics
    from worker.monitor import start_metrics_server

    if own_dir:

        @worker_process_shutdown.connect(weak=False)
        def _child_gone(pid: int | None = None, **_: object) -> None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())

    _keep_strop_logging(settings)
    app = create_app(settings)
    start_metrics_server(settings.worker_metrics_port, settings.host, process_metrics())
    argv = [
        "--quiet",  # no banner: the log line above says what matters
        "worker",
        f"--loglevel={settings.log_level}",
        f"--pool={pool}",
        f"--hostname=strop-{os.getpid()}@%h",
        "--without-mingle",  # nothing to sync: tasks are idempotent, revokes are unused
        "--without-gossip",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if beat:
        argv.append("--beat")
    log.info(
        "worker: service %s, method %s, N=%d G=%d, metrics on :%s%s",
        settings.service_url,
        settings.reward_method,
        settings.n_votes,
        settings.n_train,
        settings.worker_metrics_port or "off",
        ", beat embedded" if beat else "",
    )
    try:
        app.worker_main(argv)
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def run_beat(settings: Settings) -> int:
    """Run beat alone: it sends the ingest task every `ingest_interval_s`."""
    from worker.app import create_app

    _keep_strop_logging(settings)
    app = create_app(settings)
    log.info("beat: ingest every %.1f s", settings.ingest_interval_s)
    app.Beat(loglevel=settings.log_level).run()
    return 0
