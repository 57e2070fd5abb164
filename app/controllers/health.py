"""Liveness and readiness."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from app._schemas import Health


class HealthController(Controller):
    """Probes for supervisors and load balancers."""

    tags = ["health"]

    @get("/health", operation_id="health")
    async def health(self) -> Health:
        """The process is alive."""
        return Health(status="ok")

    @get("/ready", operation_id="ready")
    async def ready(self, state: State) -> Response[Health]:
        """NATS is connected and the projection has caught up with the stream."""
        projection = state.service.projection
        connected = bool(state.nats.is_connected)
        caught_up = projection.caught_up.is_set()
        body = Health(
            status="ready" if connected and caught_up else ("catching up" if connected else "nats unavailable"),
            nats=connected, applied_seq=projection.applied_seq, stream_seq=projection.catch_up_to,
        )  # fmt: skip
        return Response(
            body, status_code=HTTP_200_OK if connected and caught_up else HTTP_503_SERVICE_UNAVAILABLE
        )
