"""`strop up`: the whole loop on one machine, without Docker.

Starts (or finds) Redis, then the service, a Celery worker with beat, and the learner as
child processes with prefixed log lines. Ctrl-C or SIGTERM stops every child; a child that
dies is reported and restarted once, and if it dies again the whole stack stops rather
than run half-way.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import redis

from strop.connection import connect
from strop.settings import PROFILES, Settings

STOP_GRACE_S = 15.0  # how long a child gets to stop after SIGTERM before SIGKILL
COLORS = {"redis": 31, "service": 32, "worker": 33, "learner": 35}


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
            self.proc.kill()
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


def run(settings: Settings) -> int:
    """Start everything and supervise it until a signal or a second death."""
    from strop.model import default_model_dir, resolve_model_dir

    if settings.model == "smollm2":
        default_model_dir(settings.model_cache_dir)  # convert once, before three processes race
    else:
        resolve_model_dir(settings.model, settings.model_cache_dir)
    say(profile_line(settings))
    redis_child = ensure_redis(settings.redis_url)
    children = plan(settings)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start()
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
    say("stopping")
    for child in reversed(children):  # learner, worker, then the service
        child.stop()
    deadline = time.time() + STOP_GRACE_S
    for child in children:
        child.wait_stopped(deadline)
    if redis_child:
        redis_child.stop()
        redis_child.wait_stopped(time.time() + STOP_GRACE_S)
    say("stopped")
    return code
