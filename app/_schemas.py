"""The API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

Title = Annotated[str, msgspec.Meta(max_length=500)]
Description = Annotated[str, msgspec.Meta(max_length=10_000)]


class SubmitJob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/v1/jobs."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    """The operation, e.g. `noop`."""
    params: dict[str, Any] = {}
    """Operation parameters, validated against the operation's schema."""
    title: Title = ""
    description: Description = ""
    file_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    """The input file, for operations that take one."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] | None = None
    """Runs before a transiently failing job fails for good; the operation's default when absent."""
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0


class Job(msgspec.Struct, kw_only=True):
    """A job as clients see it."""

    id: str
    type: str
    pool: str
    status: str
    title: str
    description: str
    params: dict[str, Any]
    file_id: str | None
    progress: float
    current_step: str
    result: dict[str, Any] | None
    error: str | None
    attempt: int
    max_attempts: int
    priority: int
    owner: str
    parent_id: str | None
    worker: str | None
    last_event_id: int
    """Stream sequence of the job's newest event: resume SSE from here with Last-Event-ID."""
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime


class JobPage(msgspec.Struct, kw_only=True):
    """A page of jobs, newest first."""

    items: list[Job]
    total: int
    limit: int
    offset: int


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


class EventEnvelope(msgspec.Struct, kw_only=True):
    """An event as SSE, WebSocket and poll clients receive it: the job's state after it, and
    the raw event from the stream."""

    seq: int
    job_id: str
    kind: str
    status: str
    progress: float
    current_step: str
    attempt: int
    ts: datetime
    event: msgspec.Raw


class Health(msgspec.Struct):
    """GET /health and /ready."""

    status: str
    nats: bool = True
    applied_seq: int = 0
    stream_seq: int = 0


class WsCommand(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A message a client sends on /api/v1/ws."""

    action: str
    """`subscribe` or `unsubscribe`."""
    job_ids: list[str] = []
    all: bool = False
    """Every job of the caller, present and future."""
    last_event_id: int | None = None
    """With `subscribe` to job ids: replay their events after this sequence first."""
