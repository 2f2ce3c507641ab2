"""Chat prompts to token ids: safe from worker threads, and quick to refuse a huge prompt.

Both engines count prompts with the base model's tokenizer before anything is queued.
Rendering and tokenizing a prompt of millions of characters takes seconds, so callers run
this in a worker thread; and a prompt whose length alone proves it cannot fit is refused
from that length, with a lower bound of its tokens, before any of that work is done.
"""

import threading
from typing import Any

from service.engines.base import ContextTooLong


class PromptEncoder:
    """Token ids of chat prompts with one tokenizer, from any thread."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        # A fast tokenizer used by two threads at once can fail with "Already borrowed".
        self._lock = threading.Lock()
        # No token stands for more characters than its own string has (byte-level BPE: one
        # character per byte; SentencePiece: one per character; byte fallback: more), so a
        # text of C characters has at least C / `longest` tokens.
        self.longest = max(map(len, tokenizer.get_vocab()), default=1) or 1

    def ids(self, messages: list[dict[str, Any]], max_context: int) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant turn's header;
        ContextTooLong if not even one more token fits in `max_context`."""
        content = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        self._refuse_beyond(content, max_context)  # before the template: 500k messages cost
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        self._refuse_beyond(len(text), max_context)  # many empty messages make a long text
        # What apply_chat_template(tokenize=True) does, with the tokenizer held only this long.
        with self._lock:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        check_fits(len(ids), max_context)
        return ids

    def _refuse_beyond(self, chars: int, max_context: int) -> None:
        least = -(-chars // self.longest)
        if least + 1 > max_context:
            raise ContextTooLong(
                f"prompt has at least {least} tokens; the context is {max_context}",
                least,
                exact=False,
            )


def check_fits(prompt_tokens: int, max_context: int) -> None:
    """ContextTooLong unless the prompt leaves room for one completion token."""
    if prompt_tokens + 1 > max_context:
        raise ContextTooLong(
            f"prompt has {prompt_tokens} tokens; the context is {max_context}", prompt_tokens
        )
