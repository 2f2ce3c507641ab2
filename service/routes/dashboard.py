"""The dashboard: a static page (`GET /dashboard`) that polls `GET /dashboard/data`.

The page and its script are public (they hold no data); the data needs an API key
whenever the service has keys, like the chat API. Rollback goes through the admin
endpoint `POST /v1/strop/rollback`, with the admin key the operator types into the page.
"""

import asyncio
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from service.auth import CallerKeyId
from service.protocol import APIError
from strop.connection import connect
from strop.queues import dead_letter_length
from strop.snapshot import MAX_WINDOW_S, MIN_WINDOW_S, gather

router = APIRouter(tags=["dashboard"])

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a new release shows at the next load


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=NO_CACHE)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the disk
        raise APIError(404, f"No dashboard file `{name}`.", type="not_found_error")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_CACHE)


@router.get("/dashboard/data")
async def dashboard_data(
    request: Request,
    _: CallerKeyId,
    window: Annotated[int, Query(ge=MIN_WINDOW_S, le=MAX_WINDOW_S)] = 3600,
) -> dict[str, Any]:
    """Versions, reward trends, traffic, queues (and the worker's dead letters) and learner
    state (see strop/snapshot.py), plus this service process's own request counts."""
    service = request.app.state.service

    def read() -> dict[str, Any]:
        r = connect(service.settings.redis_url)
        try:
            data = gather(r, service.settings, window_s=window)
            data["queues"]["dead_letter"] = dead_letter_length(r, service.settings.redis_prefix)
            return data
        finally:
            r.close()

    try:
        data = await asyncio.to_thread(read)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise APIError(
            503, "Redis is unreachable: no dashboard data.", type="server_error", code="redis_down"
        ) from e
    data["service"] = service_summary(service)
    return data


def service_summary(service: Any) -> dict[str, Any]:
    """What only the serving process knows: requests by status since it started, the
    prompt-log buffer, and the adapters it has loaded."""
    by_status: dict[str, float] = {}
    for metric in service.metrics.requests.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                status = s.labels["status"]
                by_status[status] = by_status.get(status, 0) + s.value
    plog = service.promptlog
    return {
        "requests": int(sum(by_status.values())),
        "requests_by_status": {k: int(v) for k, v in sorted(by_status.items())},
        "log_written": plog.written,
        "log_dropped": plog.dropped,
        "log_buffered": len(plog.buffer),
        "serving": service.versions.promoted or "base",
        "loaded": sorted(service.versions.loaded),
    }
