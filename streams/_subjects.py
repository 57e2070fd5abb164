"""Subject names of the JOBS stream: the one place they are spelled."""

from __future__ import annotations

STREAM = "JOBS"
"""The single stream that carries submissions, events and control messages."""

SUBMIT_PREFIX = "jobs.submit"
EVENTS_PREFIX = "jobs.events"
CONTROL_PREFIX = "jobs.control"

ALL_SUBJECTS = "jobs.>"
ALL_EVENTS = f"{EVENTS_PREFIX}.>"
ALL_CONTROL = f"{CONTROL_PREFIX}.>"

KIND_HEADER = "Jobcast-Kind"
"""Header naming the event kind, so `nats stream view` shows it without decoding."""

JOB_HEADER = "Jobcast-Job"
"""Header naming the job id."""


def submit_subject(pool: str, job_id: str) -> str:
    """Subject a job spec is published to; workers of `pool` consume it."""
    return f"{SUBMIT_PREFIX}.{pool}.{job_id}"


def pool_submissions(pool: str) -> str:
    """Filter subject of a pool's worker consumer."""
    return f"{SUBMIT_PREFIX}.{pool}.>"


def events_subject(job_id: str) -> str:
    """Subject of a job's lifecycle events."""
    return f"{EVENTS_PREFIX}.{job_id}"


def control_subject(job_id: str) -> str:
    """Subject of a job's control messages (cancel requests)."""
    return f"{CONTROL_PREFIX}.{job_id}"


def job_id_of(subject: str) -> str:
    """The job id is always the last token of a jobs.* subject."""
    return subject.rsplit(".", 1)[-1]
