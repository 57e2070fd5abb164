"""Jobs: submit (one or a batch), list, get, children, cancel, retry, delete; in jobcast's words and
seed 003's."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from app._deps import Access, Commands, Owner, Queries, RetentionDep
from app._exceptions import StatusError
from app._queries import JobFilter
from app._schemas import MAX_INT, Job, JobPage, SubmitBatch, SubmitJob
from streams import JobStatus

MAX_PAGE_SIZE = 500
USER_PAGE_SIZE = 20
"""A page of GET /api/v1/jobs unless the request says otherwise (seed 003's per_page)."""
Page = Annotated[
    int | None,
    QueryParameter(
        ge=1, le=MAX_INT // MAX_PAGE_SIZE, description="Seed 003's paging: the page, from 1 (default 1)"
    ),
]
PerPage = Annotated[
    int | None, QueryParameter(ge=1, le=MAX_PAGE_SIZE, description="Seed 003's paging: jobs per page")
]
Limit = Annotated[
    int | None, QueryParameter(ge=1, le=MAX_PAGE_SIZE, description="Jobs per page (not with page/per_page)")
]
Offset = Annotated[int | None, QueryParameter(ge=0, le=MAX_INT, description="Jobs to skip (default 0)")]
TypeFilter = Annotated[str | None, QueryParameter(name="type", max_length=64)]
StatusFilter = Annotated[list[JobStatus] | None, QueryParameter(description="Repeat to match several")]
PollTimeout = Annotated[float, QueryParameter(ge=1, le=300, description="Seconds to wait at most")]
SeedTypeFilter = Annotated[
    str | None, QueryParameter(name="job_type", max_length=64, description="Seed 003's name of `type`")
]


def page_window(
    page: int | None, per_page: int | None, limit: int | None, offset: int | None, size: int
) -> tuple[int, int]:
    """The limit and offset a request asks for, given either way: page/per_page (seed 003) or
    limit/offset; both ways at once is a 400. `size` is the route's default page size."""
    if (page is not None or per_page is not None) and (limit is not None or offset is not None):
        raise StatusError("page through jobs with `page`/`per_page` or with `limit`/`offset`, not both")
    if limit is not None or offset is not None:
        return limit or size, offset or 0
    per_page = per_page or size
    return per_page, ((page or 1) - 1) * per_page


def type_filter(job_type: str | None, seed_job_type: str | None) -> str | None:
    """The type filter, by jobcast's name (`type`) or seed 003's (`job_type`); both is a 400."""
    if job_type is not None and seed_job_type is not None:
        raise StatusError("filter by `type` or by `job_type`, not both")
    return job_type if job_type is not None else seed_job_type


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
        commands: Commands,
        owner: Owner,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Job]:
        """Queue a job; answers once the job is visible to GET. Seed 003's `JobCreate` body works as it
        is (`job_type`, `parameters`), and the job carries its `JobResponse` fields."""
        return _accepted(*await commands.submit(data, owner, idempotency_key))

    @post("/batch", status_code=HTTP_202_ACCEPTED, operation_id="submitBatch", responses=EXISTING)
    async def submit_batch(
        self,
        data: JSONBody[SubmitBatch],
        commands: Commands,
        owner: Owner,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Job]:
        """Queue a batch: a parent job and one child per file or item; answers with the parent."""
        return _accepted(*await commands.submit_batch(data, owner, idempotency_key))

    @get("/", operation_id="listJobs")
    async def list_jobs(
        self,
        queries: Queries,
        owner: Owner,
        status: StatusFilter = None,
        job_type: TypeFilter = None,
        seed_job_type: SeedTypeFilter = None,
        active: FromQuery[bool] = False,
        parent_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
        include_children: FromQuery[bool] = False,
        page: Page = None,
        per_page: PerPage = None,
        limit: Limit = None,
        offset: Offset = None,
    ) -> JobPage:
        """The caller's jobs (an admin's too: its own), newest first; batch children only with
        `include_children` or `parent_id`. Pages of 20 by default, asked for by `page`/`per_page`
        (seed 003) or by `limit`/`offset`, not both; the answer states both."""
        where = JobFilter(
            owner=owner, statuses=frozenset(status or ()), type=type_filter(job_type, seed_job_type),
            active=active, parent_id=parent_id, include_children=include_children,
        )  # fmt: skip
        limit, offset = page_window(page, per_page, limit, offset, USER_PAGE_SIZE)
        return await queries.find(where, limit=limit, offset=offset)

    # By id, an admin reaches every owner's job; anyone else only their own (404 for the others').

    @get("/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: FromPath[str], queries: Queries, access: Access) -> Job:
        """One job; a pending one with its queue position."""
        return await queries.get(job_id, access)

    @get("/{job_id:str}/children", operation_id="listChildren")
    async def children(self, job_id: FromPath[str], queries: Queries, access: Access) -> list[Job]:
        """A batch's child jobs in submit order (empty for a single job)."""
        return await queries.children(job_id, access)

    @post("/{job_id:str}/cancel", status_code=HTTP_200_OK, operation_id="cancelJob")
    async def cancel(self, job_id: FromPath[str], commands: Commands, access: Access) -> Job:
        """Cancel a pending or running job (409 once it has ended)."""
        return await commands.cancel(job_id, access)

    @post("/{job_id:str}/retry", status_code=HTTP_200_OK, operation_id="retryJob")
    async def retry(self, job_id: FromPath[str], commands: Commands, access: Access) -> Job:
        """Run a failed or cancelled job again as a new attempt (409 otherwise)."""
        return await commands.retry(job_id, access)

    @delete("/{job_id:str}", status_code=HTTP_204_NO_CONTENT, operation_id="deleteJob")
    async def delete_job(
        self, job_id: FromPath[str], retention: RetentionDep, access: Access,
        with_files: Annotated[bool, QueryParameter(name="files", description="Delete the files it produced too")] = False,
    ) -> None:  # fmt: skip
        """Delete a finished job (a batch with its children) for good: its messages are purged from
        the stream. 409 while it is active. The files it produced stay unless `files=true`."""
        await retention.delete(job_id, access, files=with_files)
