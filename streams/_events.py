"""Wire payloads of the JOBS stream: one tagged struct per event kind, one union, one codec.

JSON on the wire so `nats stream view JOBS` shows readable events; the tag field is
`kind`. Schemas evolve by appending fields with defaults, never by retyping.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec


class JobStatus(enum.StrEnum):
    """Statuses as clients see them."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"

    @property
    def terminal(self) -> bool:
        """Terminal states change only through an explicit retry."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset(set(JobStatus) - TERMINAL_STATUSES)


def utcnow() -> datetime:
    """Timezone-aware now, the only clock events use."""
    return datetime.now(UTC)


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    job_id: str
    attempt: int = 1
    ts: datetime = msgspec.field(default_factory=utcnow)

    status: ClassVar[JobStatus | None] = None
    """The status a job takes when this event applies; None leaves it unchanged."""

    @property
    def kind(self) -> str:
        """The event's tag, as on the wire."""
        return type(self).__struct_config__.tag  # type: ignore[return-value]


class Submitted(_Event, frozen=True, tag="submitted"):
    """The full job spec; published once per attempt on jobs.submit.<pool>.<id>."""

    type: str
    pool: str
    owner: str
    params: dict[str, Any] = {}
    title: str = ""
    description: str = ""
    file_id: str | None = None
    file_name: str | None = None
    """The input file's name at submit, so the job can name it after the file is deleted."""
    parent_id: str | None = None
    max_attempts: int = 3
    priority: int = 0
    created_at: datetime = msgspec.field(default_factory=utcnow)
    client_request_id: str | None = None
    """The submitter's idempotency key; the job id is derived from it."""
    scheduled_for: datetime | None = None
    """Run no earlier than this; the stream holds the submission until then."""
    callback_url: str | None = None
    """POSTed the job when it ends."""
    timeout_s: float | None = None
    """Run-time limit of each attempt in seconds; None: the operation's default."""
    cache: bool = True
    """A cacheable operation may be answered from the stage cache, and stores its outputs there;
    False runs it anew and stores nothing."""
    waiting: bool = False
    """A pipeline stage recorded before its turn: published to the job's events subject, not to its
    pool, so it holds no worker; the job is `scheduled` until the same attempt's submission proper
    (`waiting` false, its input the stage before's main output) goes to the pool."""

    status = JobStatus.PENDING


class Started(_Event, frozen=True, tag="started"):
    """A worker took the job; `delivery` counts JetStream deliveries of this attempt's message."""

    worker: str
    delivery: int = 1

    status = JobStatus.RUNNING


class Progress(_Event, frozen=True, tag="progress"):
    """Throttled progress: percent 0-100 and a human-readable step."""

    progress: float
    step: str = ""
    eta_s: float | None = None
    """Seconds of work left, from the learned speed of the operation (streams.Speed) and the job's
    own so far; None while nothing has been measured (never a made-up figure)."""

    status = JobStatus.RUNNING


class Completed(_Event, frozen=True, tag="completed"):
    """The job succeeded; `result` is operation specific."""

    result: dict[str, Any] | None = None
    worker: str | None = None
    """The worker that ran it; None when an admin completed it by hand."""

    status = JobStatus.COMPLETED


class Failed(_Event, frozen=True, tag="failed"):
    """The job failed for good (permanent error, or its attempts ran out)."""

    error: str
    worker: str | None = None
    """The worker that gave up on it."""
    exhausted: bool = False
    """True when the job failed because its attempts ran out."""

    status = JobStatus.FAILED


class Retrying(_Event, frozen=True, tag="retrying"):
    """A transient failure; the job comes back after `delay_s`."""

    error: str
    delay_s: float = 0.0
    worker: str | None = None

    status = JobStatus.RETRYING


class CancelRequested(_Event, frozen=True, tag="cancel_requested"):
    """Someone asked to cancel; published on jobs.control.<id>."""

    reason: str = ""


class Cancelled(_Event, frozen=True, tag="cancelled"):
    """The job stopped because it was cancelled."""

    reason: str = ""
    worker: str | None = None
    """The worker that stopped it; None when the API cancelled a job no worker held."""

    status = JobStatus.CANCELLED


class Deleted(_Event, frozen=True, tag="deleted"):
    """The job (and a batch's children) leave the projection: the tombstone published on
    jobs.deleted.<id> once every other subject of theirs has been purged; it expires (Nats-TTL)."""

    files: bool = False
    """Delete the files the job produced as well."""


class CallbackResult(_Event, frozen=True, tag="callback"):
    """The outcome of POSTing the finished job to its callback_url."""

    delivered: bool
    tries: int
    error: str = ""
    http_status: int | None = None


class FileStored(_Event, frozen=True, tag="file_stored"):
    """A file's bytes are in the object store under `file_id`; `job_id` is the job that produced
    it, empty for an upload."""

    file_id: str
    owner: str
    name: str
    content_type: str
    size: int
    sha256: str


class FileDeleted(_Event, frozen=True, tag="file_deleted"):
    """A file and its bytes are gone."""

    file_id: str


Event = (
    Submitted
    | Started
    | Progress
    | Completed
    | Failed
    | Retrying
    | CancelRequested
    | Cancelled
    | Deleted
    | CallbackResult
    | FileStored
    | FileDeleted
)
"""Everything that travels on the JOBS stream."""

TERMINAL_EVENTS = (Completed, Failed, Cancelled)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """Encode an event as JSON."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode an event; raises msgspec.DecodeError / ValidationError on a foreign payload."""
    return _decoder.decode(data)


def is_terminal(event: Event) -> bool:
    """Whether the event ends its attempt."""
    return isinstance(event, TERMINAL_EVENTS)


def released_by_worker(event: Event) -> bool:
    """Whether a worker published this event as it let go of the job."""
    return isinstance(event, (*TERMINAL_EVENTS, Retrying)) and event.worker is not None
