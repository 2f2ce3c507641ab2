"""`strop worker` and `strop beat`: start Celery for these settings, programmatically;
`strop worker requeue`: build the dead-lettered prompts again.

This module imports no Prometheus code at import time: a prefork worker's children each
count their own metrics, and prometheus_client only sums them across processes if
PROMETHEUS_MULTIPROC_DIR is set before it is first imported.
"""

import logging
import os
import shutil
import tempfile

import httpx

from strop.logs import setup_logging
from strop.queues import BUILD_QUEUE, dead_letter_key
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
    ingest schedule (run only one beat per deployment). Returns 2 at once if the service
    refuses the worker's key."""
    refused = key_refused(settings)
    if refused:
        log.error(
            "worker: the service at %s refuses the worker's key (%s); set "
            "STROP_SERVICE_API_KEY to one of the service's STROP_API_KEYS",
            settings.service_url,
            refused,
        )
        return 2
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
    metrics_on = start_metrics_server(
        settings.worker_metrics_port, settings.host, process_metrics()
    )
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
        settings.worker_metrics_port if metrics_on else "off",
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


def key_refused(settings: Settings, timeout: float = 10.0) -> str | None:
    """Why the service refuses the worker's key (`GET /v1/models` with it answered 401 or
    403), or None. A service that cannot be asked now is no reason not to start: builds
    retry until it answers."""
    url = settings.service_url.rstrip("/") + "/v1/models"
    key = settings.service_api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        log.warning(
            "worker: the service at %s does not answer (%s); starting anyway, builds retry",
            settings.service_url,
            e.__class__.__name__,
        )
        return None
    if resp.status_code not in (401, 403):
        return None
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return f"{resp.status_code}: {message}" if key else f"no key set; {resp.status_code}: {message}"


def requeue(settings: Settings) -> int:
    """Send the dead-lettered builds to the build queue again (their markers cleared, so
    they are built) and remove them from the dead letters; returns how many."""
    from strop.connection import connect
    from strop.records import Keys
    from worker.app import create_app

    keys, stream = Keys(settings.redis_prefix), dead_letter_key(settings.redis_prefix)
    r = connect(settings.redis_url)
    app = create_app(settings)
    done = 0
    try:
        # a snapshot: what the workers dead-letter meanwhile waits for the next requeue
        for entry_id, fields in r.xrange(stream):
            log_id = fields.get("log_id")
            if log_id:
                if fields.get("group_id"):
                    r.delete(keys.built + fields["group_id"])
                app.send_task(
                    "worker.build_group",
                    args=[log_id],
                    queue=BUILD_QUEUE,
                    task_id=f"build-{log_id}",
                )
            r.xdel(stream, entry_id)
            done += 1
    finally:
        app.close()
        r.close()
    return done
