"""Jobs: submit (one or a batch), list, get, children, cancel, retry, delete."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from app._deps import Owner, RetentionDep, Service
from app._jobs import JobFilter
from app._schemas import MAX_INT, Job, JobPage, SubmitBatch, SubmitJob
from streams import JobStatus

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key", required=False, max_length=200, description="Same as client_request_id"
    ),
]


EXISTING = {
    HTTP_200_OK: ResponseSpec(
        data_container=Job, generate_examples=False,
        description="The idempotency key (or client_request_id) named an existing job: that job",
    )
}  # fmt: skip
"""The other success of a submit, documented next to its 202."""


def _accepted(job: Job, created: bool) -> Response[Job]:
    """202 for a new job; 200 when an idempotency key named an existing one."""
    return Response(job, status_code=HTTP_202_ACCEPTED if created else HTTP_200_OK)


class JobController(Controller):
    """The job resource."""

    path = "/api/v1/jobs"
    tags = ["jobs"]

    @post("/", status_code=HTTP_202_ACCEPTED, operation_id="submitJob", responses=EXISTING)
    async def submit(
        self,
        data: JSONBody[SubmitJob],
        service: Service,
        owner: Owner,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Job]:
        """Queue a job; answers once the job is visible to GET."""
        return _accepted(*await service.submit(data, owner, idempotency_key))

    @post("/batch", status_code=HTTP_202_ACCEPTED, operation_id="submitBatch", responses=EXISTING)
    async def submit_batch(
        self,
        data: JSONBody[SubmitBatch],
        service: Service,
        owner: Owner,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Job]:
        """Queue a batch: a parent job and one child per file or item; answers with the parent."""
        return _accepted(*await service.submit_batch(data, owner, idempotency_key))

    @get("/", operation_id="listJobs")
    async def list_jobs(
        self,
        service: Service,
        owner: Owner,
        status: Annotated[
            list[JobStatus] | None, QueryParameter(description="Repeat to match several")
        ] = None,
        job_type: Annotated[str | None, QueryParameter(name="type", max_length=64)] = None,
        active: FromQuery[bool] = False,
        parent_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
        include_children: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        offset: Annotated[int, QueryParameter(ge=0, le=MAX_INT)] = 0,
    ) -> JobPage:
        """The caller's jobs, newest first; batch children only with `include_children` or `parent_id`."""
        where = JobFilter(
            owner=owner, statuses=frozenset(status or ()), type=job_type, active=active,
            parent_id=parent_id, include_children=include_children,
        )  # fmt: skip
        return await service.find(where, limit=limit, offset=offset)

    @get("/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: FromPath[str], service: Service, owner: Owner) -> Job:
        """One job; a pending one with its queue position."""
        return await service.get(job_id, owner)

    @get("/{job_id:str}/children", operation_id="listChildren")
    async def children(self, job_id: FromPath[str], service: Service, owner: Owner) -> list[Job]:
        """A batch's child jobs in submit order (empty for a single job)."""
        return await service.children(job_id, owner)

    @post("/{job_id:str}/cancel", status_code=HTTP_200_OK, operation_id="cancelJob")
    async def cancel(self, job_id: FromPath[str], service: Service, owner: Owner) -> Job:
        """Cancel a pending or running job (409 once it has ended)."""
        return await service.cancel(job_id, owner)

    @post("/{job_id:str}/retry", status_code=HTTP_200_OK, operation_id="retryJob")
    async def retry(self, job_id: FromPath[str], service: Service, owner: Owner) -> Job:
        """Run a failed or cancelled job again as a new attempt (409 otherwise)."""
        return await service.retry(job_id, owner)

    @delete("/{job_id:str}", status_code=HTTP_204_NO_CONTENT, operation_id="deleteJob")
    async def delete_job(
        self, job_id: FromPath[str], retention: RetentionDep, owner: Owner,
        with_files: Annotated[bool, QueryParameter(name="files", description="Delete the files it produced too")] = False,
    ) -> None:  # fmt: skip
        """Delete a finished job (a batch with its children) for good: its messages are purged from
        the stream. 409 while it is active. The files it produced stay unless `files=true`."""
        await retention.delete(job_id, owner, files=with_files)
