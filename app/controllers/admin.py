"""Admin: every owner's jobs, statistics, forced completion, cleanup, queue status."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.openapi.spec import Example
from litestar.params import Body, FromPath, FromQuery, QueryParameter
from litestar.status_codes import HTTP_200_OK

from app._auth import admin_only
from app._deps import Commands, Queries, RetentionDep, StatsDep
from app._queries import JobFilter
from app._schemas import CleanupReport, Job, JobPage, Statistics
from app.controllers.jobs import (
    Limit,
    Offset,
    Page,
    PerPage,
    SeedTypeFilter,
    StatusFilter,
    TypeFilter,
    page_window,
    type_filter,
)

ForceCompleteBody = Annotated[
    dict[str, Any] | None,
    Body(
        media_type=RequestEncodingType.JSON,
        description='`{"result": {...}}`, or (seed 003\'s `Body(None)`) the result object itself; '
        "an object whose one key is `result` is read the first way",
        examples=[
            Example(value={"result": {"text": "done by hand"}}),
            Example(value={"text": "done by hand"}),
        ],
    ),
]


def forced_result(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The result a force-complete body gives: jobcast's `{"result": {...} | null}`, or any other
    object, which seed 003's clients send as the result itself."""
    if body is not None and body.keys() == {"result"} and isinstance(body["result"], dict | None):
        wrapped: dict[str, Any] | None = body["result"]
        return wrapped
    return body


ADMIN_PAGE_SIZE = 50
"""A page of GET /api/v1/jobs/admin/all unless the request says otherwise (seed 003's per_page)."""


class AdminController(Controller):
    """Routes for operators (admin keys only, once keys exist; everyone in local mode)."""

    path = "/api/v1/jobs/admin"
    tags = ["admin"]
    guards = [admin_only]

    @get("/all", operation_id="adminListJobs")
    async def all_jobs(
        self,
        queries: Queries,
        status: StatusFilter = None,
        job_type: TypeFilter = None,
        seed_job_type: SeedTypeFilter = None,
        of_owner: Annotated[str | None, QueryParameter(name="owner", max_length=128)] = None,
        exhausted: Annotated[
            bool | None, QueryParameter(description="Failed because attempts ran out")
        ] = None,
        include_children: FromQuery[bool] = False,
        page: Page = None,
        per_page: PerPage = None,
        limit: Limit = None,
        offset: Offset = None,
    ) -> JobPage:
        """Jobs of every owner, newest first, in pages of 50 by default (`page`/`per_page` or
        `limit`/`offset`, as on GET /api/v1/jobs)."""
        where = JobFilter(
            owner=of_owner, statuses=frozenset(status or ()), type=type_filter(job_type, seed_job_type),
            exhausted=exhausted, include_children=include_children,
        )  # fmt: skip
        limit, offset = page_window(page, per_page, limit, offset, ADMIN_PAGE_SIZE)
        return await queries.find(where, limit=limit, offset=offset)

    @get("/statistics", operation_id="adminStatistics")
    async def statistics(self, stats: StatsDep) -> Statistics:
        """Overall and per job type: counts, success and failure rates, run time (avg, p50, p95) and
        queue wait; and the queue: pending and running jobs by type, live workers by pool."""
        return await stats.statistics()

    @post("/{job_id:str}/force-complete", status_code=HTTP_200_OK, operation_id="adminForceComplete")
    async def force_complete(
        self, job_id: FromPath[str], commands: Commands, data: ForceCompleteBody = None
    ) -> Job:
        """Mark an active job completed with the given result."""
        return await commands.force_complete(job_id, forced_result(data))

    @delete("/cleanup", status_code=HTTP_200_OK, operation_id="adminCleanup")
    async def cleanup(
        self,
        retention: RetentionDep,
        days_old: Annotated[int, QueryParameter(ge=0, le=36500)] = 30,
        failed_days_old: Annotated[
            int | None, QueryParameter(ge=0, le=36500, description="Delete failed jobs older than this too")
        ] = None,
        with_files: Annotated[
            bool, QueryParameter(name="files", description="Delete the files they produced too")
        ] = False,
    ) -> CleanupReport:
        """Delete completed and cancelled jobs that ended more than `days_old` days ago (their
        messages purged from the stream); failed ones are kept unless `failed_days_old` is given."""
        return await retention.cleanup(days_old, failed_days_old, files=with_files)

    @get("/queue-status", operation_id="adminQueueStatus")
    async def queue_status(self, stats: StatsDep) -> dict[str, Any]:
        """Pending jobs by type and pool, consumer state from JetStream, workers and their jobs."""
        return await stats.queue_status()
