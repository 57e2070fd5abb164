"""The Compileo jobs API's shapes (seed 004), and how a jobcast job and its events map onto them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from app._schemas import EventEnvelope, Job
from streams import JobStatus

_envelope_decoder = msgspec.json.Decoder(EventEnvelope)

COMPILEO_STATUS = {
    JobStatus.SCHEDULED: JobStatus.PENDING,
    JobStatus.RETRYING: JobStatus.RUNNING,
}
"""Compileo knows five statuses; a scheduled job is still pending, a retrying one still running."""


class JobStatusView(msgspec.Struct, kw_only=True):
    """The Compileo status shape (GET /api/v1/jobs/status/{id})."""

    job_id: str
    status: str
    progress: float
    current_step: str
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime


class StatusUpdate(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message of the Compileo status stream; `error` appears only when there is one."""

    job_id: str
    status: str
    progress: float
    current_step: str
    timestamp: datetime
    result: dict[str, Any] | None = None
    error: str | None = None


def compileo_status_name(status: str) -> str:
    """A jobcast status as one of Compileo's five."""
    return str(COMPILEO_STATUS.get(JobStatus(status), status))


def compileo_status(job: Job) -> JobStatusView:
    """A job in the Compileo status shape."""
    return JobStatusView(
        job_id=job.id, status=COMPILEO_STATUS.get(JobStatus(job.status), job.status), progress=job.progress,
        current_step=job.current_step, result=job.result, error=job.error, created_at=job.created_at,
        started_at=job.started_at, completed_at=job.completed_at, updated_at=job.updated_at,
    )  # fmt: skip


def compileo_update(payload: bytes, job: Job) -> StatusUpdate:
    """One Compileo stream message from an event envelope; result and error only at the end."""
    env = _envelope_decoder.decode(payload)
    status = COMPILEO_STATUS.get(JobStatus(env.status), env.status)
    final = JobStatus(env.status).terminal
    return StatusUpdate(
        job_id=env.job_id, status=status, progress=env.progress, current_step=env.current_step,
        timestamp=env.ts, result=job.result if final else None,
        error=job.error if env.status == JobStatus.FAILED else None,
    )  # fmt: skip
