"""Admin: every owner's jobs, statistics, forced completion, cleanup, queue status."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK

from app._auth import admin_only
from app._deps import RetentionDep, Service, StatsDep
from app._jobs import JobFilter
from app._schemas import MAX_INT, CleanupReport, ForceComplete, Job, JobPage, TypeStatistics
from streams import JobStatus


class AdminController(Controller):
    """Routes for operators (admin keys only, once keys exist; everyone in local mode)."""

    path = "/api/v1/jobs/admin"
    tags = ["admin"]
    guards = [admin_only]

    @get("/all", operation_id="adminListJobs")
    async def all_jobs(
        self,
        service: Service,
        status: Annotated[
            list[JobStatus] | None, QueryParameter(description="Repeat to match several")
        ] = None,
        job_type: Annotated[str | None, QueryParameter(name="type", max_length=64)] = None,
        of_owner: Annotated[str | None, QueryParameter(name="owner", max_length=128)] = None,
        exhausted: Annotated[
            bool | None, QueryParameter(description="Failed because attempts ran out")
        ] = None,
        include_children: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        offset: Annotated[int, QueryParameter(ge=0, le=MAX_INT)] = 0,
    ) -> JobPage:
        """Jobs of every owner, newest first."""
        where = JobFilter(
            owner=of_owner, statuses=frozenset(status or ()), type=job_type, exhausted=exhausted,
            include_children=include_children,
        )  # fmt: skip
        return await service.find(where, limit=limit, offset=offset)

    @get("/statistics", operation_id="adminStatistics")
    async def statistics(self, stats: StatsDep) -> dict[str, TypeStatistics]:
        """Per job type: counts, success and failure rates, run time (avg, p50, p95) and queue wait."""
        return await stats.statistics()

    @post("/{job_id:str}/force-complete", status_code=HTTP_200_OK, operation_id="adminForceComplete")
    async def force_complete(
        self, job_id: FromPath[str], service: Service, data: JSONBody[ForceComplete | None] = None
    ) -> Job:
        """Mark an active job completed with the given result."""
        return await service.force_complete(job_id, data.result if data else None)

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
