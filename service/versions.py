"""Which adapter serves which model name, and hot-swapping the promoted version.

Model names: `strop` (the promoted version, or the base model while none is promoted),
`strop@vN` (a version pinned by the caller, loaded on demand from the adapter directory),
`base` (no adapter), and any name loaded through the admin adapter endpoints (so one
strop service can be another's remote engine, as vLLM would be).

A version the learner wrote is *released* once the registry has promoted it (it stays
released after a rollback). Before that (a candidate being gated, or a rejected one) it is
served only to internal requests that pin it (the learner's gate), never listed in
/v1/models and never reached by users. A version put in the adapter directory by hand
(no `strop.json`) has no registry entry and is served to anyone who pins it.

The promoted pointer lives in Redis; the service follows it through the registry's
pub/sub events and a periodic check, so a missed event is caught within `poll_s`.
"""

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.engines.base import Engine, EngineError
from service.protocol import APIError
from strop.adapters import AdapterStore
from strop.records import Keys
from strop.versions import BASE, PINNED_PREFIX, PROMOTED_MODEL, engine_adapter_name, pinned_model

log = logging.getLogger("strop.versions")

RELEASED = ("promoted", "rolled_back")  # registry statuses users may pin


class Versions:
    def __init__(
        self,
        engine: Engine,
        adapter_dir: Path,
        redis: aioredis.Redis,
        keys: Keys,
        keep_loaded: int = 3,
        poll_s: float = 5.0,
    ):
        self.engine, self.store, self.redis, self.keys = (
            engine,
            AdapterStore(adapter_dir),
            redis,
            keys,
        )
        self.keep_loaded, self.poll_s = keep_loaded, poll_s
        self.promoted: str | None = None  # "vN", or None: `strop` is the base model
        self.loaded: OrderedDict[str, str] = OrderedDict()  # version -> adapter name, oldest first
        self.external: set[str] = set()  # adapters loaded through the admin endpoint
        self.in_use: dict[str, int] = {}  # adapter name -> requests holding it
        self.released: set[str] = set()  # learner versions the registry promoted (ever)
        self.swaps = 0
        self._lock = asyncio.Lock()
        self._let_go = asyncio.Event()  # set when a request stops using an adapter
        self._task: asyncio.Task | None = None
        self._stopping = False

    # --- naming -----------------------------------------------------------------------

    def on_disk(self) -> list[str]:
        """Complete versions in the adapter directory, oldest first."""
        return self.store.loadable()

    def model_names(self) -> list[tuple[str, str]]:
        """(model name, version label) pairs for /v1/models."""
        names = [(PROMOTED_MODEL, self.promoted or BASE), (BASE, BASE)]
        names += [(pinned_model(v), v) for v in self.on_disk() if self._public(v)]
        names += [(n, n) for n in sorted(self.external)]
        return names

    def _public(self, version: str) -> bool:
        """Whether users may reach `version` (see the module docstring)."""
        return version in self.released or not self.store.has_metadata(version)

    @contextlib.asynccontextmanager
    async def lease(
        self, model: str, internal: bool = False
    ) -> AsyncIterator[tuple[str, str | None]]:
        """Resolve `model` to (version label, engine adapter name) and hold that adapter
        loaded until the request is done. Only `internal` requests reach an unreleased
        version."""
        label, adapter = await self._resolve(model, internal)
        if adapter:
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        try:
            yield label, adapter
        finally:
            if adapter:
                self.in_use[adapter] -= 1
                if not self.in_use[adapter]:
                    del self.in_use[adapter]
                    self._let_go.set()

    async def _resolve(self, model: str, internal: bool = False) -> tuple[str, str | None]:
        try:
            return await self._resolve_loaded(model, internal)
        except EngineError as e:  # unreachable, or it refused the adapter: not the caller's doing
            raise APIError(
                503,
                f"The engine could not load the model `{model}`: {e}",
                type="server_error",
                code="engine_unavailable",
            ) from e

    async def _resolve_loaded(self, model: str, internal: bool) -> tuple[str, str | None]:
        if model == BASE:
            return BASE, None
        if model == PROMOTED_MODEL:
            version = self.promoted
            if version is None:
                return BASE, None
            return version, await self.ensure_loaded(version)
        if model.startswith(PINNED_PREFIX):
            version = model.removeprefix(PINNED_PREFIX)
            if self.store.has_adapter(version) and (
                internal or self._public(version) or await self._released_now(version)
            ):
                return version, await self.ensure_loaded(version)
        if model in self.external:
            return model, model
        raise APIError(
            404,
            f"The model `{model}` does not exist. Use `strop`, `base`, or "
            "`strop@vN` for a version on disk (GET /v1/models lists them).",
            param="model",
            code="model_not_found",
        )

    # --- loading ----------------------------------------------------------------------

    async def ensure_loaded(self, version: str) -> str:
        """Load `version` into the engine if needed; returns its adapter name. The engine
        holds at most the promoted version and `keep_loaded` others (vLLM's --max-loras is
        sized to that): when every other one is in use, wait until a request lets one go."""
        while True:
            async with self._lock:
                if version in self.loaded:
                    self.loaded.move_to_end(version)
                    return self.loaded[version]
                self._let_go.clear()  # before evicting: a release during it is not missed
                await self._evict(room_for=1)
                if self._room():
                    name = engine_adapter_name(version)
                    path = self.store.path(version).resolve()
                    await self.engine.load_adapter(name, str(path))
                    self.loaded[version] = name
                    log.info("loaded adapter %s from %s", name, path)
                    return name
            await self._let_go.wait()

    def _room(self) -> bool:
        """Whether one more version fits beside the promoted one and the others loaded."""
        spare = [v for v in self.loaded if v != self.promoted]
        return len(spare) < max(1, self.keep_loaded)

    async def _evict(self, room_for: int = 0) -> None:
        # Keep the promoted version plus `keep_loaded` others (`room_for` of them about to be
        # loaded); a version a request is using stays until it is let go.
        spare = [v for v in self.loaded if v != self.promoted]
        for version in spare[: max(0, len(spare) + room_for - self.keep_loaded)]:
            name = self.loaded[version]
            if self.in_use.get(name):
                continue
            del self.loaded[version]
            await self.engine.unload_adapter(name)
            log.info("unloaded adapter %s", name)

    def forget(self, version: str) -> None:
        """The engine no longer has `version` (e.g. a restarted vLLM): load it again on next use."""
        self.loaded.pop(version, None)
        self._let_go.set()  # its slot is free

    async def load_external(self, name: str, path: str) -> None:
        await self.engine.load_adapter(name, path)
        self.external.add(name)

    async def unload_external(self, name: str) -> None:
        if name not in self.external:
            raise APIError(
                404,
                f"The adapter `{name}` is not loaded.",
                param="lora_name",
                code="adapter_not_found",
            )
        self.external.discard(name)
        await self.engine.unload_adapter(name)

    # --- following the registry -------------------------------------------------------

    async def _released_now(self, version: str) -> bool:
        """Ask the registry about one version (promoted a moment ago, before the event)."""
        try:
            raw = await self.redis.hget(self.keys.versions, version)
        except RedisError:
            return False  # no evidence it was promoted: keep it from users
        if raw and json.loads(raw).get("status") in RELEASED:
            self.released.add(version)
            return True
        return False

    async def _read_released(self) -> None:
        entries = await self.redis.hgetall(self.keys.versions)
        self.released = {
            k.decode() if isinstance(k, bytes) else k
            for k, raw in entries.items()
            if json.loads(raw).get("status") in RELEASED
        }

    async def refresh(self) -> bool:
        """Follow the registry: which versions are released, and where the promoted pointer
        is; True if `strop` moved."""
        await self._read_released()
        raw = await self.redis.get(self.keys.promoted)
        target = raw.decode() if isinstance(raw, bytes) else raw
        if target == self.promoted:
            return False
        if target is not None:
            await self.ensure_loaded(target)  # load first, then move the alias: no gap
        previous, self.promoted = self.promoted, target
        self.swaps += 1
        log.info("strop now serves %s (was %s)", target or "base", previous or "base")
        async with self._lock:
            await self._evict()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="versions")

    async def close(self) -> None:
        # redis-py's pubsub.get_message can swallow one cancellation (its internal timeout),
        # so flag the loop to stop and cancel until the task is really done.
        self._stopping = True
        while self._task and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.5)

    async def _follow(self) -> None:
        """Refresh on every registry event, and every `poll_s` regardless."""
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.events_channel)
                await self._refresh_logged()
                while not self._stopping:
                    msg = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.poll_s
                    )
                    if msg is not None:
                        log.debug("registry event %s", msg.get("data"))
                    await self._refresh_logged()
            except (RedisError, OSError) as e:
                log.warning("registry unreachable (%s); retrying", e.__class__.__name__)
                await asyncio.sleep(self.poll_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError):
            raise
        except Exception:  # a broken adapter on disk must not stop the service following
            log.exception("could not switch to the promoted version")
