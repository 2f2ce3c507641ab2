"""Message text: the one reading of OpenAI message content the judge and the worker share."""

from judge.messages import message_text


def test_message_text_string_returned_as_is():
    assert message_text("  What is 2+2? ") == "  What is 2+2? "


def test_message_text_parts_joins_text_parts_only():
    content = [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": {"url": "http://x"}},
        {"type": "text", "text": "2+2?"},
        "not a part",
    ]
    assert message_text(content) == "What is 2+2?"


def test_message_text_no_text_returns_empty():
    assert message_text(None) == ""
    assert message_text([]) == ""
    assert message_text(42) == ""
