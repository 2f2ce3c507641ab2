"""Logging never fails a request: a real Redis is stopped and started under the service."""

import time

import httpx
import openai
import redis

from strop.records import Keys, PromptLogRecord
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread


def logged(url: str, key: str) -> list[PromptLogRecord]:
    entries = redis.Redis.from_url(url, decode_responses=True).xrange(key)
    return [PromptLogRecord.model_validate_json(f["data"]) for _, f in entries]


def wait_until(predicate, timeout=10.0) -> None:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)


def test_prompt_log_redis_down_keeps_serving_then_writes_buffer(
    settings, tiny_engine, private_redis
):
    settings = settings.model_copy(update={"redis_url": private_redis.url, "log_buffer_size": 4})
    stream = Keys(settings.redis_prefix).prompt_log
    with ServerThread(settings, tiny_engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        def ask(text: str) -> float:
            t = time.perf_counter()
            r = client.chat.completions.create(
                model="strop", max_tokens=2, messages=[{"role": "user", "content": text}]
            )
            assert r.choices[0].message.content is not None
            return time.perf_counter() - t

        ask("up 0")
        wait_until(lambda: len(logged(private_redis.url, stream)) == 1)
        assert len(logged(private_redis.url, stream)) == 1

        private_redis.stop()
        # Six requests while Redis is down: all answered, none waits on Redis (its connect
        # timeout is 1 s), and the 4-record buffer keeps the newest four.
        slowest = max(ask(f"down {i}") for i in range(6))
        assert slowest < 1.0
        h = httpx.get(server.url + "/health").json()
        assert h["status"] == "degraded" and h["redis"]["ok"] is False and h["engine"]["ok"] is True
        assert h["redis"]["log_buffered"] == 4 and h["redis"]["log_dropped"] == 2
        metrics = httpx.get(server.url + "/metrics").text
        assert 'strop_log_drops_total{reason="buffer_full"} 2.0' in metrics
        assert "strop_redis_up 0.0" in metrics

        private_redis.start()  # same port, empty (no persistence)
        wait_until(lambda: len(logged(private_redis.url, stream)) == 4)
        texts = [r.messages[0]["content"] for r in logged(private_redis.url, stream)]
        assert texts == ["down 2", "down 3", "down 4", "down 5"]
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        ask("up again")
        wait_until(lambda: len(logged(private_redis.url, stream)) == 5)
        assert logged(private_redis.url, stream)[-1].messages[0]["content"] == "up again"
