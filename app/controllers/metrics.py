"""GET /metrics for Prometheus."""

from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State
from litestar.response import Response

from app._deps import LiveDep, StatsDep
from app._metrics import CONTENT_TYPE, Buffers


class MetricsController(Controller):
    """Prometheus scrape target (behind the same keys as the API)."""

    tags = ["operations"]

    @get("/metrics", operation_id="metrics", media_type=CONTENT_TYPE)
    async def metrics(self, state: State, live: LiveDep, stats: StatsDep) -> Response[bytes]:
        """Jobs by status and type, run-time and queue-wait histograms, queue depth per pool, events,
        open streams, workers."""
        hub, projection = live.hub, state.projection
        buffers = Buffers(hub.buffered, hub.cut_offs, projection.queued, projection.resubscribes)
        body = await state.metrics.render(
            live.queries.db,
            len(await stats.workers()),
            sum(live.open_streams.values()),
            hub.subscriber_count,
            buffers,
        )
        return Response(body, media_type=CONTENT_TYPE)
