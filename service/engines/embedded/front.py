"""The engine's async front: EmbeddedEngine, and the handle of one request in flight."""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from service.engines.base import (
    AdapterNotFound,
    Choice,
    Delta,
    EngineError,
    Generation,
    SamplingParams,
    StreamEnd,
)
from service.engines.embedded.request import Request
from service.engines.embedded.scheduler import (
    BASE,
    LoadAdapter,
    Scheduler,
    Stop,
    Submit,
    UnloadAdapter,
    Wake,
)
from service.engines.prompt import PromptEncoder
from strop.model import load_model, load_tokenizer

log = logging.getLogger("strop.engine.embedded")


class EmbeddedEngine:
    """The Engine of base.py, serving the model (and its LoRA adapters) in this process."""

    def __init__(
        self,
        model_name: str,
        cache_dir: Path,
        device: str = "auto",
        max_batch_size: int = 32,
        max_context: int | None = None,
    ):
        self.model_name, self.cache_dir, self.device = model_name, Path(cache_dir), device
        self.max_batch_size = max(1, max_batch_size)
        self._max_context = max_context
        self.max_context = max_context or 2048  # the model's own replaces it at start
        self.tokenizer = None
        self._prompts: PromptEncoder | None = None
        self.stats: dict[str, int] = {"max_batch_seen": 0, "steps": 0, "prefills": 0, "tokens": 0}
        self._adapters: dict[str, str] = {}  # served name -> PEFT adapter name
        self._adapter_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._scheduler: Scheduler | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model in a worker thread, then start the scheduler thread."""
        model, tok = await asyncio.to_thread(
            load_model, self.model_name, self.cache_dir, self.device
        )
        # The scheduler decodes with a tokenizer of its own, never waiting on PromptEncoder's lock.
        decoder = await asyncio.to_thread(load_tokenizer, self.model_name, self.cache_dir)
        self.tokenizer = tok
        self._prompts = await asyncio.to_thread(PromptEncoder, tok)
        if self._max_context is None:
            self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._scheduler = Scheduler(
            model, decoder, self.max_batch_size, self.max_context, self.stats
        )
        self._scheduler.thread.start()
        log.info(
            "embedded engine serving %s on %s (batch <= %d, context %d)",
            self.model_name,
            self._scheduler.device,
            self.max_batch_size,
            self.max_context,
        )

    async def close(self) -> None:
        """Stop the scheduler; requests still running fail with EngineError."""
        if self._scheduler is not None:
            self._scheduler.commands.put(Stop())
            await asyncio.to_thread(self._scheduler.thread.join, 30)
            self._scheduler = None

    @property
    def model(self) -> Any:
        """The model as it is now (a PeftModel once an adapter is loaded)."""
        return self._started().model

    # --- prompts ----------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant turn's header;
        ContextTooLong if not even one more token fits. Blocking: see count_prompt_tokens."""
        if self._prompts is None:
            raise EngineError("the embedded engine is not started")
        return self._prompts.ids(messages, self.max_context)

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt; ContextTooLong if not even one more fits.
        Blocking: call it from a worker thread."""
        return len(self.prompt_ids(messages))

    # --- generation -------------------------------------------------------------------

    async def generate(
        self, messages: list[dict[str, Any]], params: SamplingParams, adapter: str | None
    ) -> Generation:
        """All `n` choices, with token ids (and logprobs if asked); cancelling leaves the batch."""
        req = await self._submit(messages, params, adapter, stream=False)
        choices: list[Choice] = []
        try:
            while True:
                for item in await req.receive():
                    if isinstance(item, Choice):
                        choices.append(item)
                    elif isinstance(item, StreamEnd):
                        choices.sort(key=lambda c: c.index)
                        return Generation(choices, item.prompt_tokens, item.completion_tokens)
        finally:
            self._cancel(req)

    async def stream(
        self, messages: list[dict[str, Any]], params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[Delta | StreamEnd]:
        """Deltas as text becomes final (a possible stop string is held back), then StreamEnd."""
        req = await self._submit(messages, params, adapter, stream=True)
        try:
            while True:
                for item in await req.receive():
                    if isinstance(item, Delta):
                        yield item
                    elif isinstance(item, StreamEnd):
                        yield item
                        return
        finally:  # also on aclose() or cancellation: the client went away
            self._cancel(req)

    async def _submit(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        adapter: str | None,
        stream: bool,
    ) -> Request:
        scheduler = self._started()
        # Off the event loop: other clients go on being served while a long prompt is read.
        ids = await asyncio.to_thread(self.prompt_ids, messages)
        peft_name = BASE  # looked up after the wait: the adapter may have been reloaded since
        if adapter is not None:
            if adapter not in self._adapters:
                raise AdapterNotFound(f"adapter {adapter!r} is not loaded")
            peft_name = self._adapters[adapter]
        req = Request(next(self._request_ids), ids, params, peft_name, stream)
        scheduler.commands.put(Submit(req))
        return req

    def _cancel(self, req: Request) -> None:
        if not req.done and self._scheduler is not None:
            req.dropped = True
            self._scheduler.commands.put(Wake())  # it may be waiting on the queue

    # --- adapters ---------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load PEFT directory `path` as `name` between two decode steps; returns once servable."""
        scheduler = self._started()
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterNotFound(f"no PEFT adapter at {path}")
        # A fresh PEFT name per load: served names may hold dots (PEFT's can't), and a
        # reloaded name must not change the weights under requests still using the old.
        peft_name = f"adapter{next(self._adapter_ids)}"
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        scheduler.commands.put(LoadAdapter(peft_name, str(path), loop, done))
        try:
            await done
        except asyncio.CancelledError:
            scheduler.commands.put(UnloadAdapter(peft_name))
            raise
        old = self._adapters.get(name)
        self._adapters[name] = peft_name
        if old is not None:
            scheduler.commands.put(UnloadAdapter(old))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name` now; its weights go once no queued or running sequence uses them."""
        scheduler = self._started()
        peft_name = self._adapters.pop(name, None)
        if peft_name is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        scheduler.commands.put(UnloadAdapter(peft_name))

    def loaded_adapters(self) -> list[str]:
        """Names servable now (one being unloaded is no longer listed)."""
        return sorted(self._adapters)

    async def health(self) -> dict[str, Any]:
        """Whether the scheduler thread runs, and what it holds."""
        s = self._scheduler
        return {
            "ok": s is not None and s.thread.is_alive(),
            "engine": "embedded",
            "model": self.model_name,
            "active_sequences": len(s.active) if s else 0,
            "queued": len(s.pending) if s else 0,
            "adapters": self.loaded_adapters(),
        }

    def _started(self) -> Scheduler:
        if self._scheduler is None:
            raise EngineError("the embedded engine is not started")
        return self._scheduler
