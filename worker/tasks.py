"""The worker's Celery tasks: thin wrappers around worker/ingest.py, worker/feedback.py
and worker/build.py.

They are shared tasks: registered on every app `worker.app.create_app` makes (its
`include` imports this module when a worker starts), so tests can run apps with settings
of their own side by side; each reads its settings and clients from the app it runs on.
Always send them through an app (`app.send_task("worker.build_group", ...)`), never
through these module attributes.
"""

import logging
import time

from celery import Task, shared_task
from redis.exceptions import RedisError

from strop.queues import BUILD_QUEUE
from strop.series import Obs
from worker.app import soft_time_limit
from worker.build import TRANSIENT_ERRORS, dead_letter
from worker.build import build_group as build
from worker.context import get_context
from worker.feedback import run_feedback
from worker.ingest import run_ingest

log = logging.getLogger("strop.worker.tasks")


@shared_task(name="worker.ingest_prompts", bind=True, acks_late=True, ignore_result=True)
def ingest_prompts(self: Task) -> dict:
    """Read new prompt-log entries and enqueue their build tasks (beat runs this)."""
    ctx = get_context(self.app)

    def enqueue(log_id: str) -> None:
        self.app.send_task(
            "worker.build_group", args=[log_id], queue=BUILD_QUEUE, task_id=f"build-{log_id}"
        )

    def enqueue_late(log_id: str, request_id: str) -> None:
        self.app.send_task(
            "worker.build_feedback",
            args=[log_id, request_id],
            queue=BUILD_QUEUE,
            task_id=f"feedback-{request_id}",
        )

    report = run_ingest(ctx, enqueue)
    # late feedback rides along: a few entries a run, and no beat entry of its own
    late = run_feedback(ctx, enqueue_late)
    return {
        "enqueued": len(report.enqueued),
        "dropped": dict(report.dropped),
        "feedback": dict(late.outcomes),
    }


class BuildTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # out of retries, over time or a bug: dead-lettered, so a requeue can build it later
        log.warning("build %s failed: %s: %s", args[0] if args else "?", type(exc).__name__, exc)
        ctx = get_context(self.app)
        try:
            dead_letter(ctx, args[0], "failed", f"{type(exc).__name__}: {exc}")
        except RedisError:  # Redis down is likely why it failed: the counter has it at least
            ctx.metrics.observe([Obs("dropped", "unknown", label="failed")])


# Both builds: acknowledged only once done (a killed worker's task is redelivered; the
# marker keeps it from being written twice), retried with back-off on what a retry cures.
BUILD_OPTIONS: dict = dict(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=True,
    retry_jitter=True,
    max_retries=5,
    ignore_result=True,
)


@shared_task(name="worker.build_group", base=BuildTask, **BUILD_OPTIONS)
def build_group(self: Task, log_id: str) -> str:
    """Sample, reward and write the group of one prompt-log entry (idempotent)."""
    ctx = get_context(self.app)
    # every service call ends a few seconds before the soft limit
    deadline = time.monotonic() + soft_time_limit(ctx.settings) - 2
    return build(ctx, log_id, deadline)


@shared_task(name="worker.build_feedback", **BUILD_OPTIONS)
def build_feedback(self: Task, log_id: str, request_id: str) -> str:
    """The feedback group of a request whose prompt was built before its feedback came
    (once per request id, however often it is sent)."""
    ctx = get_context(self.app)
    deadline = time.monotonic() + soft_time_limit(ctx.settings) - 2
    return build(ctx, log_id, deadline, late=request_id)
