"""POST /v1/strop/feedback: a caller rates its own completions, and nothing else.

A real uvicorn server, real Redis; the official `openai` client makes the completions and
httpx posts the feedback, as a user's code would."""

import time

import httpx
import openai
import pytest
import redis

from strop.records import FeedbackRecord, Keys
from tests.conftest import REDIS_URL
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread

OTHER_KEY = "sk-test-other-user-key"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


@pytest.fixture
def server(settings, tiny_engine):
    settings = settings.model_copy(update={"api_keys": [API_KEY, OTHER_KEY]})
    with ServerThread(settings, tiny_engine) as s:
        yield s


@pytest.fixture
def r():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def complete(server, key: str = API_KEY, **kwargs) -> str:
    """A chat completion made with the official client; its id."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=3, **kwargs)
    return reply.id


def wait_for_key(r, name: str, timeout: float = 10.0) -> None:
    """Until the prompt log's writer has written `name` (its writes are buffered)."""
    deadline = time.time() + timeout
    while not r.exists(name):
        assert time.time() < deadline, f"{name} never written"
        time.sleep(0.05)


def rate(server, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = auth(key) if key else {"Content-Type": "application/json"}
    return httpx.post(server.url + "/v1/strop/feedback", json=body, headers=headers, timeout=30)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def stream_records(r, keys: Keys) -> list[FeedbackRecord]:
    return [FeedbackRecord.from_stream(f) for _, f in r.xrange(keys.feedback)]


def test_feedback_round_trip_stores_record_and_stream_entry(server, r):
    keys = Keys(server.settings.redis_prefix)
    rid = complete(server)
    wait_for_key(r, keys.logged + rid)
    # the owner marker lives as long as the completion may be rated, not 15 minutes
    assert r.ttl(keys.logged + rid) > 900

    resp = rate(server, {"id": rid, "thumbs": "up"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "strop.feedback", "id": rid, "choice": 0, "revision": 1}
    stored = FeedbackRecord.model_validate_json(r.get(keys.feedback_of + rid))
    assert (stored.request_id, stored.choice, stored.score, stored.revision) == (rid, 0, 1.0, 1)
    assert stored.version == "base" and stored.key_id.startswith("key-")
    assert stored.answer is None and stored.preferred is None
    assert 0 < r.ttl(keys.feedback_of + rid) <= server.settings.feedback_window_s
    assert stream_records(r, keys) == [stored]

    # thumbs down is -1; score, answer and preferred are kept as sent
    down = complete(server)
    wait_for_key(r, keys.logged + down)
    assert rate(server, {"id": down, "thumbs": "down"}).status_code == 200
    assert FeedbackRecord.model_validate_json(r.get(keys.feedback_of + down)).score == -1.0
    body = {"id": rid, "score": -0.5, "answer": "4", "preferred": "2 + 2 = 4."}
    assert rate(server, body).status_code == 200
    latest = FeedbackRecord.model_validate_json(r.get(keys.feedback_of + rid))
    assert (latest.score, latest.answer, latest.preferred) == (-0.5, "4", "2 + 2 = 4.")


def test_feedback_repeated_replaces_and_counts(server, r):
    keys = Keys(server.settings.redis_prefix)
    rid = complete(server, n=2)
    wait_for_key(r, keys.logged + rid)
    first = rate(server, {"id": rid, "choice": 1, "score": 0.25})
    second = rate(server, {"id": rid, "choice": 1, "answer": "4"})
    assert (first.json()["revision"], second.json()["revision"]) == (1, 2)
    latest = FeedbackRecord.model_validate_json(r.get(keys.feedback_of + rid))
    assert (latest.revision, latest.choice, latest.score, latest.answer) == (2, 1, None, "4")
    assert r.get(keys.feedback_count + rid) == "2"
    entries = stream_records(r, keys)
    assert [e.revision for e in entries] == [1, 2] and entries[-1] == latest
    assert entries[0].score == 0.25


def test_feedback_refuses_bad_values_with_400(server, r):
    keys = Keys(server.settings.redis_prefix)
    rid = complete(server, n=2)
    wait_for_key(r, keys.logged + rid)
    cases = [
        ({"id": rid, "score": 1.5}, "score"),
        ({"id": rid, "score": -1.01}, "score"),
        ({"id": rid, "score": 1, "thumbs": "up"}, "score"),
        ({"id": rid}, "score"),  # no verdict at all
        ({"id": rid, "choice": 0}, "score"),
        ({"id": rid, "thumbs": "sideways"}, "thumbs"),
        ({"id": rid, "thumbs": "up", "choice": 2}, "choice"),  # n was 2
        ({"id": rid, "thumbs": "up", "choice": -1}, "choice"),
        ({"id": rid, "answer": "x" * 1001}, "answer"),
        ({"id": rid, "preferred": "x" * 16_001}, "preferred"),
        ({"id": rid, "answer": "  "}, "answer"),
        ({"id": rid, "thumb": "up"}, "thumb"),  # a misspelt field is not ignored
        ({"score": 1}, "id"),
    ]
    for body, param in cases:
        assert_error(rate(server, body), 400, param)
    assert r.get(keys.feedback_of + rid) is None and not stream_records(r, keys)
    # the longest allowed values pass
    ok = rate(server, {"id": rid, "choice": 1, "answer": "x" * 1000, "preferred": "y" * 16_000})
    assert ok.status_code == 200, ok.text


def test_feedback_refuses_unknown_foreign_and_unlogged_ids(server, r):
    keys = Keys(server.settings.redis_prefix)
    internal = complete(server, extra_headers={"X-Strop-Internal": "1"})
    by_header = complete(server, extra_headers={"X-Strop-No-Log": "1"})
    by_metadata = complete(server, metadata={"strop_log": "false"})
    mine = complete(server)
    theirs = complete(server, key=OTHER_KEY)
    for rid in (mine, theirs):
        wait_for_key(r, keys.logged + rid)
    for rid in (by_header, by_metadata):
        wait_for_key(r, keys.nolog + rid)

    assert_error(rate(server, {"id": mine, "thumbs": "up"}, key=None), 401)
    assert_error(rate(server, {"id": mine, "thumbs": "up"}, key="sk-wrong"), 401)
    unknown = assert_error(rate(server, {"id": "chatcmpl-nope", "thumbs": "up"}), 404, "id")
    # another caller's id reads exactly like an unknown one
    foreign = assert_error(rate(server, {"id": theirs, "thumbs": "up"}), 404, "id")
    assert foreign["message"].replace(theirs, "X") == unknown["message"].replace(
        "chatcmpl-nope", "X"
    )
    assert foreign["code"] == unknown["code"]
    # the worker's own requests are never ratable, and leave no trace to tell
    assert_error(rate(server, {"id": internal, "thumbs": "up"}), 404, "id")
    for rid in (by_header, by_metadata):
        assert_error(rate(server, {"id": rid, "thumbs": "up"}), 409, "id")
        # an opted-out id of another caller is as unknown as any
        assert_error(rate(server, {"id": rid, "thumbs": "up"}, key=OTHER_KEY), 404, "id")
    assert not stream_records(r, keys)
    assert rate(server, {"id": theirs, "thumbs": "up"}, key=OTHER_KEY).status_code == 200


def test_feedback_over_rate_limit_gets_429_with_retry_after(settings, tiny_engine, r):
    settings = settings.model_copy(update={"feedback_rate_limit": 3})
    keys = Keys(settings.redis_prefix)
    with ServerThread(settings, tiny_engine) as server:
        rid = complete(server)
        wait_for_key(r, keys.logged + rid)
        if time.time() % 60 > 50:  # the four requests below must share one minute
            time.sleep(61 - time.time() % 60)
        statuses = [rate(server, {"id": rid, "thumbs": "up"}).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        over = rate(server, {"id": rid, "thumbs": "up"})
        err = assert_error(over, 429)
        assert err["type"] == "rate_limit_error"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        assert r.get(keys.feedback_count + rid) == "3"  # the refused one stored nothing


def test_feedback_redis_down_gets_503_and_opt_out_chat_still_served(
    settings, tiny_engine, private_redis
):
    settings = settings.model_copy(update={"redis_url": private_redis.url})
    with ServerThread(settings, tiny_engine) as server:
        rid = complete(server)
        private_redis.stop()
        # remembering the opt-out must not need Redis
        t = time.perf_counter()
        complete(server, extra_headers={"X-Strop-No-Log": "1"})
        assert time.perf_counter() - t < 1.0
        err = assert_error(rate(server, {"id": rid, "thumbs": "up"}), 503)
        assert err["type"] == "server_error"
