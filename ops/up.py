"""`strop up`: the whole loop on one machine, without Docker.

Starts (or finds) Redis, with `--engine vllm` a vLLM server on the model, then the service,
a Celery worker with beat, and the learner as child processes with prefixed log lines. Ctrl-C or SIGTERM stops every child; a child that
dies is reported and restarted once, and if it dies again the whole stack stops rather
than run half-way.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from strop.connection import connect
from strop.settings import PROFILES, Settings

STOP_GRACE_S = 15.0  # how long a child gets to stop after SIGTERM before SIGKILL
VLLM_READY_S = 900.0  # vLLM on CPU profiles and warms up for a minute or more
COLORS = {"redis": 31, "service": 32, "worker": 33, "learner": 35, "vllm": 34}


class UpError(RuntimeError):
    """The stack cannot start; the message says what to do."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restarts_left: int = 1
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    def start(self) -> None:
        # A new process group, so Ctrl-C in the terminal reaches only `strop up`, which
        # then stops the children in order.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.started = time.time()
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        prefix = (
            f"\033[{COLORS.get(self.name, 36)}m{self.name:>8} |\033[0m "
            if sys.stdout.isatty()
            else f"{self.name:>8} | "
        )
        for line in proc.stdout:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()

    def wait_stopped(self, deadline: float) -> None:
        if not self.proc:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            # The whole group: a Celery worker killed alone leaves its pool children
            # running, orphaned, on the old Redis prefix.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def say(msg: str) -> None:
    print(f"{'up':>8} | {msg}", flush=True)


def ensure_redis(url: str) -> Child | None:
    """None if Redis answers at `url`; else a local redis-server child started there."""
    try:
        connect(url, timeout=1, connect_timeout=1).ping()
        say(f"using Redis at {url}")
        return None
    except redis.RedisError:
        pass
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise UpError(f"Redis at {url} does not answer; start it or set STROP_REDIS_URL")
    server = shutil.which("redis-server")
    if server is None:
        raise UpError(
            f"no Redis answers at {url} and redis-server is not installed: "
            "install it (Debian/Ubuntu: `apt-get install redis-server`, macOS: "
            "`brew install redis`) or set STROP_REDIS_URL to a running Redis"
        )
    data = os.path.abspath(os.path.join("data", "redis"))
    os.makedirs(data, exist_ok=True)
    child = Child(
        "redis",
        [
            server,
            "--port",
            str(parsed.port or 6379),
            "--bind",
            "127.0.0.1",
            "--dir",
            data,
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        dict(os.environ),
    )
    child.start()
    for _ in range(100):
        try:
            connect(url, timeout=1, connect_timeout=1).ping()
            say(f"started redis-server at {url} (data in {data})")
            return child
        except redis.RedisError:
            time.sleep(0.1)
    raise UpError("redis-server did not start; see its lines above")


def check_vllm(python: Path) -> None:
    """UpError (one line, how to install it) unless `python` can import vLLM."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        ok = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        ok = None
    if ok is None or ok.returncode != 0:
        raise UpError(
            f"vLLM is not installed for {python} (STROP_VLLM_PYTHON): install it with "
            "`bash scripts/vllm-venv` (its own venv, ~/.cache/strop/vllm-venv), or set "
            "STROP_VLLM_PYTHON to a Python that has vLLM"
        )


def vllm_command(settings: Settings, model_dir: str, port: int) -> tuple[list[str], dict]:
    """The argv and environment of a vLLM serving `model_dir` as `base` on 127.0.0.1:`port`,
    with runtime LoRA loading sized for strop's settings."""
    argv = [str(settings.vllm_python), "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--model", model_dir, "--served-model-name", "base"]
    # The CPU build runs float32; on a GPU let vLLM pick the model's own dtype.
    argv += ["--dtype", "auto" if shutil.which("nvidia-smi") else "float32"]
    argv += ["--enable-lora", "--max-lora-rank", str(max(16, settings.lora_rank))]
    # The promoted version and `keep_loaded` others (at least one): the service never holds more.
    argv += ["--max-loras", str(max(2, settings.adapters_keep_loaded + 1))]
    argv += ["--max-model-len", str(settings.max_context or 2048)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    if settings.engine_api_key:
        argv += ["--api-key", settings.engine_api_key]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; its default (4) is a lot for a laptop
    return argv, env


def vllm_child(settings: Settings, model_dir: str) -> Child:
    """vLLM serving `model_dir` as `base` at STROP_ENGINE_URL, with runtime LoRA loading."""
    urls = settings.engine_urls
    parsed = urlparse(urls[0] if urls else "")
    if len(urls) != 1 or parsed.hostname not in ("127.0.0.1", "localhost"):
        raise UpError(
            f"--engine vllm starts one vLLM on this machine: STROP_ENGINE_URL must be one "
            f"http://127.0.0.1:PORT, not {settings.engine_url!r}"
        )
    argv, env = vllm_command(settings, model_dir, parsed.port or 80)
    return Child("vllm", argv, env)


def wait_ready(child: Child, url: str, stopping: threading.Event) -> bool:
    """Wait for /health at `url`; False if asked to stop first, UpError if it died."""
    deadline = time.time() + VLLM_READY_S
    while not stopping.is_set():
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2).status_code == 200:
                say(f"vllm serving at {url}")
                return True
        except httpx.HTTPError:
            pass
        if child.proc.poll() is not None:
            raise UpError(f"vllm exited (code {child.proc.returncode}) before serving; see above")
        if time.time() > deadline:
            raise UpError(f"vllm did not answer at {url} within {VLLM_READY_S:.0f}s")
        stopping.wait(1.0)
    return False


def profile_line(settings: Settings) -> str:
    """The profile chosen and the values it sizes, as the settings hold them (a value given
    by its own STROP_ variable shows as given)."""
    names = ["n_votes", "n_train", "sample_max_tokens", "algorithm", "batch_size"]
    names += ["steps_per_version", "learning_rate"]
    names += [n for n in PROFILES[settings.profile] if n not in names]
    values = ", ".join(f"{n}={getattr(settings, n)}" for n in names)
    return (
        f"profile {settings.profile} (STROP_PROFILE; each value its own STROP_ variable): {values}"
    )


def plan(settings: Settings) -> list[Child]:
    """The service, the worker (with beat) and the learner, sharing these settings."""
    env = dict(os.environ)
    service_url = f"http://127.0.0.1:{settings.port}"
    env.setdefault("STROP_SERVICE_URL", service_url)
    if settings.api_keys and not settings.service_api_key:
        env["STROP_SERVICE_API_KEY"] = settings.api_keys[0]
    env["PYTHONUNBUFFERED"] = "1"
    env["STROP_PROFILE"] = settings.profile  # resolved once: every child sizes alike
    # The service and the learner both run torch; with one thread per core each they
    # oversubscribe a small machine and every step slows several-fold. Split the cores.
    if not settings.torch_threads:
        env["STROP_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    strop = [sys.executable, "-m", "ops.cli"]
    return [
        Child("service", [*strop, "serve"], env),
        Child("worker", [*strop, "worker"], env),
        Child("learner", [*strop, "learner"], env),
    ]


def run(settings: Settings, engine: str = "embedded") -> int:
    """Start everything and supervise it until a signal or a second death; `engine`
    `vllm` serves the model from a vLLM child instead of inside the service."""
    from strop.model import default_model_dir, resolve_model_dir

    if engine == "vllm":
        check_vllm(settings.vllm_python)  # before anything starts
    if settings.model == "smollm2":
        # converted once, before three processes race; vLLM needs the directory too
        model_dir = default_model_dir(settings.model_cache_dir)
    else:
        model_dir = resolve_model_dir(settings.model, settings.model_cache_dir)
    vllm = vllm_child(settings, str(model_dir)) if engine == "vllm" else None
    say(profile_line(settings))
    redis_child = ensure_redis(settings.redis_url)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    try:
        if vllm:
            children.append(vllm)
            vllm.start()
            say(f"starting vllm ({settings.vllm_python}) on {model_dir}")
            if not wait_ready(vllm, settings.engine_urls[0], stopping):
                return 0
        services = plan(settings)
        for child in services:
            if vllm:
                child.env.update(STROP_ENGINE="remote", STROP_ENGINE_URL=settings.engine_urls[0])
            child.start()
        children += services
        return _supervise(settings, children, redis_child, stopping)
    finally:
        say("stopping")
        for child in reversed(children):  # learner, worker, the service, then vllm
            child.stop()
            # vLLM goes last: the service must not see its engine vanish under it.
            if child.name == "service":
                child.wait_stopped(time.time() + STOP_GRACE_S)
        deadline = time.time() + STOP_GRACE_S
        for child in children:
            child.wait_stopped(deadline)
        if redis_child:
            redis_child.stop()
            redis_child.wait_stopped(time.time() + STOP_GRACE_S)
        say("stopped")


def _supervise(
    settings: Settings, children: list[Child], redis_child: Child | None, stopping: threading.Event
) -> int:
    say(f"service on http://127.0.0.1:{settings.port} (dashboard: /dashboard); Ctrl-C stops all")
    code = 0
    while not stopping.wait(0.5):
        for child in children:
            rc = child.proc.poll()
            if rc is None:
                continue
            if child.restarts_left > 0:
                child.restarts_left -= 1
                say(f"{child.name} exited with code {rc}; restarting it once")
                child.start()
            else:
                say(f"{child.name} exited again (code {rc}); stopping the stack")
                stopping.set()
                code = 1
                break
        if redis_child and redis_child.proc.poll() is not None:
            say("redis-server exited; stopping the stack")
            stopping.set()
            code = 1
    return code
