"""The Celery app: configuration only; a worker registers the tasks through `include`."""

import subprocess
import sys

from strop.queues import BUILD_QUEUE, INGEST_QUEUE
from strop.settings import Settings
from tests.conftest import REDIS_URL
from worker.app import create_app


def test_create_app_imports_no_task_module():
    # the tasks import the app: the app importing them back would close an import circle
    code = (
        "import sys; from strop.settings import Settings; from worker.app import create_app; "
        "create_app(Settings()); assert 'worker.tasks' not in sys.modules, 'tasks imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_create_app_worker_start_registers_tasks_by_name(redis_prefix):
    app = create_app(Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix))
    try:
        assert "worker.tasks" in app.conf.include
        app.loader.import_default_modules()  # what a worker (or beat) does when it starts
        build, ingest = app.tasks["worker.build_group"], app.tasks["worker.ingest_prompts"]
        assert build.acks_late and build.max_retries == 5 and ingest.acks_late
        assert app.conf.task_default_queue == BUILD_QUEUE
        assert app.conf.task_routes["worker.ingest_prompts"] == {"queue": INGEST_QUEUE}
    finally:
        app.close()
