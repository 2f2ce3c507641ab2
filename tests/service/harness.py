"""A real uvicorn server in a thread, serving a strop app on a free port."""

import asyncio
import random
import threading
import time
from pathlib import Path

import openai
import redis
import uvicorn

from service.app import KEEP_ALIVE_S, create_app
from strop.records import AdapterVersion, Keys, PromptLogRecord
from strop.registry import Registry
from strop.settings import Settings
from tests.conftest import REDIS_URL, free_port


class ServerThread:
    def __init__(self, settings: Settings, engine=None):
        self.port = free_port()
        self.settings = settings
        self.app = create_app(settings, engine)
        # as `strop serve` runs it
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_engine(engine):
    """Start an engine outside any server, so several servers can share it."""
    asyncio.run(engine.start())
    return engine


def make_adapter(path, model_dir, seed: int = 0, scale: float = 1.0, rank: int = 8):
    """A LoRA adapter on disk whose weights really change the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(path)
    return path


def logged(settings: Settings) -> list[PromptLogRecord]:
    """The prompt-log records under the settings' Redis prefix, oldest first."""
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        entries = r.xrange(Keys(settings.redis_prefix).prompt_log)
    finally:
        r.close()
    return [PromptLogRecord.model_validate_json(f["data"]) for _, f in entries]


def promote(redis_client, prefix: str, root: Path, version: str) -> None:
    """Register `version` (its adapter in `root`) and promote it, as the learner's gate would."""
    registry = Registry(redis_client, Keys(prefix))
    registry.add(AdapterVersion(version=version, parent="base", path=str(root / version)))
    registry.promote(version)


class Traffic:
    """`clients` threads (the first `streams` of them streaming) asking strop for `models`,
    picked at random, until stopped: every answer (when sent and answered, the model that
    served it) and every failure kept."""

    MESSAGES = [{"role": "user", "content": "Tell me something."}]

    def __init__(self, url: str, api_key: str, clients: int, models: list[str], streams: int = 0):
        self.url, self.api_key, self.models = url, api_key, models
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answered: list[tuple[float, float, str, bool]] = []  # (sent, done, model, streamed)
        self.failed: list[tuple[float, float, str]] = []  # (sent, seconds taken, error)
        self.threads = [
            threading.Thread(target=self._run, args=(i < streams,), daemon=True)
            for i in range(clients)
        ]

    def _run(self, stream: bool) -> None:
        client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, timeout=120
        )
        while not self.stop.is_set():
            t0 = time.time()
            model = random.choice(self.models)
            try:
                if stream:
                    chunks = list(
                        client.chat.completions.create(
                            model=model, messages=self.MESSAGES, max_tokens=4, stream=True
                        )
                    )
                    assert chunks[-1].choices[0].finish_reason, "the stream ended early"
                    served = chunks[0].model
                    assert all(c.model == served for c in chunks), "a stream changed model"
                else:
                    r = client.chat.completions.create(
                        model=model, messages=self.MESSAGES, max_tokens=4
                    )
                    served = r.model
                with self.lock:
                    self.answered.append((t0, time.time(), served, stream))
            except Exception as e:  # every failure counts, whatever its kind
                with self.lock:
                    self.failed.append((t0, time.time() - t0, f"{e.__class__.__name__}: {e}"))
                time.sleep(0.2)

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
