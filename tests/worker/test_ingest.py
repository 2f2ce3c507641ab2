"""Ingest against a real Redis and a real Celery broker: filters, dedupe, backpressure,
acknowledgment, and entries left pending by a dead consumer."""

import pytest
from celery.contrib.testing.worker import start_worker

from strop.queues import BUILD_QUEUE, queue_length
from strop.records import Keys
from tests.worker.conftest import log_record, wait_until
from worker.build import group_id
from worker.ingest import run_ingest


def sender(app):
    """Enqueue build tasks the way the ingest task does."""

    def enqueue(log_id: str) -> None:
        app.send_task("worker.build_group", args=[log_id], queue=BUILD_QUEUE)

    return enqueue


def lag(r, keys: Keys) -> int:
    """Entries of the log the ingest group has not read yet."""
    return next(g for g in r.xinfo_groups(keys.prompt_log) if g["name"] == keys.ingest_group)["lag"]


def test_ingest_filters_drop_and_acknowledge(ctx, celery_app, r):
    keys = ctx.keys
    ids = {
        "ok": r.xadd(keys.prompt_log, log_record("What is 1 or 2?")),
        "long": r.xadd(keys.prompt_log, log_record("too long", prompt_tokens=5000)),
        "internal": r.xadd(keys.prompt_log, log_record("worker's own", internal=True)),
        "bad": r.xadd(keys.prompt_log, {"data": "{not json"}),
        "dup": r.xadd(keys.prompt_log, log_record("WHAT is 1  or 2?")),
    }
    report = run_ingest(ctx, sender(celery_app))
    assert report.enqueued == [ids["ok"]]
    assert dict(report.dropped) == {"too_long": 1, "internal": 1, "bad_record": 1, "duplicate": 1}
    assert queue_length(r, ctx.settings.redis_prefix) == 1
    # everything read was handled, so acknowledged; a second run finds nothing new
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0
    assert run_ingest(ctx, sender(celery_app)).read == 0


def test_ingest_full_queue_leaves_entries_unread_until_it_drains(
    ctx, worker_settings, celery_app, r
):
    ctx.settings = worker_settings.model_copy(update={"queue_limit": 5, "ingest_batch": 4})
    keys = ctx.keys
    ids = [r.xadd(keys.prompt_log, log_record(f"distinct prompt {i}")) for i in range(12)]

    # no worker consumes: the queue fills up to the limit and ingest stops reading
    for _ in range(4):
        report = run_ingest(ctx, sender(celery_app))
        assert queue_length(r, ctx.settings.redis_prefix) <= 5
    assert report.paused and report.read == 0
    assert queue_length(r, ctx.settings.redis_prefix) == 5
    assert lag(r, keys) == 7  # unread, so nothing is lost
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0

    # a worker drains the queue; later runs enqueue the rest, never above the limit
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30):

        def all_enqueued() -> bool:
            run_ingest(ctx, sender(celery_app))
            assert queue_length(r, ctx.settings.redis_prefix) <= 5
            return lag(r, keys) == 0

        assert wait_until(all_enqueued, timeout=60, interval=0.2)
        assert wait_until(
            lambda: all(r.exists(keys.built + group_id(i, ctx.settings)) for i in ids),
            timeout=60,
        )
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0


def test_ingest_dead_consumer_entries_claimed_and_enqueued(ctx, celery_app, r):
    keys = ctx.keys
    ids = [r.xadd(keys.prompt_log, log_record(f"prompt {i}")) for i in range(3)]
    r.xgroup_create(keys.prompt_log, keys.ingest_group, id="0")
    # a consumer reads two entries and dies before acknowledging them
    r.xreadgroup(keys.ingest_group, "dead-worker:1", {keys.prompt_log: ">"}, count=2)

    report = run_ingest(ctx, sender(celery_app), claim_idle_s=0)
    assert report.claimed == 2
    assert sorted(report.enqueued) == sorted(ids)
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0


def test_ingest_enqueue_failure_leaves_entry_pending_then_claimed(ctx, celery_app, r):
    keys = ctx.keys
    ids = [r.xadd(keys.prompt_log, log_record(f"prompt {i}")) for i in range(3)]
    calls = []

    def flaky(log_id: str) -> None:  # the broker goes away after the first task
        calls.append(log_id)
        if len(calls) > 1:
            raise ConnectionError("broker unreachable")
        sender(celery_app)(log_id)

    with pytest.raises(ConnectionError):
        run_ingest(ctx, flaky)
    # the first entry is enqueued and acknowledged; the other two stay pending, unacked
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 2
    report = run_ingest(ctx, sender(celery_app), claim_idle_s=0)
    assert sorted(report.enqueued) == sorted(ids[1:])  # not dropped as duplicates
    assert queue_length(r, ctx.settings.redis_prefix) == 3
    assert r.xpending(keys.prompt_log, keys.ingest_group)["pending"] == 0
