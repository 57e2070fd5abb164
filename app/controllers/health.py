"""Liveness and readiness."""

from __future__ import annotations

import msgspec
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from app._schemas import Health
from streams import TaskState, TaskSupervisor

NOT_READY = {
    HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
        data_container=Health, generate_examples=False,
        description="Not ready: NATS is unreachable, the projection is catching up, or a supervised task is down (the same body)",
    )
}  # fmt: skip
"""/ready's 503 carries its Health body, not the error body other routes' 503 does."""


def public_states(supervisor: TaskSupervisor) -> dict[str, TaskState]:
    """The tasks' states for anyone who asks: an error's kind only, since its text (a database
    error quotes the statement's parameters: other owners' data) is for the log."""
    return {
        name: msgspec.structs.replace(
            state,
            last_error=f"{state.last_error.split(':', 1)[0]} (details in the log)"
            if state.last_error
            else None,
        )
        for name, state in supervisor.status().items()
    }


class HealthController(Controller):
    """Probes for supervisors and load balancers."""

    tags = ["health"]

    @get("/health", operation_id="health")
    async def health(self) -> Health:
        """The process is alive."""
        return Health(status="ok")

    @get("/ready", operation_id="ready", responses=NOT_READY)
    async def ready(self, state: State) -> Response[Health]:
        """NATS is connected, the projection has caught up with the stream, and every supervised
        task runs; otherwise 503, with `status` naming what is not."""
        projection = state.projection
        supervisor: TaskSupervisor = state.tasks
        connected = bool(state.nats.is_connected)
        caught_up = projection.caught_up.is_set()
        down = supervisor.down()
        if not connected:
            status = "nats unavailable"
        elif down:
            status = f"down: {', '.join(down)}"
        else:
            status = "ready" if caught_up else "catching up"
        body = Health(
            status=status, nats=connected, applied_seq=projection.applied_seq,
            stream_seq=projection.catch_up_to, tasks=public_states(supervisor),
        )  # fmt: skip
        ready = connected and caught_up and not down
        return Response(body, status_code=HTTP_200_OK if ready else HTTP_503_SERVICE_UNAVAILABLE)
