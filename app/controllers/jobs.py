"""Jobs: submit, list, get."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import Parameter
from litestar.status_codes import HTTP_202_ACCEPTED

from app._deps import provide_owner, provide_service
from app._jobs import JobFilter, JobService
from app._schemas import Job, JobPage, SubmitJob
from streams import JobStatus


class JobController(Controller):
    """The job resource."""

    path = "/api/v1/jobs"
    tags = ["jobs"]
    dependencies = {"service": Provide(provide_service, sync_to_thread=False),
                    "owner": Provide(provide_owner, sync_to_thread=False)}  # fmt: skip

    @post("/", status_code=HTTP_202_ACCEPTED, operation_id="submitJob")
    async def submit(self, data: SubmitJob, service: JobService, owner: str) -> Job:
        """Queue a job; answers once the job is visible to GET."""
        return await service.submit(data, owner)

    @get("/", operation_id="listJobs")
    async def list_jobs(
        self,
        service: JobService,
        owner: str,
        status: Annotated[list[JobStatus] | None, Parameter(description="Repeat to match several")] = None,
        job_type: Annotated[str | None, Parameter(query="type", max_length=64)] = None,
        active: bool = False,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
        offset: Annotated[int, Parameter(ge=0)] = 0,
    ) -> JobPage:
        """The caller's jobs, newest first."""
        where = JobFilter(owner=owner, statuses=frozenset(status or ()), type=job_type, active=active)
        return await service.list(where, limit=limit, offset=offset)

    @get("/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: str, service: JobService, owner: str) -> Job:
        """One job."""
        return await service.get(job_id, owner)
