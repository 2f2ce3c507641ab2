"""`strop up` run as a user runs it: it starts its own redis-server when none answers, then
the service, worker and learner; SIGTERM stops every process it started; a child that dies
is restarted once, and a second death stops the whole stack.

Each run uses the tiny model and a private Redis port, so nothing is shared with other
tests; the processes are real, and so are the signals.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from ops import up
from strop.records import Keys
from strop.settings import Settings
from tests.conftest import MODEL_CACHE, free_port


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc), Celery's pool processes included."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for c in map(int, children):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Up:
    """A `strop up` process whose output lines are collected as they come."""

    def __init__(
        self, tmp_path: Path, tiny_model_dir: Path, args: tuple = (), env: dict | None = None
    ):
        self.redis_url = f"redis://127.0.0.1:{free_port()}/0"
        self.port = free_port()
        env = {
            **os.environ,
            "STROP_MODEL": str(tiny_model_dir),
            "STROP_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "STROP_REDIS_URL": self.redis_url,
            "STROP_PORT": str(self.port),
            "STROP_API_KEYS": "",
            "STROP_WORKER_METRICS_PORT": "0",
            "STROP_LEARNER_METRICS_PORT": "0",
            "STROP_MAX_CONTEXT": "512",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "up", *args],
            env=env,
            cwd=tmp_path,  # `strop up` keeps its redis data in ./data/redis
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:  # exited: only the reader's last lines may come
                deadline = min(deadline, time.time() + 1)
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in:\n{self.output()}")

    def learner_pid(self, not_pid: int | None = None, timeout: float = 120) -> int:
        """The pid the learner writes to its state in Redis once it is ready."""
        deadline = time.time() + timeout
        with redis.Redis.from_url(self.redis_url, decode_responses=True) as r:
            while time.time() < deadline:
                try:
                    pid = r.hget(Keys("strop:").learner_state, "pid")
                except redis.ConnectionError:
                    pid = None
                if pid and int(pid) != not_pid and _alive(int(pid)):
                    return int(pid)
                time.sleep(0.2)
        raise AssertionError(f"the learner never reported a pid:\n{self.output()}")

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the service never became healthy:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    stacks: list[Up] = []

    def start(**kw) -> Up:
        s = Up(tmp_path, tiny_model_dir, **kw)
        stacks.append(s)
        return s

    yield start
    for s in stacks:
        s.kill()


@pytest.mark.slow
def test_up_starts_redis_and_every_part_then_sigterm_stops_them_all(stack, tmp_path):
    s = stack()
    s.wait_for("started redis-server at " + s.redis_url)
    s.wait_healthy()
    s.learner_pid()
    s.wait_for("worker: service")
    processes = _descendants(s.proc.pid)
    # redis-server, service, worker (+ its pool processes), learner
    assert len(processes) >= 4, s.output()
    assert (tmp_path / "data" / "redis").is_dir()
    for name in ("service |", "worker |", "learner |", "redis |"):
        assert any(line.lstrip().startswith(name) for line in s.lines), name

    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0, s.output()
    s.wait_for("stopped")
    assert [p for p in processes if _alive(p)] == []


@pytest.mark.slow
def test_up_child_killed_is_restarted_once_then_a_second_death_stops_the_stack(stack):
    s = stack()
    s.wait_healthy()
    first = s.learner_pid()
    os.kill(first, signal.SIGKILL)
    s.wait_for(f"learner exited with code -{signal.SIGKILL.value}; restarting it once")
    second = s.learner_pid(not_pid=first)
    s.wait_healthy()  # the rest kept running

    processes = _descendants(s.proc.pid)
    os.kill(second, signal.SIGKILL)
    s.wait_for("learner exited again")
    assert s.proc.wait(60) == 1, s.output()
    s.wait_for("stopped")
    assert [p for p in processes if _alive(p)] == []  # no half-running stack is left


def test_ensure_redis_remote_url_not_answering_names_the_setting():
    with pytest.raises(up.UpError, match="STROP_REDIS_URL"):
        up.ensure_redis("redis://192.0.2.1:6379/0")  # TEST-NET-1: nothing answers there


def test_ensure_redis_without_redis_server_says_how_to_install(monkeypatch):
    # Mock: uninstalling redis-server would break every other test; hide it from PATH lookup.
    monkeypatch.setattr(up.shutil, "which", lambda name: None)
    with pytest.raises(up.UpError, match="apt-get install redis-server"):
        up.ensure_redis(f"redis://127.0.0.1:{free_port()}/0")


def test_up_engine_vllm_without_vllm_says_how_to_install_and_starts_nothing(stack, tmp_path):
    # strop's own venv really lacks vLLM (it needs a venv of its own)
    assert importlib.util.find_spec("vllm") is None
    s = stack(args=("--engine", "vllm"), env={"STROP_VLLM_PYTHON": sys.executable})
    assert s.proc.wait(120) == 2
    s.wait_for("bash scripts/vllm-venv")
    assert len(s.lines) == 1, s.output()
    assert s.lines[0].startswith(f"strop: vLLM is not installed for {sys.executable}")
    assert not (tmp_path / "data").exists()  # no redis-server was started
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(s.redis_url, socket_connect_timeout=1).ping()


@pytest.mark.slow
def test_up_engine_vllm_serves_chat_through_vllm_then_stops_it(stack):
    python = Settings().vllm_python
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    installed = python.exists() and subprocess.run([python, "-c", probe]).returncode == 0
    assert installed, f"no vLLM at {python}: run `bash scripts/vllm-venv` first (CI's set-up does)"
    vllm_url = f"http://127.0.0.1:{free_port()}"
    s = stack(
        args=("--engine", "vllm"),
        env={"STROP_MODEL": "smollm2", "STROP_ENGINE_URL": vllm_url},
    )
    s.wait_for(f"vllm serving at {vllm_url}", timeout=up.VLLM_READY_S)
    s.wait_healthy()
    health = httpx.get(f"http://127.0.0.1:{s.port}/health").json()
    assert health["engine"]["url"] == vllm_url and health["engine"]["ok"], health

    kw = dict(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    via_strop = openai.OpenAI(
        base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0
    ).chat.completions.create(model="strop", **kw)
    direct = openai.OpenAI(
        base_url=vllm_url + "/v1", api_key="unused", max_retries=0
    ).chat.completions.create(model="base", **kw)
    assert via_strop.choices[0].message.content
    assert via_strop.choices[0].message.content == direct.choices[0].message.content

    processes = _descendants(s.proc.pid)  # vLLM's own engine process included
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(120) == 0, s.output()
    assert [p for p in processes if _alive(p)] == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(vllm_url + "/health", timeout=2)


def test_up_child_that_ignores_sigterm_is_killed_with_the_processes_it_started(tmp_path):
    # A Celery worker busy with a long build outlives the grace period; killing only its
    # main process used to leave its pool children running, orphaned.
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(600)\n"
    )
    child = up.Child("worker", [sys.executable, "-c", script], dict(os.environ))
    child.start()
    deadline = time.time() + 30
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    child.stop()
    child.wait_stopped(time.time() + 1.0)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as f:  # a zombie awaiting its reaper is gone too
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        raise AssertionError("the child's own child outlived `strop up`")
