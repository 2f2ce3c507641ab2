"""Several remote engines (vLLM replicas) behind one engine.

An adapter counts as loaded once every replica in rotation has it: if one refuses, the
others unload it and the load fails, so `strop` never moves to a version a replica lacks.
Chat goes to the replica in rotation with the fewest requests in flight. A replica that
stops answering is taken out (its requests go to another); a probe brings it back once it
answers and has been given every loaded adapter again.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.engines.base import (
    AdapterNotFound,
    Delta,
    EngineError,
    Generation,
    SamplingParams,
    StreamEnd,
)
from service.engines.remote import RemoteEngine

log = logging.getLogger("strop.engine.replicas")


@dataclass
class Replica:
    engine: RemoteEngine
    up: bool = False  # in rotation: answering, and holding every loaded adapter
    outstanding: int = 0
    served: int = 0


def _unreachable(e: BaseException) -> bool:
    return isinstance(e.__cause__, httpx.TransportError)


class Replicas:
    def __init__(self, engines: list[RemoteEngine], probe_s: float = 1.0):
        self.replicas = [Replica(e) for e in engines]
        self.probe_s = probe_s
        self.adapters: dict[str, str] = {}  # name -> path, on every replica in rotation
        self.max_context = 2048
        self._lock = asyncio.Lock()  # loads, unloads and rejoins one at a time
        self._turn = 0
        self._task: asyncio.Task | None = None

    @property
    def urls(self) -> list[str]:
        return [r.engine.url for r in self.replicas]

    async def start(self) -> None:
        await asyncio.gather(*(r.engine.start() for r in self.replicas))
        self.max_context = min(r.engine.max_context for r in self.replicas)
        await self._probe()
        self._task = asyncio.create_task(self._watch(), name="replicas")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(r.engine.close() for r in self.replicas))

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt (every replica runs the same model)."""
        return self.replicas[0].engine.count_prompt_tokens(messages)

    # --- rotation ---------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                await self._probe()
            except Exception:  # a bug here must not stop replicas coming back
                log.exception("probing the engine replicas failed")

    async def _probe(self) -> None:
        states = await asyncio.gather(*(r.engine.health() for r in self.replicas))
        for r, state in zip(self.replicas, states, strict=True):
            if not state["ok"]:
                self._take_out(r, "not answering")
            elif not r.up:
                await self._rejoin(r)

    async def _rejoin(self, r: Replica) -> None:
        # A restarted vLLM has no adapters, one that was only out of reach may hold stale
        # ones: make it hold exactly ours before it takes traffic.
        async with self._lock:
            try:
                for name in set(r.engine.loaded_adapters()) - set(self.adapters):
                    try:
                        await r.engine.unload_adapter(name)
                    except EngineError as e:
                        if _unreachable(e):
                            raise
                        log.warning("replica %s: stale %s not unloaded: %s", r.engine.url, name, e)
                for name, path in self.adapters.items():
                    await r.engine.load_adapter(name, path)
            except EngineError as e:
                log.warning("replica %s answers but is kept out: %s", r.engine.url, e)
                return
            r.up = True
        log.info("replica %s in rotation (%d adapters)", r.engine.url, len(self.adapters))

    def _take_out(self, r: Replica, why: str) -> None:
        if r.up:
            log.warning("replica %s taken out of rotation: %s", r.engine.url, why)
        r.up = False

    def _pick(self, tried: list[Replica]) -> Replica:
        live = [r for r in self.replicas if r.up and r not in tried]
        if not live:
            raise EngineError("no engine replica is reachable")
        # Rotate the start so that ties do not always go to the first replica.
        self._turn = (self._turn + 1) % len(live)
        live = live[self._turn :] + live[: self._turn]
        return min(live, key=lambda r: r.outstanding)

    # --- chat -------------------------------------------------------------------------

    def _retry(self, r: Replica, e: BaseException, adapter: str | None) -> bool:
        """Whether the request may go to another replica after `e`; takes `r` out if so."""
        if isinstance(e, AdapterNotFound) and adapter in self.adapters:
            self._take_out(r, f"lost adapter {adapter} (restarted?)")
            return True
        if isinstance(e, EngineError) and _unreachable(e):
            self._take_out(r, f"unreachable ({e.__cause__.__class__.__name__})")
            return True
        return False

    async def generate(self, messages, params: SamplingParams, adapter: str | None) -> Generation:
        tried: list[Replica] = []
        while True:
            r = self._pick(tried)
            r.outstanding += 1
            try:
                gen = await r.engine.generate(messages, params, adapter)
            except (EngineError, AdapterNotFound) as e:
                if not self._retry(r, e, adapter):
                    raise
                tried.append(r)
                continue
            finally:
                r.outstanding -= 1
            r.served += 1
            return gen

    async def stream(
        self, messages, params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[Delta | StreamEnd]:
        tried: list[Replica] = []
        while True:
            r = self._pick(tried)
            r.outstanding += 1
            started = False
            try:
                async for item in r.engine.stream(messages, params, adapter):
                    started = True
                    yield item
                r.served += 1
                return
            except (EngineError, AdapterNotFound) as e:
                # Once text went out, another replica cannot continue it.
                if started or not self._retry(r, e, adapter):
                    raise
                tried.append(r)
            finally:
                r.outstanding -= 1

    # --- adapters ---------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load on every replica in rotation, or on none: one refusal unloads the rest."""
        async with self._lock:
            live = [r for r in self.replicas if r.up]
            results = await asyncio.gather(
                *(r.engine.load_adapter(name, path) for r in live), return_exceptions=True
            )
            loaded = [r for r, res in zip(live, results, strict=True) if res is None]
            failed = [(r, res) for r, res in zip(live, results, strict=True) if res is not None]
            refused = None
            for r, err in failed:
                if isinstance(err, EngineError) and _unreachable(err):
                    # Down, not refusing: it gets this adapter when it is back.
                    self._take_out(r, f"unreachable while loading {name}")
                else:
                    refused = refused or (r, err)
            if refused or not loaded:
                undone = await asyncio.gather(
                    *(r.engine.unload_adapter(name) for r in loaded), return_exceptions=True
                )
                for r, res in zip(loaded, undone, strict=True):
                    if res is not None:
                        # It would serve an adapter the others lack: out of rotation until
                        # _rejoin makes it hold exactly ours.
                        self._take_out(r, f"could not unload {name} again: {res}")
                if refused:
                    r, err = refused
                    raise EngineError(f"replica {r.engine.url} refused {name}: {err}") from err
                cause = failed[0][1] if failed else None
                raise EngineError(f"no engine replica is reachable to load {name}") from cause
            self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        async with self._lock:
            self.adapters.pop(name, None)
            live = [r for r in self.replicas if r.up]
            results = await asyncio.gather(
                *(r.engine.unload_adapter(name) for r in live), return_exceptions=True
            )
            for r, res in zip(live, results, strict=True):
                if res is not None:
                    # Out of rotation it is cleaned when it rejoins.
                    self._take_out(r, f"could not unload {name}: {res}")

    def loaded_adapters(self) -> list[str]:
        return sorted(self.adapters)

    async def health(self) -> dict[str, Any]:
        states = await asyncio.gather(*(r.engine.health() for r in self.replicas))
        replicas = [
            {"url": r.engine.url, "ok": r.up and s["ok"], "outstanding": r.outstanding}
            | {"served": r.served}
            for r, s in zip(self.replicas, states, strict=True)
        ]
        return {
            "ok": any(x["ok"] for x in replicas),
            "engine": "remote",
            "url": ",".join(self.urls),
            "model": self.replicas[0].engine.base_name,
            "adapters": self.loaded_adapters(),
            "replicas": replicas,
        }
