"""The FastAPI app: one `Service` object holding the parts, the routers, one error format."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import key_id_secret
from service.chat import ChatService
from service.engines.base import Engine
from service.metrics import RequestCounter, ServiceMetrics
from service.promptlog import PromptLog
from service.protocol import APIError
from service.versions import Versions
from strop.connection import connect_async
from strop.records import Keys
from strop.settings import Settings

log = logging.getLogger("strop.service")

# How long uvicorn keeps an idle connection open. Clients (the `openai` client's httpx pool)
# drop idle connections after 5 s, as uvicorn does by default; with equal timeouts a client
# can reuse a connection in the instant the server closes it and get "connection reset"
# (the learner's gate did, after 5 s of scoring between two requests). Longer on the server
# side means the client always lets go first.
KEEP_ALIVE_S = 75


@dataclass
class Service:
    settings: Settings
    keys: Keys
    engine: Engine
    redis: aioredis.Redis
    promptlog: PromptLog
    versions: Versions
    metrics: ServiceMetrics
    chat: ChatService
    key_id_secret: bytes


def make_engine(settings: Settings) -> Engine:
    """The engine the settings name: embedded (in-process) or remote (vLLM-compatible)."""
    if settings.engine == "remote":
        from service.engines.remote import RemoteEngine

        remotes = [
            RemoteEngine(
                url,
                settings.model,
                settings.model_cache_dir,
                api_key=settings.engine_api_key,
                timeout_s=settings.engine_timeout_s,
                max_context=settings.max_context,
            )
            for url in settings.engine_urls
        ]
        if not remotes:
            raise ValueError("STROP_ENGINE=remote needs STROP_ENGINE_URL")
        if len(remotes) == 1:
            return remotes[0]
        from service.engines.replicas import Replicas

        return Replicas(remotes)
    from service.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(
        settings.model,
        settings.model_cache_dir,
        device=settings.device,
        max_batch_size=settings.max_batch_size,
        max_context=settings.max_context,
    )


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The service app; `engine` may be given (tests share one), else built from settings."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine
        if eng is None:  # a given engine was started by its owner (tests share one)
            eng = make_engine(settings)
            await eng.start()
        keys = Keys(settings.redis_prefix)
        redis = connect_async(settings.redis_url)
        metrics = ServiceMetrics()
        secret = await key_id_secret(settings.key_id_secret, redis, keys.key_id_secret)
        promptlog = PromptLog(
            settings.redis_url,
            keys.prompt_log,
            keys.logged,
            settings.log_stream_maxlen,
            settings.log_buffer_size,
            on_drop=lambda reason, n: metrics.log_drops.labels(reason).inc(n),
            ttl_s=settings.feedback_window_s,
            nolog_prefix=keys.nolog,
        )
        versions = Versions(
            eng,
            settings.adapter_dir,
            redis,
            keys,
            keep_loaded=settings.adapters_keep_loaded,
            poll_s=settings.adapter_poll_s,
        )
        app.state.service = Service(
            settings,
            keys,
            eng,
            redis,
            promptlog,
            versions,
            metrics,
            ChatService(settings, eng, versions, promptlog, metrics),
            secret,
        )
        promptlog.start()
        with contextlib.suppress(Exception):  # Redis may be down at start: serve anyway
            await asyncio.wait_for(versions.refresh(), timeout=5)
        versions.start()
        log.info(
            "serving %s with the %s engine; strop -> %s",
            settings.model,
            settings.engine,
            versions.promoted or "base",
        )
        yield
        await versions.close()
        await promptlog.close()
        await redis.aclose()
        if engine is None:
            await eng.close()

    app = FastAPI(title="strop", version="0.1.0", lifespan=lifespan)

    from service.routes import adapters, chat, dashboard, feedback, ops

    app.include_router(chat.router)
    app.include_router(feedback.router)
    app.include_router(adapters.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    add_error_handlers(app)
    app.add_middleware(RequestBodyGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounter)  # outermost: it sees the guard's refusals too
    return app


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class RequestBodyGuard:
    """ASGI middleware: a request body is at most `max_bytes` and, on POST, declared JSON;
    checked before anything parses it, so an oversized body costs only its reading.

    The declared Content-Length is checked first; a body without one (chunked) is counted
    as it arrives and refused as soon as it passes the limit. The HTTP server reads and
    drops the rest of a refused body without parsing it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            declared = int(headers["content-length"]) if "content-length" in headers else None
        except ValueError:
            declared = None  # the HTTP server refuses a malformed length itself
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, self._too_large())
            return
        if not declared and not chunked:  # no body
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and not _is_json(headers.get("content-type")):
            # Also what keeps a web page from posting here without a CORS preflight.
            err = APIError(
                400,
                "Content-Type must be application/json; send the body as JSON with "
                "`Content-Type: application/json`.",
                code="invalid_content_type",
            )
            await self._refuse(scope, receive, send, err)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left mid-body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # later calls: wait for the disconnect, as the server's receive does
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body is larger than the {self.max_bytes} bytes this server accepts.",
            code="request_too_large",
        )

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
        await JSONResponse(err.response_body(), status_code=err.status)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's envelope: {"error": {message, type, param, code}}."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.response_body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            err = APIError(
                400,
                "We could not parse the JSON body of your request: "
                f"{first.get('ctx', {}).get('error', 'invalid JSON')}.",
                code="invalid_json",
            )
            return JSONResponse(err.response_body(), status_code=400)
        # Build the message from the fields only, so no server paths or internals leak.
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        err = APIError(
            400, "Invalid request: " + "; ".join(parts), param=param, code="invalid_value"
        )
        return JSONResponse(err.response_body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.response_body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(
            500,
            "The server had an error while processing your request.",
            type="server_error",
            code="internal_error",
        )
        return JSONResponse(err.response_body(), status_code=500)
