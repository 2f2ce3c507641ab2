"""The Celery app, built from strop's settings: Redis broker, two queues, ingest on beat.

Every broker key lives under the settings' `redis_prefix` (kombu's `global_keyprefix`),
so deployments or tests sharing one Redis never see each other's tasks.

Reliability, in Celery's own terms:
- `task_acks_late` + `task_reject_on_worker_lost`: a task is acknowledged after it ran,
  and a worker killed mid-task leaves its message unacknowledged;
- the Redis broker delivers an unacknowledged message again once `visibility_timeout`
  has passed; it is set a little above the hard time limit, so a live task is never
  delivered twice, and a dead worker's task runs again on another worker. Build tasks
  are idempotent anyway (see worker/build.py);
- `worker_prefetch_multiplier=1`: a worker holds no more tasks than it runs, so a crash
  strands at most one per process and backpressure sees the real queue.
"""

from celery import Celery
from kombu import Exchange, Queue

from strop.queues import BUILD_QUEUE, INGEST_QUEUE
from strop.settings import Settings


def visibility_timeout(settings: Settings) -> int:
    return settings.broker_visibility_timeout_s or settings.task_time_limit_s + 60


def soft_time_limit(settings: Settings) -> int:
    """A little before the hard limit, so a task can fail cleanly before it is killed."""
    limit = settings.task_time_limit_s
    return max(1, limit - max(5, limit // 10))


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings; a worker on it imports and runs worker/tasks.py."""
    prefix = settings.redis_prefix
    vt = visibility_timeout(settings)
    sweep_s = max(1, min(60, vt // 10))  # sweep for a dead worker's messages ~10x per timeout
    # a worker (or beat) imports the tasks when it starts, through Celery's `include`:
    # worker/tasks.py imports this module, never the other way round
    app = Celery("strop", set_as_current=False, include=["worker.tasks"])
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        broker_transport_options={
            "global_keyprefix": prefix,
            "visibility_timeout": vt,
            "unacked_restore_interval": sweep_s,
            "unacked_restore_throttle": 1,
            # A sweep holds kombu's lock for milliseconds, but a worker killed inside one
            # leaves it held until it expires: 5 minutes by default, in which no worker
            # restores anything. A short lock is safe: each restore is its own WATCH
            # transaction, so two sweeps at once cannot both restore one message.
            "unacked_mutex_expire": max(5, sweep_s),
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # tasks report through Redis streams and metrics
        result_expires=3600,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=soft_time_limit(settings),
        task_default_queue=BUILD_QUEUE,
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in (BUILD_QUEUE, INGEST_QUEUE)],
        task_routes={"worker.ingest_prompts": {"queue": INGEST_QUEUE}},
        # a retry waits out its countdown in a worker, unacknowledged: countdown + run time
        # must stay under the visibility timeout, or the broker hands out a second copy
        task_annotations={
            name: {"retry_backoff_max": max(1, min(120, vt - settings.task_time_limit_s))}
            for name in ("worker.build_group", "worker.build_feedback")
        },
        beat_schedule={
            "ingest-prompts": {
                "task": "worker.ingest_prompts",
                "schedule": settings.ingest_interval_s,
                # a run nobody picked up before the next one is due is useless
                "options": {"queue": INGEST_QUEUE, "expires": max(1.0, settings.ingest_interval_s)},
            }
        },
        # one interval task: nothing worth persisting, so no schedule file to manage
        beat_scheduler="celery.beat:Scheduler",
        worker_hijack_root_logger=False,  # strop's logfmt lines stay
        worker_send_task_events=False,
    )
    app.strop_settings = settings  # what worker/context.py makes a process's clients from
    return app
