"""One choice being generated: its tokens, incremental detokenizing, and stop strings."""

from typing import Any

import torch

from service.engines.base import Choice, Delta, TokenLogprob
from service.engines.embedded.request import Request
from service.engines.embedded.sampling import generator_for


class Sequence:
    """One choice being generated: its tokens, its decoded text and how much of it was sent."""

    def __init__(self, req: Request, index: int, device: torch.device, max_context: int):
        self.req, self.index, self.params = req, index, req.params
        self.adapter = req.adapter
        self.prompt_len = len(req.prompt_ids)
        self.max_new = max(1, min(self.params.max_tokens, max_context - self.prompt_len))
        self.generator: torch.Generator | None = generator_for(self.params, index, device)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.unsent_logprobs: list[TokenLogprob] = []
        # Incremental detokenization: text of token_ids[prefix:read] is already in `text`;
        # decoding from `prefix` keeps the tokenizer's spacing rules right at the seam.
        self.prefix, self.read = 0, 0
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.finish: str | None = None

    def add(self, token: int, logprob: TokenLogprob | None, tok: Any, eos: set[int]) -> list[Any]:
        """Take one sampled token; the events (Delta, Choice) it makes final."""
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.unsent_logprobs.append(logprob)
        before = len(self.text)
        if token in eos:  # its text is not part of the answer
            self._flush(tok, len(self.token_ids) - 1)
            self._stopped(before)
            self.finish = "stop"
        else:
            self._decode(tok)
            full = len(self.token_ids) >= self.max_new
            if full:
                self._flush(tok, len(self.token_ids))
            if self._stopped(before):
                self.finish = "stop"
            elif full:
                self.finish = "length"
        return self._events()

    def _decode(self, tok: Any) -> None:
        done = tok.decode(self.token_ids[self.prefix : self.read], skip_special_tokens=True)
        now = tok.decode(self.token_ids[self.prefix :], skip_special_tokens=True)
        # A token may end inside a multi-byte character: wait for the rest of it.
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.text += now[len(done) :]
            self.prefix, self.read = self.read, len(self.token_ids)

    def _flush(self, tok: Any, end: int) -> None:
        """Decode whatever is left up to token `end`, even a partial character."""
        done = tok.decode(self.token_ids[self.prefix : self.read], skip_special_tokens=True)
        now = tok.decode(self.token_ids[self.prefix : end], skip_special_tokens=True)
        self.text += now[len(done) :]
        self.prefix = self.read = end

    def _stopped(self, before: int) -> bool:
        """Cut `text` at the first stop string; only text from `before` on can complete one."""
        stops = self.params.stop
        if not stops:
            return False
        start = max(0, before - max(len(x) for x in stops) + 1)
        hits = [p for p in (self.text.find(x, start) for x in stops) if p >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _events(self) -> list[Any]:
        end = len(self.text) if self.finish else len(self.text) - _held(self.text, self.params.stop)
        events: list[Any] = []
        piece = self.text[self.sent : end] if end > self.sent else ""
        if self.req.stream and (piece or self.finish):
            lps = self.unsent_logprobs if self.params.logprobs else None
            events.append(Delta(self.index, piece, lps, self.finish))
            self.unsent_logprobs = []
        self.sent = max(self.sent, end)
        if self.finish and not self.req.stream:
            events.append(
                Choice(
                    self.index,
                    self.text,
                    self.finish,
                    self.token_ids,
                    self.logprobs if self.params.logprobs else None,
                )
            )
        return events


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may begin a stop string, so not sendable yet."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
