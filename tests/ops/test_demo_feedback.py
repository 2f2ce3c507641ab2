"""`strop demo --feedback`: the demo tells a real service the true answer of a question it
asked, and goes on with one warning where the service has no feedback endpoint."""

import openai
import pytest
import redis

from ops.cli import build_parser
from ops.demo import FeedbackSender
from strop.records import FeedbackRecord, Keys
from tests.conftest import REDIS_URL
from tests.service.conftest import *  # noqa: F403  (settings, tiny_engine)
from tests.service.conftest import API_KEY
from tests.service.harness import ServerThread


@pytest.fixture
def server(settings, tiny_engine):
    with ServerThread(settings, tiny_engine) as s:
        yield s


def test_demo_feedback_sends_true_answer_on_its_completion(server, settings):
    demo = settings.model_copy(update={"service_url": server.url, "service_api_key": API_KEY})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    rid = client.chat.completions.create(model="strop", messages=messages, max_tokens=3).id
    sender = FeedbackSender(demo)
    try:
        assert sender.send(rid, "4")  # waits out the buffered prompt log's write
    finally:
        sender.close()
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    stored = FeedbackRecord.model_validate_json(
        r.get(Keys(settings.redis_prefix).feedback_of + rid)
    )
    r.close()
    assert (stored.request_id, stored.answer, sender.sent) == (rid, "4", 1)


def test_demo_feedback_service_without_endpoint_warns_once_and_stops(server, settings, capsys):
    # a service whose routes are elsewhere answers a plain 404, as one without the endpoint
    demo = settings.model_copy(
        update={"service_url": server.url + "/elsewhere", "service_api_key": API_KEY}
    )
    sender = FeedbackSender(demo)
    try:
        assert not sender.send("chatcmpl-1", "4")
        assert not sender.send("chatcmpl-2", "5")
    finally:
        sender.close()
    warnings = [x for x in capsys.readouterr().out.splitlines() if "no feedback endpoint" in x]
    assert len(warnings) == 1 and sender.off


def test_demo_feedback_flag_takes_a_share():
    args = build_parser().parse_args(["demo", "--feedback", "0.1"])
    assert args.feedback == 0.1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--feedback", "1.5"])
