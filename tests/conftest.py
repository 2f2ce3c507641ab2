"""Shared fixtures: a real Redis with a fresh key prefix per test, and the test models."""

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

REDIS_URL = os.environ.get("STROP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL_CACHE = Path(
    os.environ.get("STROP_MODEL_CACHE_DIR", Path.home() / ".cache" / "strop" / "models")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_prefix():
    """A fresh key prefix; every key under it is deleted after the test."""
    prefix = f"strop-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def redis_client():
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield r
    r.close()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from strop.model import default_model_dir as convert

    return convert(MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir) -> Path:
    """A tiny random Llama with the real tokenizer: fast, and its output is gibberish."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(MODEL_CACHE / "tiny-test", MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """One embedded engine on the tiny model, shared by the servers of many tests."""
    from service.engines.embedded import EmbeddedEngine
    from tests.service.harness import start_engine

    return start_engine(
        EmbeddedEngine(
            str(tiny_model_dir), MODEL_CACHE, device="cpu", max_batch_size=16, max_context=512
        )
    )


@pytest.fixture(scope="session")
def vllm_session(default_model_dir):
    """One real vLLM on the default model for the whole session (it takes minutes to start):
    adapters up to rank 16, at most 4 of them (the promoted version and 3 others)."""
    from strop.settings import Settings
    from tests.vllm import VLLMServer

    sized = Settings(max_context=1024, lora_rank=16, adapters_keep_loaded=3, engine_api_key=None)
    server = VLLMServer(default_model_dir, sized).start()
    yield server
    server.kill()


@pytest.fixture
def vllm(vllm_session):
    """The session's vLLM, answering and holding no adapters (a test before may have killed
    it, or left adapters whose names the next test reuses for other weights)."""
    if not vllm_session.healthy():
        vllm_session.kill()
        vllm_session.start()
    vllm_session.clear()
    return vllm_session


class RedisServer:
    """A private redis-server on its own port, which a test may stop and start again."""

    persistence = ["--save", "", "--appendonly", "no"]  # nothing on disk: a restart is empty

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.persistence,
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
