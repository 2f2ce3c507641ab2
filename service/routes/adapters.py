"""vLLM's runtime LoRA endpoints, behind the admin key, so a strop service can be another's
remote engine; and strop's own rollback of the promoted version."""

import asyncio

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from service.auth import Admin
from service.engines.base import AdapterNotFound, EngineError
from service.protocol import (
    APIError,
    LoadLoraAdapterRequest,
    RequestBody,
    UnloadLoraAdapterRequest,
)
from strop.connection import connect
from strop.registry import Registry
from strop.versions import BASE, is_version

router = APIRouter(prefix="/v1", tags=["adapters"])


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request, _: Admin) -> str:
    versions = request.app.state.service.versions
    if body.lora_name in versions.external:
        raise APIError(
            400,
            f"The lora adapter '{body.lora_name}' has already been loaded.",
            param="lora_name",
            code="adapter_exists",
        )
    try:
        await versions.load_external(body.lora_name, body.lora_path)
    except (AdapterNotFound, OSError, ValueError, EngineError) as e:
        if isinstance(e.__cause__, httpx.TransportError):  # a remote engine out of reach
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from e
        # The engine refused these files (e.g. an adapter trained for another model).
        raise APIError(
            400,
            f"Could not load adapter '{body.lora_name}' from {body.lora_path}: {e}",
            param="lora_path",
            code="adapter_load_failed",
        ) from e
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request, _: Admin) -> str:
    await request.app.state.service.versions.unload_external(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


class RollbackRequest(RequestBody):
    """Body of POST /v1/strop/rollback (optional)."""

    version: str | None = None  # "vN" or "base"; default: the previous promoted version


@router.post("/strop/rollback")
async def rollback(request: Request, _: Admin, body: RollbackRequest | None = None) -> dict:
    """Point `strop` back (recorded as a registry event); answers once it is served."""
    service = request.app.state.service
    to = body.version if body else None
    if to is not None and to != BASE and not is_version(to):
        raise APIError(400, "`version` must be `vN` or `base`.", param="version")

    def move() -> tuple[str | None, str | None] | None:
        r = connect(service.settings.redis_url)
        try:
            registry = Registry(r, service.keys)
            if registry.promoted() is None and to in (None, BASE):
                return None  # base is served already: no event, nothing to move
            return registry.rollback(to=to, reason="manual (api)")
        finally:
            r.close()

    try:
        moved = await asyncio.to_thread(move)
    except KeyError as e:
        raise APIError(404, f"Unknown version `{to}`.", param="version") from e
    if moved is None:
        raise APIError(
            409,
            "Nothing to roll back: no version is promoted, the base model is served.",
            code="nothing_to_roll_back",
        )
    before, after = moved
    await service.versions.refresh()  # load and switch now, not at the next poll
    return {"object": "strop.rollback", "from": before or "base", "to": after or "base"}
