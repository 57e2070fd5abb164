"""P3's baseline: a minimal Litestar SSE broadcaster, one queue and one generator per client."""

from __future__ import annotations

import asyncio
import gc
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, get, post
from litestar.response import ServerSentEvent

_queues: defaultdict[str, set[asyncio.Queue[str | None]]] = defaultdict(set)

if os.environ.get("BENCH_GC_THRESHOLD"):
    gc.set_threshold(int(os.environ["BENCH_GC_THRESHOLD"]), 50, 100)


@get("/sub/{key:str}")
async def subscribe(key: str) -> ServerSentEvent:
    """Follow `key` ("all" for the broadcast) until an end message."""

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        _queues[key].add(queue)
        try:
            yield "hello"
            while (message := await queue.get()) is not None:
                yield message
        finally:
            _queues[key].discard(queue)

    return ServerSentEvent(events())


@post("/publish", status_code=204)
async def publish(data: dict[str, Any]) -> None:
    """`{"messages": [[key, text], ...], "end": bool}`; a text of null ends the key's streams."""
    for key, text in data["messages"]:
        for queue in _queues.get(key, ()):
            queue.put_nowait(text)


app = Litestar([subscribe, publish], openapi_config=None)
