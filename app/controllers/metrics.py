"""GET /metrics for Prometheus."""

from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State
from litestar.response import Response

from app._deps import Service, StatsDep


class MetricsController(Controller):
    """Prometheus scrape target (behind the same keys as the API)."""

    tags = ["operations"]

    @get("/metrics", operation_id="metrics", media_type="text/plain; version=0.0.4")
    async def metrics(self, state: State, service: Service, stats: StatsDep) -> Response[str]:
        """Jobs by status and type, run-time and queue-wait histograms, queue depth per pool, events,
        open streams, workers."""
        body = await state.metrics.render(
            service.db,
            len(await stats.workers()),
            sum(service.open_streams.values()),
            service.hub.subscriber_count,
        )
        return Response(body, media_type="text/plain; version=0.0.4")
