"""`strop beat` smoke test: it schedules the ingest task on this deployment's queue."""

import os
import signal
import subprocess
import sys

from strop.queues import INGEST_QUEUE, queue_length
from tests.conftest import REDIS_URL
from tests.worker.conftest import wait_until


def test_beat_sends_ingest_task_every_interval(redis_prefix, r, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_REDIS_URL=REDIS_URL, STROP_REDIS_PREFIX=redis_prefix, STROP_INGEST_INTERVAL_S="0.5"
    )
    beat = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "beat"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_until(lambda: queue_length(r, redis_prefix, INGEST_QUEUE) >= 2, timeout=30)
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(20)
