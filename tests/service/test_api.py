"""The chat API through the official openai client against a real uvicorn server and Redis."""

import json
import time

import httpx
import openai
import pytest

from strop.records import Keys, PromptLogRecord
from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread, wait_for

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def server(settings, tiny_engine):
    with ServerThread(settings, tiny_engine) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def log_records(redis_client, settings) -> list[PromptLogRecord]:
    entries = redis_client.xrange(Keys(settings.redis_prefix).prompt_log)
    return [PromptLogRecord.model_validate_json(fields["data"]) for _, fields in entries]


# --- answers ----------------------------------------------------------------------------


def test_chat_non_streaming_returns_completion_and_usage(client):
    r = client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=8, seed=1)
    assert r.object == "chat.completion"
    assert r.model == "base"  # nothing promoted yet
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_max_tokens_reached_finish_reason_length(client):
    r = client.chat.completions.create(
        model="base", messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    # The tiny random model almost never emits EOS in 3 tokens; if it did, the reason is stop.
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) in (("length", 3),) or r.choices[
        0
    ].finish_reason == "stop"


def test_chat_streaming_matches_non_streaming_and_ends_with_usage(client):
    kwargs = dict(model="strop", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert all(c.model == "base" for c in chunks)


def test_chat_stream_raw_sse_ends_with_done(server):
    body = {"model": "strop", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_n4_returns_four_choices(client):
    r = client.chat.completions.create(
        model="strop", messages=MESSAGES, n=4, max_tokens=6, temperature=1.0, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in r.choices}) > 1  # sampled, not copies


def test_chat_seed_repeats_same_text(client):
    kw = dict(model="strop", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=42)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_logprobs_cover_each_completion_token(client):
    r = client.chat.completions.create(
        model="strop", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)


def test_chat_stop_string_cuts_text(client):
    free = (
        client.chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=20, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert len(free) > 4
    stop = free[3:5]
    cut = client.chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


# --- model names ------------------------------------------------------------------------


def test_models_lists_strop_base_and_versions_on_disk(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["strop", "base"]
    assert "strop@v1" in ids and "strop@v2" in ids


def test_chat_pinned_version_names_it_and_differs_from_base(client):
    kw = dict(messages=MESSAGES, max_tokens=12, temperature=0)
    pinned = client.chat.completions.create(model="strop@v1", **kw)
    base = client.chat.completions.create(model="base", **kw)
    assert pinned.model == "strop@v1" and base.model == "base"
    assert pinned.choices[0].message.content != base.choices[0].message.content


def test_chat_strop_follows_promoted_pointer(client, server, redis_client, settings):
    keys = Keys(settings.redis_prefix)
    redis_client.set(keys.promoted, "v2")
    redis_client.publish(keys.events_channel, "promoted v2")
    assert wait_for(lambda: server.service.versions.promoted == "v2")
    r = client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
    assert r.model == "strop@v2"
    strop_card = next(m for m in client.models.list().data if m.id == "strop")
    assert strop_card.model_extra["version"] == "v2"


@pytest.mark.parametrize("model", ["strop@v9", "gpt-4", "strop@latest"])
def test_chat_unknown_model_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
        ),
    ],
)
def test_chat_invalid_parameter_is_400_with_param(client, server, overrides, param):
    body = {"model": "strop", "messages": MESSAGES, "max_tokens": 4, **overrides}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    err = e.value.body
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_chat_prompt_longer_than_context_is_400(client):
    long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="strop", messages=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "512" in e.value.body["message"]


def test_chat_malformed_json_is_400_envelope(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b'{"model": "strop", "messages": [',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("key, status", [(None, 401), ("sk-wrong", 401)])
def test_chat_missing_or_wrong_key_is_401(server, key, status):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        headers=headers,
        json={"model": "strop", "messages": MESSAGES},
    )
    assert r.status_code == status
    assert r.json()["error"]["type"] == "authentication_error"


def test_admin_endpoint_with_user_key_is_403(server):
    r = httpx.post(
        server.url + "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": "/tmp"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_errors_leave_service_healthy(client, server):
    for bad in ({"temperature": -1}, {"n": 100}, {"messages": []}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "strop", "messages": MESSAGES, **bad})
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=2).choices


# --- admin adapters ---------------------------------------------------------------------


def test_load_and_unload_lora_adapter_by_name(client, server, adapter_root):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(
        server.url + "/v1/load_lora_adapter",
        headers=admin,
        json={"lora_name": "ext-a", "lora_path": str(adapter_root / "v1")},
    )
    assert r.status_code == 200, r.text
    assert "ext-a" in [m.id for m in client.models.list().data]
    assert (
        client.chat.completions.create(model="ext-a", messages=MESSAGES, max_tokens=3).model
        == "ext-a"
    )
    r = httpx.post(
        server.url + "/v1/unload_lora_adapter", headers=admin, json={"lora_name": "ext-a"}
    )
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ext-a", messages=MESSAGES, max_tokens=3)


def test_load_lora_adapter_bad_path_is_400(server):
    r = httpx.post(
        server.url + "/v1/load_lora_adapter",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"lora_name": "nope", "lora_path": "/does/not/exist"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed"


# --- ops --------------------------------------------------------------------------------


def test_health_reports_engine_and_redis(server):
    body = httpx.get(server.url + "/health").json()
    assert body["engine"]["ok"] is True and body["redis"]["ok"] is True
    assert body["status"] == "ok"


def test_metrics_count_requests_and_tokens(client, server):
    r = client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    assert 'strop_requests_total{status="200",version="base"} 1.0' in text
    assert f"strop_completion_tokens_total {float(r.usage.completion_tokens)}" in text
    assert (
        "strop_log_writes" in text and "strop_log_drops" in text and "strop_adapters_loaded" in text
    )


# --- the prompt log ---------------------------------------------------------------------


def test_prompt_log_record_holds_request_and_response(client, redis_client, settings):
    r = client.chat.completions.create(
        model="strop",
        messages=MESSAGES,
        max_tokens=5,
        n=2,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=["\n\n"],
    )
    assert wait_for(lambda: len(log_records(redis_client, settings)) == 1)
    rec = log_records(redis_client, settings)[0]
    assert rec.request_id == r.id
    assert rec.messages == MESSAGES
    assert rec.responses == [c.message.content for c in r.choices]
    assert rec.sampling.n == 2 and rec.sampling.temperature == 0.7 and rec.sampling.top_p == 0.9
    assert rec.sampling.seed == 3 and rec.sampling.stop == ["\n\n"] and rec.sampling.max_tokens == 5
    assert rec.model == "strop" and rec.version == "base"
    assert rec.prompt_tokens == r.usage.prompt_tokens
    assert rec.completion_tokens == r.usage.completion_tokens
    assert rec.latency_ms > 0
    assert rec.key_id.startswith("key-")
    raw = json.dumps(redis_client.xrange(Keys(settings.redis_prefix).prompt_log))
    assert API_KEY not in raw  # the key itself is never logged


def test_prompt_log_stream_request_is_logged_with_text(client, redis_client, settings):
    chunks = list(
        client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=5, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert wait_for(lambda: len(log_records(redis_client, settings)) == 1)
    rec = log_records(redis_client, settings)[0]
    assert rec.stream and rec.responses == [text]


@pytest.mark.parametrize("how", ["header", "metadata", "internal"])
def test_prompt_log_opt_out_is_not_logged(client, redis_client, settings, how):
    kwargs = dict(model="strop", messages=MESSAGES, max_tokens=3)
    if how == "header":
        kwargs["extra_headers"] = {"X-Strop-No-Log": "1"}
    elif how == "metadata":
        kwargs["metadata"] = {"strop_log": "false"}
    else:
        kwargs["extra_headers"] = {"X-Strop-Internal": "1"}
    client.chat.completions.create(**kwargs)
    client.chat.completions.create(
        model="strop", messages=[{"role": "user", "content": "marker"}], max_tokens=3
    )  # a logged one, to know the writer has caught up
    assert wait_for(lambda: len(log_records(redis_client, settings)) >= 1)
    time.sleep(0.2)
    recs = log_records(redis_client, settings)
    assert [r.messages[0]["content"] for r in recs] == ["marker"]


def test_adapter_load_unload_never_fails_requests_in_flight(client, server, adapter_root):
    import threading

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def admin_post(path: str, body: dict) -> None:
        r = httpx.post(server.url + path, headers=admin, json=body, timeout=60)
        assert r.status_code == 200, r.text

    admin_post(
        "/v1/load_lora_adapter", {"lora_name": "ext-b", "lora_path": str(adapter_root / "v2")}
    )
    errors: list[Exception] = []
    served: list[str] = []

    def ask(model: str, times: int, max_tokens: int) -> None:
        for _ in range(times):
            try:
                r = client.chat.completions.create(
                    model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0
                )
                served.append(r.model)
            except Exception as e:  # collected: the assertion below names them
                errors.append(e)

    long_one = threading.Thread(target=ask, args=("ext-b", 1, 64))
    others = [
        threading.Thread(target=ask, args=(m, 4, 12)) for m in ("strop@v1", "base", "strop@v2")
    ]
    long_one.start()
    for t in others:
        t.start()
    time.sleep(0.1)
    admin_post("/v1/unload_lora_adapter", {"lora_name": "ext-b"})  # while its request runs
    for _ in range(3):  # churn while the others run
        admin_post(
            "/v1/load_lora_adapter", {"lora_name": "ext-c", "lora_path": str(adapter_root / "v1")}
        )
        admin_post("/v1/unload_lora_adapter", {"lora_name": "ext-c"})
    for t in [long_one, *others]:
        t.join(120)
    assert errors == []
    assert sorted(set(served)) == ["base", "ext-b", "strop@v1", "strop@v2"]
    assert len(served) == 13
