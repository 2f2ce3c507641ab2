"""Several remote engine replicas behind one strop (STROP_ENGINE_URL with several URLs).

The replicas are real strop services (they speak vLLM's protocol); in the kill test they run
as `strop serve` processes so that one can be SIGKILLed and started again on its port. The
last test runs two real vLLM servers: the session's and one of its own.
"""

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from service.engines.base import EngineError
from service.engines.replicas import Replicas
from strop.settings import Settings
from tests.conftest import MODEL_CACHE, REDIS_URL, free_port
from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread, Traffic, make_adapter, promote
from tests.vllm import VLLMServer

MESSAGES = [{"role": "user", "content": "Tell me something."}]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _adapters_on(url: str) -> set[str]:
    """Adapters a replica holds, as its /v1/models lists them."""
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return {m["id"] for m in r.json()["data"]} & {"strop-v1", "strop-v2"}


def _front_health(front: ServerThread) -> dict:
    return httpx.get(front.url + "/health").json()["engine"]


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def front_settings(settings):
    """Settings of the strop in front; `engine_url` is set by each test."""
    return settings.model_copy(
        update={"engine": "remote", "engine_api_key": ADMIN_KEY, "adapter_poll_s": 30.0}
    )


def _replica_settings(settings, name: str, tmp_path: Path, **update):
    return settings.model_copy(
        update={
            "redis_prefix": settings.redis_prefix + name + ":",
            "adapter_dir": tmp_path / "none",
            **update,
        }
    )


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny model of another width: adapters trained for the tiny model do not fit it."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-model")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_replicas_new_version_loaded_on_every_replica_before_strop_moves(
    settings, front_settings, redis_client, tmp_path
):
    with (
        ServerThread(_replica_settings(settings, "a", tmp_path)) as a,
        ServerThread(_replica_settings(settings, "b", tmp_path)) as b,
    ):
        front_settings.engine_url = f"{a.url},{b.url}"
        with ServerThread(front_settings) as front:
            moved_with: list[set[str]] = []

            def watch() -> None:  # what each replica held the moment `strop` moved
                _wait(lambda: front.service.versions.promoted == "v1", "strop to move")
                moved_with.extend([_adapters_on(a.url), _adapters_on(b.url)])

            watcher = threading.Thread(target=watch)
            watcher.start()
            promote(redis_client, settings.redis_prefix, settings.adapter_dir, "v1")
            watcher.join(60)
            assert moved_with == [{"strop-v1"}, {"strop-v1"}]
            fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
            for _ in range(4):
                r = fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
                assert r.model == "strop@v1"
            served = [x["served"] for x in _front_health(front)["replicas"]]
            assert served == [2, 2]  # least outstanding, ties taken in turn


def test_replicas_one_refusing_keeps_strop_where_it_was_and_the_others_unload(
    settings, front_settings, redis_client, tmp_path, other_model_dir, caplog
):
    b_settings = _replica_settings(settings, "b", tmp_path, model=str(other_model_dir))
    with (
        ServerThread(_replica_settings(settings, "a", tmp_path)) as a,
        ServerThread(b_settings) as b,
    ):
        front_settings.engine_url = f"{a.url},{b.url}"
        with ServerThread(front_settings) as front:
            caplog.set_level(logging.ERROR, logger="strop.versions")
            promote(redis_client, settings.redis_prefix, settings.adapter_dir, "v1")
            # caplog.text, not caplog.records: the handler appends the record before it
            # writes the text (and its traceback), and the front logs from its own thread
            _wait(lambda: "could not switch" in caplog.text, "the front to try v1")
            _wait(lambda: f"replica {b.url} refused strop-v1" in caplog.text, "b's refusal")
            assert front.service.versions.promoted is None
            assert _adapters_on(a.url) == set()  # a loaded it, then unloaded it
            assert _adapters_on(b.url) == set()
            assert _front_health(front)["adapters"] == []
            fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
            r = fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
            assert r.model == "base"


class ReplicaProcess:
    """`strop serve` as its own process, on a port it keeps across restarts."""

    def __init__(self, settings, name: str, tmp_path: Path):
        self.port = free_port()
        self.env = {
            **os.environ,
            "STROP_MODEL": settings.model,
            "STROP_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "STROP_REDIS_URL": REDIS_URL,
            "STROP_REDIS_PREFIX": settings.redis_prefix + name + ":",
            "STROP_ADAPTER_DIR": str(tmp_path / "none"),
            "STROP_API_KEYS": API_KEY,
            "STROP_ADMIN_KEY": ADMIN_KEY,
            "STROP_MAX_CONTEXT": "512",
            "STROP_TORCH_THREADS": "1",
            "STROP_HOST": "127.0.0.1",
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ReplicaProcess":
        cmd = [sys.executable, "-m", "ops.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL)
        _wait(self._healthy, f"replica on {self.port}", timeout=180)
        return self

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, "the replica exited"
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_replicas_one_killed_traffic_goes_to_the_other_and_restarted_it_rejoins_with_versions(
    settings, front_settings, redis_client, tmp_path
):
    a = ReplicaProcess(settings, "a", tmp_path)
    b = ReplicaProcess(settings, "b", tmp_path)
    try:
        a.start(), b.start()
        front_settings.engine_url = f"{a.url},{b.url}"
        promote(redis_client, settings.redis_prefix, settings.adapter_dir, "v1")
        with ServerThread(front_settings) as front:
            _wait(lambda: front.service.versions.promoted == "v1", "strop to serve v1")

            def served() -> list[int]:
                return [x["served"] for x in _front_health(front)["replicas"]]

            with Traffic(front.url, API_KEY, clients=4, models=["strop"]) as traffic:
                _wait(lambda: min(served()) >= 3, "both replicas to serve")
                b.kill()  # mid-traffic: its requests in flight go to a
                _wait(lambda: not _front_health(front)["replicas"][1]["ok"], "b taken out")
                at_kill = served()
                _wait(lambda: served()[0] >= at_kill[0] + 10, "a to take b's share")
                assert served()[1] == at_kill[1]
                assert traffic.failed == []

                b.start()  # same port, no adapters
                _wait(lambda: _front_health(front)["replicas"][1]["ok"], "b back", timeout=30)
                assert _adapters_on(b.url) == {"strop-v1"}  # given before it took traffic
                back = served()[1]
                _wait(lambda: served()[1] >= back + 3, "b to take traffic again")
            assert traffic.failed == [], traffic.failed[:3]
            assert len(traffic.answered) > 20
            assert {m for _, _, m, _ in traffic.answered} == {"strop@v1"}
    finally:
        a.kill()
        b.kill()


@pytest.mark.slow
def test_replicas_two_real_vllm_servers_load_refuse_and_lose_one(
    settings, redis_client, tmp_path, default_model_dir, vllm, caplog
):
    # a: the session's vLLM (rank 16); b accepts rank 8 only, so a rank-16 version is a
    # real refusal by vLLM
    a = vllm
    b = VLLMServer(default_model_dir, Settings(max_context=1024), ("--max-lora-rank", "8"))
    try:
        root = tmp_path / "adapters"
        make_adapter(root / "v1", default_model_dir, rank=8)
        make_adapter(root / "v2", default_model_dir, rank=16)
        b.start()
        front_settings = settings.model_copy(
            update={
                "engine": "remote",
                "engine_url": f"{a.url},{b.url}",
                "model": str(default_model_dir),
                "adapter_dir": root,
                "adapter_poll_s": 30.0,
            }
        )
        with ServerThread(front_settings) as front:
            fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
            promote(redis_client, settings.redis_prefix, root, "v1")
            _wait(lambda: front.service.versions.promoted == "v1", "strop to serve v1")
            for vllm in (a, b):
                assert "strop-v1" in _adapters_on(vllm.url)
            for _ in range(4):
                r = fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
                assert r.model == "strop@v1"
            assert [x["served"] for x in _front_health(front)["replicas"]] == [2, 2]

            caplog.set_level(logging.ERROR, logger="strop.versions")
            promote(redis_client, settings.redis_prefix, root, "v2")
            _wait(
                lambda: any("could not switch" in r.getMessage() for r in caplog.records),
                "the front to try v2",
            )
            assert f"replica {b.url} refused strop-v2" in caplog.text
            assert front.service.versions.promoted == "v1"
            # a unloads it again: at once, or when it rejoins if that unload failed
            _wait(lambda: "strop-v2" not in _adapters_on(a.url), "a to drop strop-v2", 120)
            assert "strop-v1" in _adapters_on(a.url)
            _wait(lambda: _front_health(front)["replicas"][0]["ok"], "a in rotation", 120)

            with Traffic(front.url, API_KEY, clients=2, models=["strop"]) as traffic:
                _wait(lambda: len(traffic.answered) >= 2, "traffic")
                b.kill()
                at_kill = len(traffic.answered)
                _wait(lambda: len(traffic.answered) >= at_kill + 8, "a to answer alone", 300)
            assert traffic.failed == [], traffic.failed[:3]
            assert not _front_health(front)["replicas"][1]["ok"]
    finally:
        b.kill()


class _StubReplica:
    """Stands in for a vLLM replica that loads an adapter but then fails to unload it: a
    failure that no real server here can be made to show on cue (a mock, named as such)."""

    def __init__(self, url: str, refuse_load: bool = False):
        self.url, self.refuse_load, self.refuse_unload = url, refuse_load, True
        self.held: set[str] = set()

    async def load_adapter(self, name: str, path: str) -> None:
        if self.refuse_load:
            raise EngineError(f"{self.url} refuses {name}")
        self.held.add(name)

    async def unload_adapter(self, name: str) -> None:
        if self.refuse_unload:
            raise EngineError(f"{self.url} cannot unload {name} now")
        self.held.discard(name)

    def loaded_adapters(self) -> list[str]:
        return sorted(self.held)


def test_replicas_one_that_cannot_unload_after_a_refusal_leaves_rotation_until_it_rejoins():
    a, b = _StubReplica("http://a"), _StubReplica("http://b", refuse_load=True)
    replicas = Replicas([a, b])  # type: ignore[list-item]
    for r in replicas.replicas:
        r.up = True

    with pytest.raises(EngineError, match="refused strop-v2"):
        asyncio.run(replicas.load_adapter("strop-v2", "/adapters/v2"))
    # a still holds strop-v2, which b lacks: it must not serve until it holds ours only
    assert a.held == {"strop-v2"} and [r.up for r in replicas.replicas] == [False, True]

    a.refuse_unload = False
    asyncio.run(replicas._rejoin(replicas.replicas[0]))
    assert a.held == set() and replicas.replicas[0].up
