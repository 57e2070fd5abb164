"""Jobs: submit, list, get."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_202_ACCEPTED

from app._deps import Owner, Service, provide_owner, provide_service
from app._jobs import JobFilter
from app._schemas import Job, JobPage, SubmitJob
from streams import JobStatus


class JobController(Controller):
    """The job resource."""

    path = "/api/v1/jobs"
    tags = ["jobs"]
    dependencies = {"service": Provide(provide_service, sync_to_thread=False),
                    "owner": Provide(provide_owner, sync_to_thread=False)}  # fmt: skip

    @post("/", status_code=HTTP_202_ACCEPTED, operation_id="submitJob")
    async def submit(self, data: JSONBody[SubmitJob], service: Service, owner: Owner) -> Job:
        """Queue a job; answers once the job is visible to GET."""
        return await service.submit(data, owner)

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
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        offset: Annotated[int, QueryParameter(ge=0)] = 0,
    ) -> JobPage:
        """The caller's jobs, newest first."""
        where = JobFilter(owner=owner, statuses=frozenset(status or ()), type=job_type, active=active)
        return await service.find(where, limit=limit, offset=offset)

    @get("/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: FromPath[str], service: Service, owner: Owner) -> Job:
        """One job."""
        return await service.get(job_id, owner)
