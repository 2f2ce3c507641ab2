"""The remote engine, tested by pointing one strop service at another as its vLLM."""

import openai
import pytest

from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def front(settings, tiny_engine, tmp_path):
    """`back`: an embedded strop (the "vLLM"); `front`: a strop whose engine is `back`."""
    back_settings = settings.model_copy(
        update={"redis_prefix": settings.redis_prefix + "back:", "adapter_dir": tmp_path / "none"}
    )
    with ServerThread(back_settings, tiny_engine) as back:
        # The front builds its remote engine from settings, as `strop serve` would.
        front_settings = settings.model_copy(
            update={"engine": "remote", "engine_url": back.url, "engine_api_key": ADMIN_KEY}
        )
        with ServerThread(front_settings) as front:
            yield front, back


def test_remote_engine_answers_like_the_engine_behind_it(front):
    front, back = front
    fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
    bc = openai.OpenAI(base_url=back.url + "/v1", api_key=API_KEY, max_retries=0)
    kw = dict(messages=MESSAGES, max_tokens=8, temperature=0)
    via_front = fc.chat.completions.create(model="strop", **kw)
    direct = bc.chat.completions.create(model="base", **kw)
    assert via_front.model == "base"
    assert via_front.choices[0].message.content == direct.choices[0].message.content
    assert via_front.usage.completion_tokens == direct.usage.completion_tokens

    n4 = fc.chat.completions.create(
        model="strop", messages=MESSAGES, max_tokens=4, n=4, logprobs=True, top_logprobs=2
    )
    assert len(n4.choices) == 4
    assert all(len(c.logprobs.content) > 0 for c in n4.choices)

    chunks = list(
        fc.chat.completions.create(
            model="strop", stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens


def test_remote_engine_pinned_version_loads_adapter_on_remote(front):
    front, back = front
    fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
    r = fc.chat.completions.create(model="strop@v1", messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.model == "strop@v1"
    # The back service got the adapter under a per-version name, as vLLM would.
    assert "strop-v1" in back.service.versions.external
    bc = openai.OpenAI(base_url=back.url + "/v1", api_key=API_KEY, max_retries=0)
    direct = bc.chat.completions.create(
        model="strop-v1", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert direct.choices[0].message.content == r.choices[0].message.content


def test_remote_engine_down_gives_503_not_crash(settings, tiny_engine):
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with ServerThread(
        settings.model_copy(update={"engine": "remote", "engine_url": dead})
    ) as front:
        fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            fc.chat.completions.create(model="strop", messages=MESSAGES, max_tokens=4)
        assert e.value.status_code == 503
        import httpx

        assert httpx.get(front.url + "/health").json()["engine"]["ok"] is False


def test_remote_engine_that_lost_an_adapter_gets_it_again(front):
    """A restarted vLLM forgets its adapters; the front loads the version again and answers."""
    import httpx

    front, back = front
    fc = openai.OpenAI(base_url=front.url + "/v1", api_key=API_KEY, max_retries=0)
    first = fc.chat.completions.create(
        model="strop@v1", messages=MESSAGES, max_tokens=6, temperature=0
    )
    r = httpx.post(
        back.url + "/v1/unload_lora_adapter",
        json={"lora_name": "strop-v1"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert r.status_code == 200 and "strop-v1" not in back.service.versions.external
    again = fc.chat.completions.create(
        model="strop@v1", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert again.model == "strop@v1"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert "strop-v1" in back.service.versions.external

    # A stream meets the loss before its first byte, so it is mended the same way.
    httpx.post(
        back.url + "/v1/unload_lora_adapter",
        json={"lora_name": "strop-v1"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    chunks = list(
        fc.chat.completions.create(
            model="strop@v1", messages=MESSAGES, max_tokens=6, temperature=0, stream=True
        )
    )
    assert {c.model for c in chunks} == {"strop@v1"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
