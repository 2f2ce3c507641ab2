"""What a task needs, made once per worker process: settings, clients (with timeouts),
metrics and probe answers.

A prefork worker forks its children after the app is made; each child makes its own
context on its first task (`get_context`), so no client crosses a fork.
"""

import os
import socket
from dataclasses import dataclass

import openai
import redis
from celery import Celery

from strop.connection import connect
from strop.headers import INTERNAL
from strop.records import Keys
from strop.settings import Settings
from worker.app import soft_time_limit
from worker.monitor import WorkerMetrics
from worker.probe import load_probes


@dataclass
class WorkerContext:
    """What a task needs, made once per worker process (after the fork)."""

    settings: Settings
    keys: Keys
    redis: redis.Redis
    service: openai.OpenAI
    metrics: WorkerMetrics
    consumer: str  # this process's name in the prompt log's consumer group
    probes: dict[str, str]  # gold answers: read by worker/probe.py only, never by a reward
    gold: dict[str, str]  # the `gold` reward method's answers (empty for the other methods)


def make_context(settings: Settings, metrics: WorkerMetrics | None = None) -> WorkerContext:
    """Clients (with timeouts), metrics and probe answers for one process."""
    service = openai.OpenAI(
        base_url=settings.service_url.rstrip("/") + "/v1",
        api_key=settings.service_api_key or "none",
        # Celery retries with backoff; the client must not retry behind its back
        max_retries=0,
        timeout=openai.Timeout(float(soft_time_limit(settings)), connect=5.0),
        default_headers={INTERNAL: "1"},
    )
    return WorkerContext(
        settings=settings,
        keys=Keys(settings.redis_prefix),
        redis=connect(settings.redis_url, timeout=10, connect_timeout=5),
        service=service,
        metrics=metrics or WorkerMetrics(),
        consumer=f"{socket.gethostname()}:{os.getpid()}",
        probes=load_probes(settings.probe_file),
        gold=load_probes(settings.gold_file) if settings.reward_method == "gold" else {},
    )


_contexts: dict[tuple[int, int], WorkerContext] = {}


def get_context(app: Celery) -> WorkerContext:
    """The context of this process for `app` (a forked child makes its own)."""
    key = (id(app), os.getpid())
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = make_context(app.strop_settings, process_metrics())
    return ctx


def release_contexts(app: Celery) -> None:
    """Close this process's clients for `app` (tests make many apps in one process)."""
    for key in [k for k in _contexts if k[0] == id(app)]:
        ctx = _contexts.pop(key)
        ctx.redis.close()
        ctx.service.close()


_metrics: WorkerMetrics | None = None


def process_metrics() -> WorkerMetrics:
    """This process's worker metrics: one set, shared by the apps of a process (tests)."""
    global _metrics
    if _metrics is None:
        _metrics = WorkerMetrics()
    return _metrics
