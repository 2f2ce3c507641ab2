"""Hot-swapping the promoted version under load, rollback through the admin endpoint, and
promotion through a remote engine (another strop service standing in for vLLM)."""

import time

import httpx
import openai
import pytest

from strop.records import AdapterVersion, Keys
from strop.registry import Registry
from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread, Traffic, make_adapter

MESSAGES = [{"role": "user", "content": "Tell me something."}]
VERSIONS = ["v11", "v12", "v13", "v14"]  # numbers no other test's shared engine uses
SWAP_S = 1.0  # promotion -> `strop` moved: an event, then loading a tiny adapter


@pytest.fixture
def swap_root(tmp_path, tiny_model_dir):
    root = tmp_path / "adapters"
    for i, v in enumerate(VERSIONS):
        make_adapter(root / v, tiny_model_dir, seed=10 + i)
    return root


@pytest.fixture
def registry(redis_client, settings):
    reg = Registry(redis_client, Keys(settings.redis_prefix))
    return reg


def _register(registry: Registry, root, version: str) -> None:
    registry.add(AdapterVersion(version=version, parent="base", path=str(root / version)))


def _wait_served(load: Traffic, model: str, since: float, timeout: float = 30.0) -> float:
    """Seconds from `since` until a request sent after it was answered by `model`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        hits = [done for sent, done, m, _ in list(load.answered) if m == model and sent >= since]
        if hits:
            return min(hits) - since
        time.sleep(0.02)
    raise AssertionError(f"{model} not served within {timeout}s")


def test_hotswap_promotions_under_load_no_failed_request_and_new_version_served(
    settings, tiny_engine, swap_root, registry
):
    settings = settings.model_copy(
        update={"adapter_dir": swap_root, "adapters_keep_loaded": 1, "adapter_poll_s": 0.2}
    )
    promoted_at: dict[str, float] = {}
    swapped_at: dict[str, float] = {}
    with (
        ServerThread(settings, tiny_engine) as server,
        Traffic(server.url, API_KEY, clients=4, models=["strop"], streams=2) as load,
    ):
        _wait_served(load, "base", 0)
        for v in VERSIONS:
            _register(registry, swap_root, v)
            promoted_at[v] = time.time()
            registry.promote(v)
            swapped_at[v] = _wait_promoted(server, v)
            took = swapped_at[v] - promoted_at[v]
            assert took < settings.adapter_poll_s + SWAP_S, f"{v} swapped in {took:.2f}s"
            _wait_served(load, f"strop@{v}", swapped_at[v])
            time.sleep(1.0)  # more requests on this version, and in flight at the next swap
        versions = server.service.versions
        deadline = time.time() + 10  # an adapter still in use is unloaded a little later
        while time.time() < deadline and "strop-v12" in tiny_engine.loaded_adapters():
            time.sleep(0.05)
        loaded = tiny_engine.loaded_adapters()

    assert load.failed == []
    assert len(load.answered) > 20
    # a request sent once `strop` moved, and answered before the next promotion, got
    # exactly the promoted version
    bounds = [*[promoted_at[v] for v in VERSIONS[1:]], float("inf")]
    for v, end in zip(VERSIONS, bounds, strict=True):
        window = [m for sent, done, m, _ in load.answered if sent >= swapped_at[v] and done < end]
        assert window and set(window) == {f"strop@{v}"}, (v, set(window))
    # keep_loaded=1: the promoted version and one before it stay; older ones are unloaded
    assert list(versions.loaded) == ["v13", "v14"]
    assert "strop-v14" in loaded and "strop-v13" in loaded
    assert "strop-v11" not in loaded and "strop-v12" not in loaded
    assert versions.swaps == len(VERSIONS)


def test_rollback_endpoint_admin_moves_strop_back_and_records_event(
    settings, tiny_engine, swap_root, registry
):
    settings = settings.model_copy(update={"adapter_dir": swap_root})
    for v in VERSIONS[:2]:
        _register(registry, swap_root, v)
        registry.promote(v)
    with ServerThread(settings, tiny_engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        url = server.url + "/v1/strop/rollback"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert (
            client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=2).model
            == "strop@v12"
        )

        denied = httpx.post(url, headers={"Authorization": f"Bearer {API_KEY}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "invalid_admin_key"

        r = httpx.post(url, headers=admin)  # no body: back to the previous promoted version
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "strop.rollback", "from": "v12", "to": "v11"}
        # answered only once the swap happened: the very next request is on v11
        assert (
            client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=2).model
            == "strop@v11"
        )

        r = httpx.post(url, headers=admin, json={"version": "base"})
        assert r.json()["to"] == "base"
        assert (
            client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=2).model
            == "base"
        )

        missing = httpx.post(url, headers=admin, json={"version": "v99"})
        assert missing.status_code == 404 and "v99" in missing.json()["error"]["message"]
        bad = httpx.post(url, headers=admin, json={"version": "latest"})
        assert bad.status_code == 400

    assert registry.get("v12").status == "rolled_back"
    events = [(e.kind, e.version, e.previous, e.reason) for e in registry.events()][-2:]
    assert events == [
        ("rolled_back", "v12", "v11", "manual (api)"),
        ("rolled_back", "v11", None, "manual (api)"),
    ]


def test_hotswap_remote_engine_promotion_loads_new_name_on_back_service(
    settings, tiny_engine, swap_root, registry, tmp_path
):
    back_settings = settings.model_copy(
        update={"redis_prefix": settings.redis_prefix + "back:", "adapter_dir": tmp_path / "none"}
    )
    # the front builds its remote engine itself (as `strop serve` does), in its own loop
    front_settings = settings.model_copy(
        update={
            "engine": "remote",
            "engine_url": "",
            "engine_api_key": ADMIN_KEY,
            "adapter_dir": swap_root,
        }
    )
    with ServerThread(back_settings, tiny_engine) as back:
        front_settings.engine_url = back.url
        with ServerThread(front_settings) as front:
            fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
            for v in VERSIONS[:2]:
                _register(registry, swap_root, v)
                registry.promote(v)
                _wait_promoted(front, v)
                r = fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
                assert r.model == f"strop@{v}"
                # the back service (the "vLLM") got it under a fresh per-version name
                assert f"strop-{v}" in back.service.versions.external
        bc = openai.OpenAI(base_url=back.url + "/v1", api_key=API_KEY, max_retries=0)
        names = [m.id for m in bc.models.list().data]
        assert "strop-v11" in names and "strop-v12" in names

        # A restarted front finds strop-v12 still loaded on the back ("already loaded"):
        # that is the same weights under the same name, so it serves it.
        with ServerThread(front_settings) as front:
            _wait_promoted(front, "v12")
            fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
            r = fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
            assert r.model == "strop@v12"


def _wait_promoted(server: ServerThread, version: str, timeout: float = 10.0) -> float:
    """When the server's `strop` moved to `version` (seen from outside, within 5 ms)."""
    deadline = time.time() + timeout
    while time.time() < deadline and server.service.versions.promoted != version:
        time.sleep(0.005)
    assert server.service.versions.promoted == version
    return time.time()
