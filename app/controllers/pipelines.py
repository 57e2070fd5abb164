"""Pipelines: stages run in order on one input file, each on its own pool, followed as one job."""

from __future__ import annotations

from litestar import Controller, post
from litestar.params import JSONBody
from litestar.status_codes import HTTP_202_ACCEPTED

from app._deps import Commands, Owner
from app._schemas import Job, SubmitPipeline


class PipelineController(Controller):
    """The pipeline resource: submitted here, then a job like any other (/api/v1/jobs/{id})."""

    path = "/api/v1/pipelines"
    tags = ["jobs"]

    @post("/", status_code=HTTP_202_ACCEPTED, operation_id="submitPipeline")
    async def submit(self, data: JSONBody[SubmitPipeline], commands: Commands, owner: Owner) -> Job:
        """Queue a pipeline: a parent job of type `pipeline` whose children are its stages, in order
        (GET /api/v1/jobs/{id}/children). Each stage starts once the one before has completed, on
        that stage's main output; a stage that cannot take it is a 422 naming the stage. Follow the
        parent like a batch (SSE, WebSocket, long-poll); retry reruns from the failed stage only."""
        return await commands.pipelines.submit(data, owner)
