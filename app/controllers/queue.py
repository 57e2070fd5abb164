"""The queue as a whole (Compileo's /queue/stats)."""

from __future__ import annotations

from litestar import Controller, get

from app._deps import Owner, Service, StatsDep
from app._schemas import QueueStats


class QueueController(Controller):
    """Queue figures."""

    path = "/api/v1/jobs/queue"
    tags = ["queue"]

    @get("/stats", operation_id="queueStats")
    async def stats(self, stats: StatsDep, service: Service, owner: Owner) -> QueueStats:
        """Jobs by status, this API's CPU and memory, live workers and the queue's health."""
        return await stats.queue_stats(owner, service.hub.subscriber_count)
