"""The remote engine: a vLLM-compatible server over HTTP.

Chat goes through its OpenAI API (the adapter is chosen by the `model` field); adapters
through its runtime LoRA endpoints (vLLM started with `--enable-lora` and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Another strop service speaks the same protocol,
which is how this path is tested without a GPU.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from service.engines.base import (
    AdapterNotFound,
    Choice,
    ContextTooLong,
    Delta,
    EngineError,
    EngineRejected,
    Generation,
    SamplingParams,
    StreamEnd,
    TokenLogprob,
)
from service.engines.prompt import PromptEncoder
from strop.model import load_tokenizer

log = logging.getLogger("strop.engine.remote")


class RemoteEngine:
    def __init__(
        self,
        url: str,
        model: str,
        cache_dir: Path,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_context: int | None = None,
        base_name: str | None = None,
    ):
        self.url, self.model, self.cache_dir = url.rstrip("/"), model, cache_dir
        self.base_name = base_name  # the remote's name for the base model; found at start
        self._max_context = max_context
        self.max_context = max_context or 2048
        self._adapters: set[str] = set()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            # vLLM's uvicorn closes idle connections after 5 s, httpx's default expiry too:
            # letting go first means never sending on a connection the server is closing
            limits=httpx.Limits(
                max_connections=100, max_keepalive_connections=20, keepalive_expiry=2.0
            ),
        )
        self.tokenizer = None
        self._prompts: PromptEncoder | None = None

    async def start(self) -> None:
        # The same base model runs remotely; its tokenizer here lets us refuse over-long
        # prompts before sending them (the remote would refuse them too).
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model, self.cache_dir)
        self._prompts = await asyncio.to_thread(PromptEncoder, self.tokenizer)
        if self._max_context is None:
            self.max_context = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
            if not 0 < self.max_context < 1_000_000:
                self.max_context = 2048
        try:
            cards = (await self.client.get("/v1/models")).json()["data"]
            if self.base_name is None:
                ids = [c["id"] for c in cards]
                self.base_name = "base" if "base" in ids else ids[0]
            for c in cards:  # vLLM reports max_model_len; strop does not
                if self._max_context is None and c.get("max_model_len"):
                    self.max_context = int(c["max_model_len"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            log.warning("remote engine %s not answering yet (%s)", self.url, e.__class__.__name__)
            self.base_name = self.base_name or "base"

    async def close(self) -> None:
        await self.client.aclose()

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt, counted here; blocking: call it from a worker thread."""
        if self._prompts is None:
            raise EngineError("the remote engine is not started")
        return len(self._prompts.ids(messages, self.max_context))

    def _body(self, messages, params: SamplingParams, adapter: str | None, stream: bool) -> dict:
        body: dict[str, Any] = {
            "model": adapter or self.base_name,
            "messages": messages,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "stream": stream,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _check(self, r: httpx.Response, adapter: str | None) -> None:
        if r.status_code < 400:
            return
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        if r.status_code == 404 and adapter:
            raise AdapterNotFound(f"remote engine does not know adapter {adapter}: {message}")
        if r.status_code == 400 and "context" in message.lower():
            raise ContextTooLong(message)
        if r.status_code in (400, 422):
            raise EngineRejected(message)
        raise EngineError(f"remote engine answered {r.status_code}: {message}")

    async def generate(self, messages, params: SamplingParams, adapter: str | None) -> Generation:
        try:
            r = await self.client.post(
                "/v1/chat/completions", json=self._body(messages, params, adapter, stream=False)
            )
        except httpx.HTTPError as e:
            raise EngineError(f"remote engine unreachable: {e.__class__.__name__}") from e
        self._check(r, adapter)
        data = r.json()
        choices = [
            Choice(
                index=c["index"],
                text=c["message"]["content"] or "",
                finish_reason=c.get("finish_reason") or "stop",
                logprobs=_logprobs_in(c.get("logprobs")) if params.logprobs else None,
            )
            for c in data["choices"]
        ]
        usage = data.get("usage") or {}
        return Generation(
            sorted(choices, key=lambda c: c.index),
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
        )

    async def stream(
        self, messages, params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[Delta | StreamEnd]:
        body = self._body(messages, params, adapter, stream=True)
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._check(r, adapter)
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise EngineError(chunk["error"].get("message", "remote stream failed"))
                    for c in chunk.get("choices", []):
                        text = (c.get("delta") or {}).get("content") or ""
                        if text or c.get("finish_reason"):
                            yield Delta(
                                index=c["index"],
                                text=text,
                                logprobs=_logprobs_in(c.get("logprobs")),
                                finish_reason=c.get("finish_reason"),
                            )
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        yield StreamEnd(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
        except httpx.HTTPError as e:
            raise EngineError(f"remote engine unreachable: {e.__class__.__name__}") from e

    async def load_adapter(self, name: str, path: str) -> None:
        try:
            r = await self.client.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
            )
        except httpx.HTTPError as e:
            raise EngineError(f"remote engine unreachable: {e.__class__.__name__}") from e
        # Names are per version and never reused, so "already loaded" means these weights
        # are there: e.g. this service restarted while vLLM kept them, or a retry after a
        # reply was lost. Refusing would keep `strop` off that version for good.
        if r.status_code >= 400 and not (r.status_code == 400 and "already been loaded" in r.text):
            raise EngineError(f"remote engine refused adapter {name}: {r.text[:300]}")
        self._adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        try:
            r = await self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as e:
            raise EngineError(f"remote engine unreachable: {e.__class__.__name__}") from e
        if r.status_code >= 400 and r.status_code != 404:
            raise EngineError(f"remote engine refused to unload {name}: {r.text[:300]}")
        self._adapters.discard(name)

    def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def health(self) -> dict[str, Any]:
        try:
            r = await self.client.get("/health", timeout=2.0)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return {
            "ok": ok,
            "engine": "remote",
            "url": self.url,
            "model": self.base_name,
            "adapters": self.loaded_adapters(),
        }


def _logprobs_in(raw: dict | None) -> list[TokenLogprob] | None:
    if not raw or raw.get("content") is None:
        return None
    return [
        TokenLogprob(
            token=t["token"],
            logprob=t["logprob"],
            token_id=-1,
            top=[(x["token"], x["logprob"]) for x in t.get("top_logprobs") or []],
        )
        for t in raw["content"]
    ]
