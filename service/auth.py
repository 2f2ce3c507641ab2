"""Bearer-key checks: API keys for the chat API, a separate admin key for admin endpoints."""

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from service.protocol import APIError

log = logging.getLogger("strop.auth")


def key_id(key: str | None, secret: bytes) -> str:
    """A stable id for a key, safe to log: an HMAC under a server secret, so one who reads
    the logs (or Redis) cannot test guesses of a weak key against it."""
    if not key:
        return "anonymous"
    return "key-" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:12]


async def key_id_secret(configured: str | None, redis: aioredis.Redis, name: str) -> bytes:
    """The key-id secret: the configured one, else one shared by every process through Redis
    key `name` (the first process creates it, SET NX); while Redis is unreachable, one of
    this process only (its key ids then differ from the other processes')."""
    if configured:
        return configured.encode()
    try:
        await asyncio.wait_for(redis.set(name, secrets.token_hex(32), nx=True), timeout=5)
        shared = await asyncio.wait_for(redis.get(name), timeout=5)
    except Exception as e:  # Redis down at start: serve anyway, as the prompt log does
        shared = None
        log.warning("key-id secret not readable from redis (%s)", e.__class__.__name__)
    if not shared:
        log.warning("key ids use a secret of this process only; set STROP_KEY_ID_SECRET")
        return secrets.token_bytes(32)
    return shared if isinstance(shared, bytes) else shared.encode()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


def require_api_key(request: Request) -> str:
    """The caller's key id; 401 unless the bearer key is an API key (or the admin key)."""
    service = request.app.state.service
    settings, secret = service.settings, service.key_id_secret
    keys = list(settings.api_keys) + ([settings.admin_key] if settings.admin_key else [])
    token = _bearer(request)
    if not settings.api_keys:  # open service (bound to localhost only)
        return key_id(token, secret) if token and _matches(token, keys) else "anonymous"
    if token is None:
        raise APIError(
            401,
            "Missing API key: send `Authorization: Bearer <key>`.",
            type="authentication_error",
            code="missing_api_key",
        )
    if not _matches(token, keys):
        raise APIError(
            401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key"
        )
    return key_id(token, secret)


def require_admin(request: Request) -> None:
    """403 unless the bearer key is the admin key (admin endpoints are off without one)."""
    admin = request.app.state.service.settings.admin_key
    if not admin:
        raise APIError(
            403,
            "Admin endpoints are disabled: set STROP_ADMIN_KEY.",
            type="permission_error",
            code="admin_disabled",
        )
    token = _bearer(request)
    if token is None:
        raise APIError(
            401,
            "Missing admin key: send `Authorization: Bearer <admin key>`.",
            type="authentication_error",
            code="missing_api_key",
        )
    if not _matches(token, [admin]):
        raise APIError(
            403,
            "This endpoint needs the admin key.",
            type="permission_error",
            code="invalid_admin_key",
        )


CallerKeyId = Annotated[str, Depends(require_api_key)]
Admin = Annotated[None, Depends(require_admin)]
