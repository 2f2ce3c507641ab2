"""vLLM's runtime LoRA endpoints, behind the admin key, so a strop service can be another's
remote engine; and strop's own rollback of the promoted version."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from service.auth import Admin
from service.engines.base import AdapterNotFound
from service.protocol import APIError, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
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
    except (AdapterNotFound, OSError, ValueError) as e:
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


class RollbackRequest(BaseModel):
    """Body of POST /v1/strop/rollback (optional)."""

    version: str | None = None  # "vN" or "base"; default: the previous promoted version


@router.post("/strop/rollback")
async def rollback(request: Request, _: Admin, body: RollbackRequest | None = None) -> dict:
    """Point `strop` back (recorded as a registry event); answers once it is served."""
    service = request.app.state.service
    to = body.version if body else None
    if to is not None and to != BASE and not is_version(to):
        raise APIError(400, "`version` must be `vN` or `base`.", param="version")

    def move() -> tuple[str | None, str | None]:
        r = connect(service.settings.redis_url)
        try:
            return Registry(r, service.keys).rollback(to=to, reason="manual (api)")
        finally:
            r.close()

    try:
        before, after = await asyncio.to_thread(move)
    except KeyError as e:
        raise APIError(404, f"Unknown version `{to}`.", param="version") from e
    await service.versions.refresh()  # load and switch now, not at the next poll
    return {"object": "strop.rollback", "from": before or "base", "to": after or "base"}
