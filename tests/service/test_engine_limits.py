"""The engine path stays fair under abuse: long prompts are read off the event loop and
refused with their true size, the engine's queue is bounded (429 + Retry-After), clients
that leave free the engine, and a stream keeps the version its name resolved to.

A real uvicorn server with the tiny model, real Redis, raw HTTP (httpx) as a client sends it.
"""

import contextlib
import json
import threading
import time

import httpx
import pytest
import redis

from strop.records import Keys
from tests.conftest import REDIS_URL
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread, logged, wait_for

OTHER_KEY = "sk-test-other-key"
LONG = 480  # completion tokens that keep the tiny model busy for seconds (context 512)


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def body(**kw) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": "hi"}], **kw}


def chat(server, payload: dict, key: str = API_KEY, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions", json=payload, headers=auth(key), timeout=timeout
    )


def engine_busy(server) -> int:
    """Sequences the engine holds, running or waiting, as /health reports them."""
    h = httpx.get(server.url + "/health", timeout=30).json()["engine"]
    return h["active_sequences"] + h["queued"]


@pytest.fixture
def limits(settings):
    return settings.model_copy(
        update={
            "api_keys": [API_KEY, OTHER_KEY],
            "max_tokens_limit": LONG,
            "max_queued_sequences": 64,
            "max_queued_per_key": 32,
        }
    )


@pytest.fixture
def serve(tiny_engine):
    """Start servers on the shared tiny engine; each is stopped, and the engine idle, after."""
    with contextlib.ExitStack() as stack:
        yield lambda settings: stack.enter_context(ServerThread(settings, tiny_engine))
    # the engine is shared by every server of the session: leave it idle
    s = tiny_engine._scheduler
    assert wait_for(lambda: not s.active and not s.pending), "the engine was left busy"


@pytest.fixture
def server(serve, limits):
    return serve(limits)


# --- long prompts (2b) ------------------------------------------------------------------


def test_chat_prompt_over_context_error_states_its_real_token_count(server, tiny_engine):
    messages = [{"role": "user", "content": "word " * 2000}]
    real = len(
        tiny_engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    r = chat(server, body(messages=messages, max_tokens=4))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert (
        f"you requested {real + 4} tokens ({real} in the messages, 4 in the completion)"
        in (err["message"])
    )


def test_chat_huge_prompt_error_states_a_true_lower_bound_of_its_tokens(server):
    words = 200_000  # " hello" is one token: the prompt has more than 200k tokens
    r = chat(server, body(messages=[{"role": "user", "content": "hello " * words}]))
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    least = int(message.split("(at least ")[1].split(" in the messages")[0])
    assert server.settings.max_context < least <= words


def test_chat_long_prompt_is_read_off_the_event_loop_others_are_served(server):
    # Empty messages: nothing in their content tells their size, so the chat template is
    # rendered (1 MB of text) before the prompt is known to be too long.
    flood = {"model": "base", "messages": [{"role": "user", "content": ""}] * 40_000}
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(r=chat(server, flood)))
    gaps: list[float] = []
    with httpx.Client(base_url=server.url, timeout=60) as probe:
        probe.get("/health")
        started = time.perf_counter()
        sender.start()
        while sender.is_alive():
            t = time.perf_counter()
            probe.get("/health")
            gaps.append(time.perf_counter() - t)
            time.sleep(0.02)
    sender.join()
    took = time.perf_counter() - started
    assert answer["r"].status_code == 400
    assert answer["r"].json()["error"]["code"] == "context_length_exceeded"
    # A blocked loop makes one probe wait for most of the render; on a loaded machine the
    # render's thread still slows every probe a little, so the bound grows with it.
    bound = max(1.0, took / 2)
    assert len(gaps) >= 3 and max(gaps) < bound, (
        f"health probes waited up to {max(gaps):.2f} s of the render's {took:.2f} s"
    )


# --- the engine's queue (4) -------------------------------------------------------------


def test_chat_queue_full_is_429_with_retry_after_per_key_and_overall(serve, limits):
    server = serve(limits.model_copy(update={"max_queued_sequences": 6, "max_queued_per_key": 4}))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        payload = body(n=4, max_tokens=LONG, stream=True)
        with c.stream("POST", "/v1/chat/completions", json=payload, headers=auth()) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: dropping it would close the stream
            next(lines)  # admitted: 4 sequences of API_KEY in the engine
            for key, n, code in [
                (API_KEY, 1, "rate_limit_exceeded"),  # this key holds 4 of its 4
                (OTHER_KEY, 3, "engine_overloaded"),  # 4 + 3 > 6 overall
            ]:
                r = chat(server, body(n=n, max_tokens=2), key=key)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                err = r.json()["error"]
                assert err["code"] == code and set(err) == {"message", "type", "param", "code"}
            assert chat(server, body(n=2, max_tokens=2), key=OTHER_KEY).status_code == 200
            r = c.post("/v1/chat/completions", json=body(max_tokens=2, stream=True), headers=auth())
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # the stream gave its room back when it closed
    assert wait_for(lambda: chat(server, body(n=4, max_tokens=2)).status_code == 200)


# --- clients that leave (4) -------------------------------------------------------------


def test_chat_non_streaming_clients_that_give_up_free_the_engine(server, limits):
    def give_up(key: str) -> None:
        with pytest.raises(httpx.TimeoutException):
            chat(server, body(n=8, max_tokens=LONG), key=key, timeout=0.5)

    quitters = [threading.Thread(target=give_up, args=(k,)) for k in [API_KEY, OTHER_KEY] * 2]
    for t in quitters:
        t.start()
    for t in quitters:
        t.join()
    # 32 sequences of 480 tokens, in batches of 16, would keep the engine busy for long
    assert wait_for(lambda: engine_busy(server) == 0, timeout=3.0), "abandoned work still runs"
    t = time.perf_counter()
    assert chat(server, body(max_tokens=4)).status_code == 200
    assert time.perf_counter() - t < 5.0
    assert wait_for(lambda: len(logged(limits)) == 5)
    cancelled = [r for r in logged(limits) if r.sampling.n == 8]
    assert len(cancelled) == 4
    for rec in cancelled:
        assert rec.finish_reasons == ["cancelled"] * 8 and not rec.stream


def test_chat_streaming_client_that_leaves_frees_the_engine_and_log_says_cancelled(server, limits):
    received = ["", ""]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        payload = body(n=2, max_tokens=LONG, stream=True)
        with c.stream("POST", "/v1/chat/completions", json=payload, headers=auth()) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        received[choice["index"]] += choice["delta"].get("content") or ""
                if all(received):
                    break  # some text of each choice, then the client goes away
    assert wait_for(lambda: engine_busy(server) == 0, timeout=3.0), "abandoned stream still runs"
    assert wait_for(lambda: len(logged(limits)) == 1)
    rec = logged(limits)[0]
    assert rec.stream and rec.finish_reasons == ["cancelled", "cancelled"]
    assert all(kept.startswith(got) for kept, got in zip(rec.responses, received, strict=True))


# --- one version per stream (9b) --------------------------------------------------------


def test_chat_stream_is_served_by_the_version_its_name_resolved_to_across_a_hot_swap(
    server, limits
):
    versions = server.service.versions
    keys = Keys(limits.redis_prefix)
    redis.Redis.from_url(REDIS_URL).set(keys.promoted, "v1")
    assert wait_for(lambda: versions.promoted == "v1")
    resolve = versions._resolve
    swapped = []

    async def resolve_then_swap(model, internal=False):
        # Test hook: a promotion landing right after this request's name was resolved (no
        # real timing can aim at that instant). The promotion itself is the real one.
        found = await resolve(model, internal)
        if not swapped:
            swapped.append(found)
            await versions.redis.set(keys.promoted, "v2")
            await versions.refresh()
        return found

    versions._resolve = resolve_then_swap
    payload = body(model="strop", max_tokens=8, stream=True)
    payload["stream_options"] = {"include_usage": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=payload, headers=auth())
    assert r.status_code == 200
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert swapped[0][0] == "v1" and versions.promoted == "v2"
    assert {c["model"] for c in chunks} == {"strop@v1"}
    assert wait_for(lambda: len(logged(limits)) == 1)
    assert logged(limits)[0].version == "v1"
