"""One chat request in flight: the handle the event loop waits on and the scheduler thread
pushes events to."""

import asyncio
from typing import Any

from service.engines.base import SamplingParams


class Request:
    """One chat request: shared by the event loop (which waits) and the scheduler (which pushes)."""

    def __init__(
        self, rid: int, prompt_ids: list[int], params: SamplingParams, adapter: str, stream: bool
    ):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.adapter, self.stream = adapter, stream
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self.unfinished = max(1, params.n)  # choices still running
        self.completion_tokens = 0
        self.done = False  # everything was sent (or it failed)
        self.dropped = False  # cancelled or failed: its sequences leave the batch

    def push(self, item: list[Any] | BaseException) -> None:
        """Hand events (or the error) to the waiting coroutine; called from the scheduler."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening
            self.dropped = True

    async def receive(self) -> list[Any]:
        """The next events the scheduler pushed; raises the error instead if it pushed one."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
