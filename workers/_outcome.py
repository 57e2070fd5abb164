"""How an attempt ends: the event a finished handler's task (or its stop) turns into.

Kept apart from the runtime's plumbing: the rules here (which failures retry, which fail,
what a timeout is, the bound of a result) are the worker's protocol, in one place.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import msgspec

from streams import (
    MAX_RESULT_BYTES,
    OPERATIONS,
    Cancelled,
    Completed,
    Event,
    Failed,
    OperationSpec,
    Retrying,
    Submitted,
    clip_error,
    result_size,
    utcnow,
)
from workers._errors import JobCancelledError, PermanentError, Retry
from workers._running import RunningJob, seconds_text
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

DEFAULT_TIME_LIMIT_S = 3600.0
"""Run-time limit of a job whose handler has no operation spec (one given to Worker directly)."""


def time_limit(job: Submitted, spec: OperationSpec | None) -> tuple[float, float]:
    """The run-time limit of the job's attempts, and what it grows by per second of media: the
    job's own `timeout_s`, else its operation's default (a handler without a spec: an hour)."""
    if job.timeout_s is not None:
        return job.timeout_s, 0.0
    if spec is None:
        return DEFAULT_TIME_LIMIT_S, 0.0
    return spec.timeout_s, spec.timeout_per_media_s


def outcome_of(running: RunningJob, ids: dict[str, Any], delivery: int, settings: WorkerSettings) -> Event:
    """How the handler's finished task ends the attempt."""
    assert running.task is not None
    assert running.task.done()
    job = running.ctx.job
    if running.shutdown:
        return Retrying(**ids, error="worker shutting down; the job will run again", delay_s=0.0)
    if running.timed_out_after is not None:
        error = f"timed out after {seconds_text(running.timed_out_after)} s"
        spec = OPERATIONS.get(job.type)
        if spec is not None and spec.timeout_transient:
            return retry_or_give_up(ids, job, delivery, error, settings)
        return Failed(**ids, error=error)
    if running.cancel_reason is not None:
        return Cancelled(**ids, reason=running.cancel_reason)
    exc = running.task.exception()  # raises CancelledError if something else cancelled it
    if exc is None:
        return completed(ids, running.task.result())
    if isinstance(exc, JobCancelledError):
        return Cancelled(**ids, reason="cancelled")
    if isinstance(exc, PermanentError):
        return Failed(**ids, error=clip_error(str(exc) or type(exc).__name__))
    error = str(exc) or type(exc).__name__
    if not isinstance(exc, Retry):
        log.error("job %s (%s) raised", job.job_id, job.type, exc_info=exc, extra={"job_id": job.job_id})
        error = f"{type(exc).__name__}: {error}"
    return retry_or_give_up(
        ids, job, delivery, error, settings, exc.defer if isinstance(exc, Retry) else None
    )


def completed(ids: dict[str, Any], result: dict[str, Any] | None) -> Event:
    """A `completed` event, or `failed` when the result breaks the bound of a message."""
    try:
        size = result_size(result)
    except (TypeError, msgspec.EncodeError) as exc:
        return Failed(**ids, error=clip_error(f"the result cannot be encoded as JSON: {exc}"))
    if size > MAX_RESULT_BYTES:
        return Failed(
            **ids, error=f"the result is {size} bytes, over the {MAX_RESULT_BYTES}-byte bound of a job "
            "result; large outputs belong in files",
        )  # fmt: skip
    return Completed(**ids, result=result)


def retry_or_give_up(
    ids: dict[str, Any], job: Submitted, delivery: int, error: str, settings: WorkerSettings,
    defer: float | None = None,
) -> Event:  # fmt: skip
    """A transient failure: another attempt later, or the end once `max_attempts` are used."""
    if delivery >= job.max_attempts:
        return Failed(
            **ids, error=clip_error(f"gave up after {delivery} attempt(s): {error}"), exhausted=True
        )
    delay = backoff(settings, delivery) if defer is None else defer
    return Retrying(**ids, error=clip_error(error), delay_s=delay)


def backoff(settings: WorkerSettings, delivery: int) -> float:
    """Exponential backoff with full jitter in its upper half."""
    ceiling = min(settings.retry_max_s, settings.retry_base_s * 2 ** (delivery - 1))
    return round(random.uniform(ceiling / 2, ceiling), 3)


def restamped(event: Event, note: str | None) -> Event:
    """The event as of now, with `note` added to its error or reason."""
    event = msgspec.structs.replace(event, ts=utcnow())
    if note is None:
        return event
    if isinstance(event, Failed | Retrying):
        return msgspec.structs.replace(event, error=f"{event.error}; {note}")
    if isinstance(event, Cancelled):
        return msgspec.structs.replace(event, reason=f"{event.reason}; {note}")
    return event
