"""The scheduler thread: owns the model, batches sequences, runs commands between steps."""

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import DynamicCache
from transformers.cache_utils import Cache

from service.engines.base import (
    AdapterNotFound,
    ContextTooLong,
    EngineError,
    StreamEnd,
    TokenLogprob,
)
from service.engines.embedded.cache import BatchCache, SlackLayer
from service.engines.embedded.request import Request
from service.engines.embedded.sampling import sample, token_logprobs
from service.engines.embedded.sequence import Sequence
from strop.model import cache_argument

log = logging.getLogger("strop.engine.embedded")

BASE = "__base__"  # PEFT's row name for "no adapter" in a mixed-adapter batch
PREFILL_TOKENS = 1024  # padded prompt tokens prefilled between two decode steps, so a burst
# of long prompts delays the running batch by one bounded prefill (~1-3 s on 2 CPU cores for
# a 135M model), not by all of them; a longer single prompt is still prefilled whole

# --- commands: what the event loop asks of the scheduler thread, through its queue ------


@dataclass(frozen=True)
class Submit:
    """Queue `request`'s choices for admission to the batch."""

    request: Request


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look at the batch again: a request was dropped while it waited."""


@dataclass(frozen=True)
class LoadAdapter:
    """Load PEFT directory `path` as PEFT adapter `name`; settle `done` on `loop` after."""

    name: str
    path: str
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


@dataclass(frozen=True)
class UnloadAdapter:
    """Delete PEFT adapter `name` once no queued or running sequence uses it."""

    name: str


@dataclass(frozen=True)
class Stop:
    """End the thread; what is queued or running fails."""


Command = Submit | Wake | LoadAdapter | UnloadAdapter | Stop


class Scheduler:
    """Owns the model: admits, decodes, retires sequences; changes adapters between steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch_size: int,
        max_context: int,
        stats: dict[str, int],
    ):
        self.model, self.tok = model, tokenizer
        self.max_batch_size, self.max_context, self.stats = max_batch_size, max_context, stats
        self.device = next(model.parameters()).device
        self.eos = _eos_ids(model, tokenizer)
        self.cache_kw = cache_argument(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.pending: deque[Sequence] = deque()  # admitted in order, as the batch has room
        self.active: list[Sequence] = []  # row i of the cache is active[i]
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) True where a cache slot holds a real token
        self.doomed: set[str] = set()  # adapters to delete once no sequence uses them
        self.stopping = False
        self._token_text: dict[int, str] = {}
        self.thread = threading.Thread(target=self._run, name="strop-embedded", daemon=True)

    # --- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._take_commands(block=not (self.active or self.pending))
                    if self.stopping:
                        break
                    self._retire()
                    if self.pending and len(self.active) < self.max_batch_size:
                        self._admit()
                    if self.active:
                        self._step()
                    if self.doomed:
                        self._delete_unused_adapters()
                except Exception as e:  # a bug, not a request's fault: fail what runs, go on
                    log.exception("embedded scheduler error; failing the running batch")
                    self._fail_batch(e)
        self._shut_down()

    def _shut_down(self) -> None:
        """Fail what is queued or running, and answer commands that came too late."""
        closed = EngineError("the engine was closed")
        for s in [*self.active, *self.pending]:
            self._fail(s.req, closed)
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case Submit(request=req):
                    self._fail(req, closed)
                case LoadAdapter(loop=loop, done=done):
                    loop.call_soon_threadsafe(_settle, done, EngineError(str(closed)))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self.commands.get() if block else self.commands.get_nowait()
            while True:
                self._apply(command)
                command = self.commands.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: Command) -> None:
        match command:
            case Submit(request=req):
                if req.adapter != BASE and req.adapter not in self._adapter_names():
                    self._fail(req, AdapterNotFound("the adapter was unloaded"))
                    return
                self.pending.extend(
                    Sequence(req, i, self.device, self.max_context)
                    for i in range(max(1, req.params.n))
                )
            case LoadAdapter(name=name, path=path, loop=loop, done=done):
                try:
                    self._load_adapter(name, path)
                    error = None
                except Exception as e:
                    log.exception("loading adapter %s failed", path)
                    error = EngineError(f"could not load adapter {path}: {e}")
                loop.call_soon_threadsafe(_settle, done, error)
            case UnloadAdapter(name=name):
                self.doomed.add(name)
            case Stop():
                self.stopping = True
            case Wake():
                pass  # it only had to stop waiting on the queue

    # --- admission: prefill new prompts, join their sequences to the batch ------------

    def _admit(self) -> None:
        room = self.max_batch_size - len(self.active)
        new: list[Sequence] = []
        prompts: dict[int, Request] = {}  # one prefill row per prompt, shared by its n sequences
        longest = 0
        while self.pending and len(new) < room:
            req = self.pending[0].req
            if req.id not in prompts:
                width = max(longest, len(req.prompt_ids))
                if prompts and (len(prompts) + 1) * width > PREFILL_TOKENS:
                    break
                prompts[req.id], longest = req, width
            new.append(self.pending.popleft())
        reqs = list(prompts.values())
        row_of = {r.id: i for i, r in enumerate(reqs)}
        rows = [row_of[s.req.id] for s in new]
        try:
            logits, cache, mask = self._prefill(reqs)
            tokens, logprobs = self._sample(logits[rows], new)
        except Exception as e:
            log.exception("prefill failed; failing its %d requests", len(reqs))
            for r in reqs:
                self._fail(r, e)
            return
        self.stats["prefills"] += 1
        self._advance(new, tokens, logprobs)
        keep = [i for i, s in enumerate(new) if s.finish is None and not s.req.dropped]
        if not keep:
            return
        try:
            self._join(cache, mask, [rows[i] for i in keep], [new[i] for i in keep])
        except Exception as e:  # e.g. out of memory; the running batch is left as it was
            log.exception("joining %d sequences to the batch failed", len(keep))
            for i in keep:
                self._fail(new[i].req, e)

    def _prefill(self, reqs: list[Request]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Last-position logits (P, V), the cache and the padding mask (P, L) of the prompts."""
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.bool)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(
            ids, mask, positions, cache, [r.adapter for r in reqs], logits_to_keep=1
        )
        return logits, cache, mask.to(self.device)

    def _join(
        self,
        prefill: DynamicCache,
        prefill_mask: torch.Tensor,
        rows: list[int],
        seqs: list["Sequence"],
    ) -> None:
        """Append `seqs` (rows of a prefill cache) to the batch, left-padding the shorter side."""
        pick = torch.tensor(rows, device=self.device)
        new_mask = prefill_mask.index_select(0, pick)
        old_len = self.mask.shape[1] if self.active else 0
        new_len = new_mask.shape[1]
        width = max(old_len, new_len)
        mask = torch.zeros(
            (len(self.active) + len(seqs), width), dtype=torch.bool, device=self.device
        )
        if self.active:
            mask[: len(self.active), width - old_len :] = self.mask
        mask[len(self.active) :, width - new_len :] = new_mask
        layers = [
            SlackLayer.joined(
                self.cache.layers[i] if self.active else None,
                layer.keys.index_select(0, pick),
                layer.values.index_select(0, pick),
                width,
            )
            for i, layer in enumerate(prefill.layers)
        ]
        self.cache, self.mask = BatchCache(layers), mask
        self.active.extend(seqs)

    # --- decoding ---------------------------------------------------------------------

    def _step(self) -> None:
        seqs = self.active
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs])
        positions = torch.tensor([[s.prompt_len + len(s.token_ids) - 1] for s in seqs])
        mask = torch.cat([self.mask, self.mask.new_ones((len(seqs), 1))], dim=1)
        try:
            logits = self._forward(ids, mask, positions, self.cache, [s.adapter for s in seqs])
            tokens, logprobs = self._sample(logits, seqs)
        except Exception as e:
            # The cache may be half-updated, so the whole batch goes, and only it.
            log.exception("decode step failed; failing its %d sequences", len(seqs))
            self._fail_batch(e)
            return
        self.mask = mask
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(seqs))
        self._advance(seqs, tokens, logprobs)
        self._retire()

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        adapters: list[str],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits (B, V) at the last position, in float32."""
        if isinstance(self.model, PeftModel):
            # Always name every row: without names PEFT applies its active adapter to all.
            kwargs["adapter_names"] = adapters
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self.cache_kw: cache},
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _sample(
        self, logits: torch.Tensor, seqs: list["Sequence"]
    ) -> tuple[list[int], list["TokenLogprob | None"]]:
        """One token per row (greedy, or temperature + top_p with the row's generator)."""
        params = [s.params for s in seqs]
        tokens = sample(logits, [s.generator for s in seqs], params).tolist()
        return tokens, token_logprobs(logits, tokens, params, self.token_text)

    def _advance(
        self, seqs: list["Sequence"], tokens: list[int], logprobs: list["TokenLogprob | None"]
    ) -> None:
        """Give each sequence its token; send what became final to the requests."""
        out: dict[int, tuple[Request, list[Any]]] = {}
        for s, token, lp in zip(seqs, tokens, logprobs, strict=True):
            req = s.req
            if req.dropped:
                continue
            try:
                events = s.add(token, lp, self.tok, self.eos)
            except Exception as e:  # e.g. decoding: this request's problem only
                log.exception("request %d failed while decoding its output", req.id)
                self._fail(req, e)
                continue
            self.stats["tokens"] += 1
            if s.finish is not None:
                req.unfinished -= 1
                req.completion_tokens += len(s.token_ids)
                if req.unfinished == 0:
                    req.done = True
                    events.append(StreamEnd(len(req.prompt_ids), req.completion_tokens))
            if events:
                out.setdefault(req.id, (req, []))[1].extend(events)
        for req, events in out.values():
            if not req.dropped:
                req.push(events)

    def _retire(self) -> None:
        """Drop finished, cancelled and failed sequences from the batch and the queue."""
        if any(s.req.dropped for s in self.pending):
            self.pending = deque(s for s in self.pending if not s.req.dropped)
        keep = [i for i, s in enumerate(self.active) if s.finish is None and not s.req.dropped]
        if len(keep) == len(self.active):
            return
        if not keep:
            self.active, self.cache, self.mask = [], None, None
            return
        pick = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, pick)
        first = int(mask.any(dim=0).int().argmax())  # leading slots now padding in every row
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.select(pick, first)
        self.active = [self.active[i] for i in keep]

    def token_text(self, token: int) -> str:
        """The text of one token on its own, decoded once and remembered."""
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tok.decode([token])
        return text

    # --- failures ---------------------------------------------------------------------

    def _fail(self, req: Request, error: BaseException) -> None:
        """End `req` with `error`; each request gets its own exception object to raise."""
        if req.done:
            return
        req.done = req.dropped = True
        if isinstance(error, (EngineError, AdapterNotFound, ContextTooLong)):
            mine = type(error)(str(error))
        else:
            mine = EngineError(f"generation failed: {error.__class__.__name__}: {error}")
        mine.__cause__ = error
        req.push(mine)

    def _fail_batch(self, error: BaseException) -> None:
        for s in self.active:
            self._fail(s.req, error)
        self.active, self.cache, self.mask = [], None, None

    # --- adapters ---------------------------------------------------------------------

    def _adapter_names(self) -> set[str]:
        return set(self.model.peft_config) if isinstance(self.model, PeftModel) else set()

    def _load_adapter(self, name: str, path: str) -> None:
        if isinstance(self.model, PeftModel):
            try:
                self.model.load_adapter(path, adapter_name=name)
            except Exception:
                if name in self.model.peft_config:  # added before its weights failed to load
                    self.model.delete_adapter(name)
                raise
        else:
            try:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            except Exception:
                # PEFT injects its layers into our base model before it reads the weights;
                # an adapter that does not fit would leave them behind in every later batch.
                _strip_adapter_layers(self.model)
                raise
        self.model.eval()

    def _delete_unused_adapters(self) -> None:
        in_use = {s.adapter for s in self.active} | {s.adapter for s in self.pending}
        for name in self.doomed - in_use:
            self.doomed.discard(name)
            if name not in self._adapter_names():
                continue
            if len(self._adapter_names()) == 1:
                # PEFT cannot run with zero adapters: unwrap to the plain model instead.
                self.model = self.model.unload()
            else:
                if name in self.model.active_adapters:  # hand "active" on first, quietly
                    self.model.set_adapter(next(n for n in self._adapter_names() if n != name))
                self.model.delete_adapter(name)
            log.info("adapter %s unloaded", name)


def _strip_adapter_layers(model: torch.nn.Module) -> None:
    """Put back the plain layers where a failed PEFT load left its own in `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(x) for x in value)
    return ids


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
