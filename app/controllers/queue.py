"""The queue as a whole (Compileo's /queue/stats)."""

from __future__ import annotations

from litestar import Controller, get

from app._deps import Owner, StatsDep
from app._schemas import QueueStats


class QueueController(Controller):
    """Queue figures."""

    path = "/api/v1/jobs/queue"
    tags = ["queue"]

    @get("/stats", operation_id="queueStats")
    async def stats(self, stats: StatsDep, owner: Owner) -> QueueStats:
        """The caller's jobs by status; the CPU, memory, loaded models, live workers and health of
        the whole deployment."""
        return await stats.queue_stats(owner, await stats.heartbeats())
