"""A build that no retry can fix is kept, not lost: it goes to the dead-letter stream with
its reason, and `strop worker requeue` builds it once the cause is fixed. A worker whose key
the service refuses says so at start and exits; one that cannot reach the service, or whose
metrics port is taken (a second worker on the host), starts anyway."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from celery.contrib.testing.worker import start_worker

from strop.queues import INGEST_QUEUE, dead_letter_key, dead_letter_length, queue_length
from strop.records import Keys, ScoredGroup
from tests.conftest import REDIS_URL, free_port
from tests.service.conftest import API_KEY
from tests.worker.conftest import WORKER, log_record, wait_until
from worker.app import create_app
from worker.build import TRANSIENT_ERRORS, ServiceBusy, _chat, build_group, group_id, refusal
from worker.context import make_context, release_contexts

ROOT = Path(__file__).resolve().parents[2]


def cli_env(settings, **extra: str) -> dict[str, str]:
    """The environment of a `strop` command on these settings' Redis and service, with the
    worker settings of these tests; no key unless `extra` gives one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_REDIS_URL=settings.redis_url,
        STROP_REDIS_PREFIX=settings.redis_prefix,
        STROP_SERVICE_URL=settings.service_url,
        STROP_MAX_N=str(settings.max_n),
        STROP_LOG_LEVEL="INFO",
        **{f"STROP_{k.upper()}": str(getattr(settings, k)) for k in WORKER},
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`strop <args>` in a session of its own, so its pool children stop with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ask(url: str, text: str) -> None:
    """One user request, which the service logs."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    client.chat.completions.create(
        model="strop", messages=[{"role": "user", "content": text}], max_tokens=1
    )


def test_build_refused_key_dead_lettered_then_requeued_and_built_by_service_env_worker(
    service, worker_settings, r, tmp_path
):
    s = worker_settings.model_copy(update={"n_votes": 15, "n_train": 15})
    keys, dead = Keys(s.redis_prefix), dead_letter_key(s.redis_prefix)
    ask(service.url, "Pick: 1 or 2?")
    assert wait_until(lambda: r.xlen(keys.prompt_log) == 1, timeout=10)
    log_id = r.xrange(keys.prompt_log)[0][0]

    # a worker with a key the service does not know: ingest takes the prompt, build gets 401
    wrong = create_app(s.model_copy(update={"service_api_key": "sk-not-a-key"}))
    try:
        with start_worker(wrong, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            wrong.send_task("worker.ingest_prompts", queue=INGEST_QUEUE)
            assert wait_until(lambda: r.xlen(dead) == 1, timeout=60)
    finally:
        release_contexts(wrong)
        wrong.close()
    entry = r.xrange(dead)[0][1]
    assert entry["log_id"] == log_id and entry["reason"] == "unauthorized"
    assert entry["detail"].startswith("401")
    assert r.xlen(keys.groups) == 0

    # the prompt is not lost: requeued, a worker started with the service's own environment
    # (STROP_API_KEYS, no STROP_SERVICE_API_KEY) builds it
    env = cli_env(s, STROP_API_KEYS=f"{API_KEY},sk-another-user")
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "requeue"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "1 dead-lettered builds requeued" in out.stdout
    assert r.xlen(dead) == 0 and queue_length(r, s.redis_prefix) == 1

    log = tmp_path / "worker.log"
    worker = start(["worker", "--no-beat", "--concurrency", "1"], env, log)
    marker = keys.built + group_id(log_id, s)
    try:
        assert wait_until(lambda: r.get(marker) is not None, timeout=180), log.read_text()
        assert r.get(marker) == "built", "all 15 answers agreed: p = 2/2^15"
        assert [ScoredGroup.from_stream(f).log_id for _, f in r.xrange(keys.groups)] == [log_id]
        assert r.xlen(dead) == 0
    finally:
        stop(worker)


def test_build_prompt_the_service_refuses_dead_lettered_with_reason(service, ctx, r):
    # a prompt far beyond the service's 512-token context: the service answers 400
    long = "count the words " * 400
    log_id = r.xadd(ctx.keys.prompt_log, log_record(long, prompt_tokens=10))

    assert build_group(ctx, log_id) == "dead:rejected"
    assert build_group(ctx, log_id) == "already:dead:rejected"  # a retry adds nothing

    entries = r.xrange(dead_letter_key(ctx.keys.prefix))
    assert len(entries) == 1
    entry = entries[0][1]
    assert entry["log_id"] == log_id and entry["reason"] == "rejected"
    assert entry["detail"].startswith("400")
    assert entry["group_id"] == group_id(log_id, ctx.settings)


def test_build_unparseable_record_dead_lettered(settings, r):
    ctx = make_context(settings.model_copy(update=WORKER))  # the service is never asked
    log_id = r.xadd(ctx.keys.prompt_log, {"data": '{"messages": "not a record"'})
    try:
        assert build_group(ctx, log_id) == "dead:bad_record"
    finally:
        ctx.redis.close()
        ctx.service.close()

    assert dead_letter_length(r, ctx.keys.prefix) == 1
    assert r.xrange(dead_letter_key(ctx.keys.prefix))[0][1]["reason"] == "bad_record"


def _status_error(cls: type[openai.APIStatusError], status: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://service/v1/chat/completions")
    return cls("refused", response=httpx.Response(status, request=request), body=None)


@pytest.mark.parametrize(
    ("cls", "status", "reason"),
    [
        (openai.AuthenticationError, 401, "unauthorized"),
        (openai.PermissionDeniedError, 403, "forbidden"),
        (openai.BadRequestError, 400, "rejected"),
        (openai.NotFoundError, 404, "rejected"),
        (openai.UnprocessableEntityError, 422, "rejected"),
        (openai.RateLimitError, 429, None),  # retried by Celery
    ],
)
def test_refusal_4xx_dead_lettered_429_retried(cls, status, reason):
    assert refusal(_status_error(cls, status)) == reason


def test_worker_key_refused_at_start_exits_with_one_line(service, worker_settings, tmp_path):
    env = cli_env(worker_settings, STROP_SERVICE_API_KEY="sk-not-a-key")
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "--concurrency", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1, out.stderr
    assert "refuses the worker's key" in errors[0] and "STROP_SERVICE_API_KEY" in errors[0]
    assert "401" in errors[0]


def test_second_worker_metrics_port_taken_service_down_still_starts_and_ingests(
    redis_prefix, r, tmp_path
):
    keys = Keys(redis_prefix)
    with socket.socket() as taken:  # the first worker's metrics port, on this host
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
        env.update(
            STROP_REDIS_URL=REDIS_URL,
            STROP_REDIS_PREFIX=redis_prefix,
            STROP_SERVICE_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
            STROP_HOST="127.0.0.1",
            STROP_WORKER_METRICS_PORT=str(port),
            STROP_INGEST_INTERVAL_S="0.5",
            STROP_LOG_LEVEL="INFO",
        )
        log = tmp_path / "worker.log"
        worker = start(["worker", "--concurrency", "1"], env, log)  # beat embedded: ingest runs

        def ingested() -> bool:
            return r.exists(keys.prompt_log) and any(
                g["name"] == keys.ingest_group for g in r.xinfo_groups(keys.prompt_log)
            )

        try:
            assert wait_until(lambda: worker.poll() is not None or ingested(), timeout=120)
            assert worker.poll() is None, log.read_text()
            text = log.read_text()
            assert f"worker metrics not served on 127.0.0.1:{port}" in text
            assert "does not answer" in text and "starting anyway" in text
            assert "Traceback" not in text
        finally:
            stop(worker)


def test_chat_500_answer_is_service_busy_so_celery_retries_it(settings):
    # A fake service (a stub HTTP server, named as such): the real one cannot be made to
    # answer 500 on demand.
    class Failing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b'{"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    fake = HTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    ctx = make_context(
        settings.model_copy(
            update={**WORKER, "service_url": f"http://127.0.0.1:{fake.server_port}"}
        )
    )
    try:
        with pytest.raises(ServiceBusy):
            _chat(ctx, time.monotonic() + 10, model="strop", messages=[], max_tokens=1)
        assert ServiceBusy in TRANSIENT_ERRORS
    finally:
        fake.shutdown()
        ctx.redis.close()
        ctx.service.close()
