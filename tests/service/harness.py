"""A real uvicorn server in a thread, serving a strop app on a free port."""

import asyncio
import threading
import time
from pathlib import Path

import redis
import uvicorn

from service.app import create_app
from strop.records import AdapterVersion, Keys, PromptLogRecord
from strop.registry import Registry
from strop.settings import Settings
from tests.conftest import REDIS_URL, free_port


class ServerThread:
    def __init__(self, settings: Settings, engine=None):
        self.port = free_port()
        self.settings = settings
        self.app = create_app(settings, engine)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
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


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
