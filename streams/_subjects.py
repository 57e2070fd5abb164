"""Subject names of the JOBS stream: the one place they are spelled."""

from __future__ import annotations

STREAM = "JOBS"
"""The single stream that carries submissions, events and control messages."""

SUBMIT_PREFIX = "jobs.submit"
EVENTS_PREFIX = "jobs.events"
CONTROL_PREFIX = "jobs.control"
SCHEDULE_PREFIX = "jobs.schedule"
FILES_PREFIX = "jobs.files"
DELETED_PREFIX = "jobs.deleted"

MIN_PRIORITY = -10
MAX_PRIORITY = 10
PRIORITIES = tuple(range(MAX_PRIORITY, MIN_PRIORITY - 1, -1))
"""Every priority, highest first: the order workers look for jobs in."""

BATCH_POOL = "batch"
"""A batch parent's pool: no worker consumes it (its submission goes to its events subject); its
state follows its children."""

PIPELINE_POOL = "pipeline"
"""A pipeline parent's pool: like a batch's, consumed by no worker; its children are its stages."""

PARENT_POOLS = frozenset({BATCH_POOL, PIPELINE_POOL})
"""The pools of jobs that only follow their children: in no queue, run by no worker."""

ALL_SUBJECTS = "jobs.>"
ALL_EVENTS = f"{EVENTS_PREFIX}.>"
ALL_CONTROL = f"{CONTROL_PREFIX}.>"

KIND_HEADER = "Jobcast-Kind"
"""Header naming the event kind, so `nats stream view` shows it without decoding."""

JOB_HEADER = "Jobcast-Job"
"""Header naming the job id."""


def priority_token(priority: int) -> str:
    """A priority as a subject token: p3, p0, m2 (minus two)."""
    return f"p{priority}" if priority >= 0 else f"m{-priority}"


def submit_subject(pool: str, priority: int, job_id: str) -> str:
    """Subject a job spec is published to: jobs.submit.<pool>.<priority>.<job_id>."""
    return f"{SUBMIT_PREFIX}.{pool}.{priority_token(priority)}.{job_id}"


def pool_submissions(pool: str, priority: int | None = None) -> str:
    """Filter subject of a pool's submissions (of one priority, or all of them)."""
    if priority is None:
        return f"{SUBMIT_PREFIX}.{pool}.>"
    return f"{SUBMIT_PREFIX}.{pool}.{priority_token(priority)}.*"


def files_subject(file_id: str) -> str:
    """Subject of a file's metadata events (stored, deleted); its bytes are in the object store."""
    return f"{FILES_PREFIX}.{file_id}"


def schedule_subject(job_id: str) -> str:
    """Subject of a job's scheduled submission, held by the stream until it is due."""
    return f"{SCHEDULE_PREFIX}.{job_id}"


def events_subject(job_id: str) -> str:
    """Subject of a job's lifecycle events."""
    return f"{EVENTS_PREFIX}.{job_id}"


def control_subject(job_id: str) -> str:
    """Subject of a job's control messages (cancel requests)."""
    return f"{CONTROL_PREFIX}.{job_id}"


def deleted_subject(job_id: str) -> str:
    """Subject of a deleted job's tombstone: the one message of it left after its purge."""
    return f"{DELETED_PREFIX}.{job_id}"


def job_subjects(job_id: str, pool: str, priority: int) -> list[str]:
    """Every subject a job's messages are on, its tombstone's aside; all literal, so a purge of
    each reads only that subject's messages."""
    return [
        submit_subject(pool, priority, job_id),
        schedule_subject(job_id),
        events_subject(job_id),
        control_subject(job_id),
    ]


def job_history_subjects(job_id: str) -> list[str]:
    """Filter subjects of every message a job has in the stream, its tombstone included, whatever
    its pool and priority (for reading a job's history, as `jobcast events replay` does)."""
    return [
        f"{SUBMIT_PREFIX}.*.*.{job_id}",
        schedule_subject(job_id),
        events_subject(job_id),
        control_subject(job_id),
        deleted_subject(job_id),
    ]


RUNNING_PREFIX = "jobcast.running"
"""Core NATS, outside the stream (never stored): the worker that runs a job answers requests on
`running_subject(job_id)` while it renews the job's message."""


def running_subject(job_id: str) -> str:
    """Subject on which a job's runner answers "who runs it?" (a worker the job was redelivered to asks)."""
    return f"{RUNNING_PREFIX}.{job_id}"


def job_id_of(subject: str) -> str:
    """The job id is always the last token of a jobs.* subject."""
    return subject.rsplit(".", 1)[-1]
