"""The remote engine against a real vLLM (the CPU build), with the official `openai` client.

One vLLM serves the whole session (`vllm` fixture, tests/conftest.py); each test puts a strop
service in front of it and compares what strop answers with what vLLM answers directly.
"""

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread, Traffic, make_adapter, promote, wait_for

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
VERSIONS = [f"v{i}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def vllm_adapters(tmp_path_factory, default_model_dir) -> Path:
    """v1..v6: rank-8 adapters of the default model that change its answers; v9: rank 32,
    beyond the `--max-lora-rank 16` the session's vLLM accepts."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    for i, version in enumerate(VERSIONS, start=1):
        make_adapter(root / version, default_model_dir, seed=i, scale=2.0)
    make_adapter(root / "v9", default_model_dir, seed=9, rank=32)
    return root


@pytest.fixture
def front_settings(settings, vllm, default_model_dir, vllm_adapters):
    """strop in front of the session's vLLM; its context is what vLLM reports."""
    return settings.model_copy(
        update={
            "engine": "remote",
            "engine_url": vllm.url,
            "engine_api_key": None,
            "model": str(default_model_dir),
            "adapter_dir": vllm_adapters,
            "max_context": None,
            "adapters_keep_loaded": 3,
            "adapter_poll_s": 0.5,
        }
    )


def clients(front: ServerThread, vllm) -> tuple[openai.OpenAI, openai.OpenAI]:
    """(strop, vLLM direct)."""
    via = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
    direct = openai.OpenAI(base_url=vllm.url + "/v1", api_key="unused", max_retries=0)
    return via, direct


def answers(r) -> list[tuple[str, str]]:
    return [(c.message.content, c.finish_reason) for c in r.choices]


# --- the same answers as vLLM gives directly -----------------------------------------------


def test_vllm_chat_n_stop_seed_and_logprobs_through_strop_match_vllm_direct(front_settings, vllm):
    cases = [
        dict(temperature=0.0, max_tokens=16),
        dict(temperature=0.9, max_tokens=16, seed=7),
        dict(temperature=0.9, max_tokens=12, seed=3, n=3),
        dict(temperature=0.0, max_tokens=48, stop=[","]),
        dict(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=3),
    ]
    with ServerThread(front_settings) as front:
        via, direct = clients(front, vllm)
        for kw in cases:
            a = via.chat.completions.create(model="strop", messages=MESSAGES, top_p=1.0, **kw)
            b = direct.chat.completions.create(model="base", messages=MESSAGES, top_p=1.0, **kw)
            assert a.model == "base"
            assert answers(a) == answers(b), kw
            assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
                b.usage.prompt_tokens,
                b.usage.completion_tokens,
            ), kw
            if kw.get("logprobs"):
                for x, y in zip(
                    a.choices[0].logprobs.content, b.choices[0].logprobs.content, strict=True
                ):
                    assert x.token == y.token
                    assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
                    assert [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]
        # stop: the answer really was cut at the stop string, which is not returned
        cut = via.chat.completions.create(
            model="strop", messages=MESSAGES, temperature=0.0, max_tokens=48, stop=[","]
        )
        assert cut.choices[0].finish_reason == "stop" and "," not in cut.choices[0].message.content


def test_vllm_stream_through_strop_has_vllms_text_a_usage_chunk_and_done(front_settings, vllm):
    body = {"messages": MESSAGES, "temperature": 0.0, "top_p": 1.0, "max_tokens": 16}
    with ServerThread(front_settings) as front:
        _, direct = clients(front, vllm)
        b = direct.chat.completions.create(model="base", **body)
        stream = {**body, "model": "strop", "stream": True}
        stream["stream_options"] = {"include_usage": True}
        with httpx.stream(
            "POST", front.url + "/v1/chat/completions", json=stream, headers=AUTH, timeout=60
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == b.choices[0].message.content
    last = chunks[-1]  # the usage chunk: no choices, the whole request's counts
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == b.usage.completion_tokens
    assert last["usage"]["prompt_tokens"] == b.usage.prompt_tokens
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == b.choices[0].finish_reason


# --- versions: loaded under their own names, served as `strop`, bounded by --max-loras -------


class AdapterWatch:
    """Polls vLLM's adapters while a test runs: the most it ever held at once."""

    def __init__(self, vllm):
        self.vllm, self.most, self.stop = vllm, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(httpx.HTTPError):  # killed on purpose by the test
                self.most = max(self.most, len(self.vllm.adapters()))
            time.sleep(0.02)

    def __enter__(self) -> "AdapterWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def test_vllm_promoted_versions_load_under_their_names_pin_and_never_exceed_max_loras(
    front_settings, vllm, vllm_adapters, redis_client
):
    prefix = front_settings.redis_prefix
    greedy = dict(messages=MESSAGES, temperature=0.0, max_tokens=12)
    with ServerThread(front_settings) as front, AdapterWatch(vllm) as watch:
        via, direct = clients(front, vllm)
        base = via.chat.completions.create(model="strop", **greedy)
        promote(redis_client, prefix, vllm_adapters, "v1")
        assert wait_for(lambda: front.service.versions.promoted == "v1", 30)
        assert vllm.adapters() == {"strop-v1"}
        r = via.chat.completions.create(model="strop", **greedy)
        assert r.model == "strop@v1"
        assert answers(r) == answers(direct.chat.completions.create(model="strop-v1", **greedy))
        assert answers(r) != answers(base)  # the adapter really is in the answer

        promote(redis_client, prefix, vllm_adapters, "v2")
        assert wait_for(lambda: front.service.versions.promoted == "v2", 30)
        r = via.chat.completions.create(model="strop", **greedy)
        pinned = via.chat.completions.create(model="strop@v1", **greedy)
        assert r.model == "strop@v2" and pinned.model == "strop@v1"
        assert answers(pinned) == answers(
            direct.chat.completions.create(model="strop-v1", **greedy)
        )

        for i, version in enumerate(VERSIONS[2:], start=3):
            promote(redis_client, prefix, vllm_adapters, version)
            assert wait_for(lambda v=version: front.service.versions.promoted == v, 30)
            old = f"strop@v{i - 3}" if i > 3 else "strop@v1"
            assert via.chat.completions.create(model=old, **greedy).model == old
        loaded = set(front.service.versions.loaded.values())
        assert vllm.adapters() == loaded  # strop's account is vLLM's
        assert "strop-v6" in loaded and "strop-v1" not in loaded  # the oldest went first
    assert watch.most == 4  # --max-loras 4: reached, never passed


def test_vllm_refusing_a_version_leaves_strop_where_it_was_and_errors_stay_openai_style(
    front_settings, vllm, vllm_adapters, redis_client, caplog
):
    prefix = front_settings.redis_prefix
    with ServerThread(front_settings) as front:
        via, _ = clients(front, vllm)
        promote(redis_client, prefix, vllm_adapters, "v1")
        assert wait_for(lambda: front.service.versions.promoted == "v1", 30)
        caplog.set_level(logging.ERROR, logger="strop.versions")
        promote(redis_client, prefix, vllm_adapters, "v9")  # rank 32 > --max-lora-rank 16
        assert wait_for(lambda: "could not switch" in caplog.text, 30)
        assert front.service.versions.promoted == "v1"
        assert vllm.adapters() == {"strop-v1"}
        r = via.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
        assert r.model == "strop@v1"

        with pytest.raises(openai.APIStatusError) as e:  # pinning it: vLLM refuses again
            via.chat.completions.create(model="strop@v9", messages=MESSAGES, max_tokens=4)
        assert e.value.status_code == 503
        assert "strop-v9" in e.value.body["message"] and "rank" in e.value.body["message"]

        # A request vLLM itself finds invalid comes back as the caller's error, in vLLM's words.
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                list(
                    via.chat.completions.create(
                        model="strop",
                        messages=MESSAGES,
                        max_tokens=4,
                        n=3,
                        temperature=0.0,
                        stream=stream,
                    )
                )
            assert e.value.body["type"] == "invalid_request_error"
            assert "greedy" in e.value.body["message"]  # vLLM: n must be 1 when greedy

        too_long = [{"role": "user", "content": "hello " * 1100}]  # vLLM's context is 1024
        with pytest.raises(openai.BadRequestError) as e:
            via.chat.completions.create(model="strop", messages=too_long, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        assert "1024" in e.value.body["message"]


# --- vLLM going away and coming back ------------------------------------------------------


def test_vllm_killed_and_restarted_under_traffic_strop_reports_it_and_serves_again(
    front_settings, vllm, vllm_adapters, redis_client
):
    front_settings.engine_timeout_s = 30.0
    promote(redis_client, front_settings.redis_prefix, vllm_adapters, "v1")
    with ServerThread(front_settings) as front:
        assert wait_for(lambda: front.service.versions.promoted == "v1", 30)

        def health() -> tuple[int, dict]:
            r = httpx.get(front.url + "/health", timeout=10)
            return r.status_code, r.json()

        with Traffic(front.url, API_KEY, clients=4, models=["strop"], streams=2) as traffic:
            assert wait_for(lambda: len(traffic.answered) >= 4, 60)
            killed = time.time()
            vllm.kill()
            assert wait_for(lambda: health()[0] == 503, 10)
            code, body = health()
            assert body["status"] == "down" and body["engine"]["ok"] is False
            assert body["strop"] == "v1"  # strop still knows what it serves
            time.sleep(3)  # requests meet the dead engine for a while
            vllm.start()  # same port, no adapters: strop must give it v1 again by itself
            back = time.time()
            assert health()[0] == 200
            assert wait_for(
                lambda: sum(sent > back for sent, _, _, _ in traffic.answered) >= 8, 120
            ), traffic.failed[-3:]
        assert vllm.adapters() == {"strop-v1"}
        after = [(m, streamed) for sent, _, m, streamed in traffic.answered if sent > back]
        assert {m for m, _ in after} == {"strop@v1"}
        assert {streamed for _, streamed in after} == {True, False}  # streams came back too
        assert not [f for f in traffic.failed if f[0] > back]
        # a request sent before the kill may fail by it: what counts is when it failed
        outage = [f for f in traffic.failed if f[0] + f[1] >= killed]
        assert len(outage) == len(traffic.failed)  # nothing failed before the kill
        assert outage, "the kill went unnoticed"
        # None hung: each failed at once, or by strop's engine timeout at the latest.
        assert max(took for _, took, _ in outage) < front_settings.engine_timeout_s + 5
        # ... and each as strop's OpenAI-style engine error (a 503, or in-stream once started)
        assert all("engine" in err for _, _, err in outage), outage[:3]


def test_vllm_load_unload_churn_under_16_clients_fails_no_request(
    front_settings, vllm, vllm_adapters, redis_client
):
    prefix = front_settings.redis_prefix
    promote(redis_client, prefix, vllm_adapters, "v1")
    models = ["strop", "base"] + [f"strop@{v}" for v in VERSIONS]
    with ServerThread(front_settings) as front, AdapterWatch(vllm) as watch:
        assert wait_for(lambda: front.service.versions.promoted == "v1", 30)
        with Traffic(front.url, API_KEY, clients=16, models=models, streams=4) as traffic:
            for version in VERSIONS[1:] + ["v1", "v3"]:
                promote(redis_client, prefix, vllm_adapters, version)
                assert wait_for(lambda v=version: front.service.versions.promoted == v, 60)
                time.sleep(2)
        swaps = front.service.versions.swaps
    assert traffic.failed == [], traffic.failed[:3]
    assert len(traffic.answered) >= 32  # two rounds of 16 clients, at the least
    assert {m for _, _, m, _ in traffic.answered} >= {f"strop@{v}" for v in VERSIONS}
    assert swaps == 8
    assert watch.most <= 4
