"""The projection's rules: how one event changes a job's row.

Pure functions of the row and the event (no database, no clock), so that a database rebuilt
from the stream holds the same rows however its batches fell.
"""

from __future__ import annotations

from app._db import JobRow, job_record
from streams import (
    CallbackResult,
    Cancelled,
    CancelRequested,
    Completed,
    Event,
    Failed,
    JobStatus,
    Progress,
    Retrying,
    Started,
    Submitted,
    is_terminal,
    released_by_worker,
)


def fold(job: JobRow | None, event: Event, seq: int) -> tuple[JobRow | None, bool]:
    """Apply one event to a job row (creating it for a submission).

    Returns the row and whether the event ended the job's current attempt. Events of an
    older attempt, and events after the end that no new submission preceded, are recorded
    but change nothing.
    """
    if isinstance(event, Submitted):
        return _submitted(job, event, seq), False
    if job is None:
        return None, False  # events of a job the projection never saw (deleted): nothing to update
    job.last_seq = seq
    if released_by_worker(event) and event.attempt >= job.attempt:
        job.held_by = None
    if isinstance(event, CallbackResult):
        if event.attempt == job.attempt:
            job.callback_status = "delivered" if event.delivered else "failed"
        return job, False
    finished = JobStatus(job.status).terminal
    if event.attempt < job.attempt or (finished and event.attempt == job.attempt):
        return job, False
    if finished and not isinstance(event, CancelRequested):
        # Only a new submission (a retry) reopens an ended job. A run that began before the end
        # was stored (a worker given the job again while its first runner, out of reach, still
        # ran it) ends nothing more: one end, and one webhook, per submission.
        return job, False
    match event:
        case Started():
            job.status, job.attempt, job.worker = JobStatus.RUNNING, event.attempt, event.worker
            job.held_by, job.started_at, job.progress, job.current_step = (
                event.worker,
                event.ts,
                0.0,
                "started",
            )
            job.error = job.completed_at = None
        case Progress():
            job.status, job.progress, job.current_step = JobStatus.RUNNING, event.progress, event.step
            job.eta_s = event.eta_s
        case Retrying():
            job.status, job.attempt, job.error = JobStatus.RETRYING, event.attempt, event.error
            job.current_step = f"retrying in {event.delay_s:.1f} s: {event.error}"
        case CancelRequested():
            job.current_step = "cancel requested"
        case Completed():
            job.status, job.result, job.progress = JobStatus.COMPLETED, event.result, 100.0
            job.current_step = "completed"
        case Failed():
            job.status, job.error, job.current_step = JobStatus.FAILED, event.error, "failed"
            job.exhausted = event.exhausted
        case Cancelled():
            job.status, job.current_step = JobStatus.CANCELLED, "cancelled"
            job.error = event.reason or None
        case _:
            return job, False
    if not isinstance(event, Progress | CancelRequested):
        job.eta_s = None  # an estimate is of a running attempt, said by its progress events
    if is_terminal(event):
        job.attempt, job.completed_at = max(job.attempt, event.attempt), event.ts
    job.updated_at = event.ts
    return job, is_terminal(event)


def _submitted(job: JobRow | None, event: Submitted, seq: int) -> JobRow | None:
    waits = event.scheduled_for is not None and event.scheduled_for > event.ts
    scheduled = waits or event.waiting
    if job is None and event.attempt > 1:
        # A retry of a job this projection does not have: it was deleted (its first submission
        # purged) after whoever retried it last looked. A job comes into being only by its first.
        return None
    if job is None:
        job = job_record(  # the columns not named here are None until the lines below set them
            {
                "id": event.job_id, "type": event.type, "pool": event.pool, "owner": event.owner,
                "title": event.title, "description": event.description, "params": event.params,
                "file_id": event.file_id, "parent_id": event.parent_id, "max_attempts": event.max_attempts,
                "timeout_s": event.timeout_s, "priority": event.priority, "submit_seq": seq,
                "created_at": event.created_at, "exhausted": False, "client_request_id": event.client_request_id,
                "scheduled_for": event.scheduled_for, "callback_url": event.callback_url,
                "file_name": event.file_name, "cache": event.cache,
                "callback_status": "pending" if event.callback_url else None,
            }
        )  # fmt: skip
    elif event.attempt < job.attempt or (event.attempt == job.attempt and job.status != JobStatus.SCHEDULED):
        # A duplicate, or a scheduled submission the server has just released for an
        # attempt that already ended (e.g. cancelled while it waited).
        job.last_seq = seq
        return job
    if job.status == JobStatus.SCHEDULED and event.attempt == job.attempt and not event.waiting:
        scheduled = (
            False  # the stream (or the stage before, for a pipeline's stage) released it: it is due now
        )
    job.status = JobStatus.SCHEDULED if scheduled else JobStatus.PENDING
    job.attempt = event.attempt
    job.progress, job.eta_s = 0.0, None
    if not scheduled:
        job.current_step = "queued"
    elif event.waiting:
        job.current_step = "waiting for the stage before"
    else:
        job.current_step = f"scheduled for {event.scheduled_for:%Y-%m-%d %H:%M:%S} UTC"
    # A stage's input is known once the stage before has completed: its submission proper names it.
    job.file_id, job.file_name = event.file_id, event.file_name
    job.result = job.error = job.completed_at = None
    job.exhausted = False
    job.queue_seq = seq
    job.last_seq, job.updated_at = seq, event.ts
    return job
