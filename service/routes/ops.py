"""Operations: /v1/models, /health, /metrics."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import CallerKeyId
from service.protocol import ModelCard, ModelList

router = APIRouter(tags=["ops"])


@router.get("/v1/models")
async def list_models(request: Request, _: CallerKeyId) -> ModelList:
    service = request.app.state.service
    root = service.settings.model
    return ModelList(
        data=[
            ModelCard(
                id=name, root=root, parent=None if version == "base" else root, version=version
            )
            for name, version in service.versions.model_names()
        ]
    )


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Engine and Redis reported apart: Redis down degrades logging, not serving (200); a
    stopped log writer degrades it for good, so that answers 503 (only a restart mends it)."""
    service = request.app.state.service
    engine = await service.engine.health()
    try:
        redis_ok = bool(await asyncio.wait_for(service.redis.ping(), timeout=1.0))
    except Exception:
        redis_ok = False
    writer_ok = service.promptlog.running
    if not engine.get("ok"):
        status = "down"
    elif not (redis_ok and writer_ok):
        status = "degraded"
    else:
        status = "ok"
    body = {
        "status": status,
        "engine": engine,
        "redis": {
            "ok": redis_ok,
            "log_writer": "running" if writer_ok else "stopped",
            "log_buffered": len(service.promptlog.buffer),
            "log_dropped": service.promptlog.dropped,
        },
        "strop": service.versions.promoted or "base",
    }
    return JSONResponse(body, status_code=200 if engine.get("ok") and writer_ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    service = request.app.state.service
    m, plog = service.metrics, service.promptlog
    m.log_writes.set(plog.written)
    m.log_buffered.set(len(plog.buffer))
    m.redis_up.set(1 if plog.redis_ok else 0)
    m.adapters_loaded.set(len(service.engine.loaded_adapters()))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
