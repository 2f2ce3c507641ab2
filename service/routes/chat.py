"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.auth import CallerKeyId
from service.protocol import ChatCompletion, ChatCompletionRequest
from strop.headers import INTERNAL, NO_LOG

router = APIRouter(prefix="/v1", tags=["chat"])


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, key: CallerKeyId
) -> ChatCompletion | StreamingResponse:
    service = request.app.state.service
    internal = _truthy(request.headers.get(INTERNAL))
    log = body.wants_log() and not _truthy(request.headers.get(NO_LOG)) and not internal
    if body.stream:
        lines = await service.chat.stream(body, key, log, internal)
        return StreamingResponse(
            lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await service.chat.complete(
        body, key, log, internal, disconnected=request.is_disconnected
    )
