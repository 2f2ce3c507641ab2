"""A real vLLM server for the tests: the CPU build in its own venv (`bash scripts/vllm-venv`),
started with the command line `strop up --engine vllm` uses, on a port it keeps across
restarts, so a test can kill it and bring it back where strop expects it."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from ops.up import check_vllm, vllm_command
from strop.settings import Settings
from tests.conftest import free_port

READY_S = 900.0  # cold start on two contended cores: profiling and warm-up take minutes


class VLLMServer:
    """vLLM serving the model as `base`, runtime LoRA loading on; `extra` flags win."""

    def __init__(self, model_dir: Path, settings: Settings, extra: tuple[str, ...] = ()):
        check_vllm(settings.vllm_python)  # a clear failure, saying how to install it
        self.port = free_port()
        self.argv, self.env = vllm_command(settings, str(model_dir), self.port)
        self.argv += list(extra)  # argparse keeps the last of a repeated flag
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        """Start it and wait until it answers /health."""
        # Its own session: killing the group takes vLLM's engine process down with it.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + READY_S
        while not self.healthy():
            assert self.proc.poll() is None, f"vLLM exited ({self.proc.returncode}) before serving"
            assert time.time() < deadline, f"vLLM did not answer within {READY_S:.0f}s"
            time.sleep(0.5)
        # The first answers are slow (kernels warm up): not the first test's business.
        chat = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        httpx.post(self.url + "/v1/chat/completions", json=chat, timeout=300)
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def adapters(self) -> set[str]:
        """The adapters vLLM holds, as its /v1/models lists them."""
        cards = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        return {c["id"] for c in cards} - {"base"}

    def clear(self) -> None:
        """Unload every adapter: adapter names repeat across tests, their weights do not."""
        for name in self.adapters():
            httpx.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
