"""Prometheus metrics of the service, on a registry of its own (one per app)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.promptlog import DROP_REASONS

CHAT_PATH = "/v1/chat/completions"
NO_VERSION = "none"  # the `version` label of a request refused before a version served it


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "strop_requests",
            "Chat requests by version served (`none`: refused before one was chosen) and "
            "HTTP status",
            ["version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "strop_request_latency_seconds",
            "Chat request latency (to the last byte)",
            ["version"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.prompt_tokens = Counter("strop_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter(
            "strop_completion_tokens", "Completion tokens generated", registry=r
        )
        self.log_writes = Gauge(
            "strop_log_writes", "Prompt-log records written to Redis", registry=r
        )
        self.log_drops = Counter(
            "strop_log_drops",
            "Prompt-log records dropped, by reason (buffer_full, unserializable, write_error)",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:  # listed at 0 from the start, so alerts can rate() them
            self.log_drops.labels(reason)
        self.log_buffered = Gauge(
            "strop_log_buffered", "Prompt-log records waiting to be written", registry=r
        )
        self.adapters_loaded = Gauge(
            "strop_adapters_loaded", "LoRA adapters loaded in the engine", registry=r
        )
        self.redis_up = Gauge("strop_redis_up", "1 if the prompt log reaches Redis", registry=r)


class RequestCounter:
    """ASGI middleware counting chat requests that end without a version serving them.

    A served request is counted by the chat service under its version, once it is done
    (a stream can fail after its 200); every other status (400, 401, 404, 413, 500, ...)
    is counted here under `version="none"`, whichever part of the stack answered it.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = status or 500  # the server's error handler, outside us, answers 500
            raise
        finally:
            if status is not None and status != 200:
                # the app's metrics: built by its lifespan, after this middleware
                metrics = scope["app"].state.service.metrics
                metrics.requests.labels(NO_VERSION, str(status)).inc()
