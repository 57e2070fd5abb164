"""The API's request and response bodies."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import KwargDefinition

from app._params_doc import OPERATION_PARAMS
from streams import MAX_ATTEMPTS, MAX_PRIORITY, MAX_TIMEOUT_S, MIN_PRIORITY, MIN_TIMEOUT_S, TaskState

MAX_INT = 2**62
"""Bound of integer query values, so none overflows SQLite's 64-bit integers."""

Title = Annotated[str, msgspec.Meta(max_length=500)]
Description = Annotated[str, msgspec.Meta(max_length=10_000)]
MaxAttempts = Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPTS)]
TimeoutS = Annotated[float, msgspec.Meta(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)]
Priority = Annotated[int, msgspec.Meta(ge=MIN_PRIORITY, le=MAX_PRIORITY)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
ClientTime = Annotated[
    str,
    KwargDefinition(format=OpenAPIFormat.DATE_TIME),
    msgspec.Meta(max_length=64, examples=["2026-12-24T18:00:00Z"]),
]
"""An RFC 3339 time, as the schema says: a string. Given as `datetime`, Litestar's lax conversion
would also take a number (seconds since 1970), which the schema does not offer; the service
parses it (`parse_time`)."""
CallbackUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2000)]


OperationName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, examples=["noop"])]
Params = Annotated[dict[str, Any], msgspec.Meta(examples=[{"steps": 3, "duration_s": 0.3}])]
SEED_JOB_TYPE = "Seed 003's name of `type` (the operation)"


StrictBool = Literal[True, False]
"""A JSON true or false, nothing else: Litestar decodes bodies laxly, and a plain `bool` would
take 0, 1, "true" or "0" too."""


class SubmitJob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/v1/jobs. Seed 003's `JobCreate` is accepted as it is: `job_type` for
    `type` and `parameters` for `params` (exactly one of `type` / `job_type`, at most one of
    `params` / `parameters`; both or neither is a 400)."""

    type: OperationName = ""
    """The operation, e.g. `noop` (required, unless given as `job_type`)."""
    job_type: Annotated[OperationName | None, msgspec.Meta(description=SEED_JOB_TYPE)] = None
    params: Annotated[Params | None, OPERATION_PARAMS] = None
    """Operation parameters, validated against the operation's schema (default `{}`)."""
    parameters: Annotated[
        Params | None, msgspec.Meta(description="Seed 003's name of `params`"), OPERATION_PARAMS
    ] = None
    title: Annotated[str, msgspec.Meta(max_length=500, examples=["a quick check"])] = ""
    description: Description | None = ""
    """Free text; `null` (as seed 003's clients send it) is the same as empty."""
    file_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    """The input file, for operations that take one."""
    max_attempts: MaxAttempts | None = None
    """Runs before a transiently failing job fails for good; the operation's default when absent."""
    timeout_s: TimeoutS | None = None
    """Run-time limit of each attempt in seconds (1 s to a week); past it the job is stopped and
    fails "timed out after N s". The operation's default when absent (docs/architecture.md, "Run-time limits")."""
    priority: Priority = 0
    """Higher runs first among the pending jobs of a pool (-10 to 10)."""
    client_request_id: RequestId | None = None
    """Idempotency key: the same owner and key return the existing job (also as Idempotency-Key)."""
    scheduled_for: ClientTime | None = None
    """Run no earlier than this time (UTC unless it says otherwise)."""
    callback_url: CallbackUrl | None = None
    """POSTed the job, signed, when it ends."""
    cache: StrictBool = True
    """Answer from the stage cache when the same input and params ran before, and keep the outputs
    there (cacheable operations only); false runs it anew and stores nothing."""

    def __post_init__(self) -> None:
        """Fold seed 003's names into jobcast's (a ValueError here is a 400 naming the problem)."""
        if bool(self.type) == (self.job_type is not None):
            raise ValueError("give exactly one of `type` or `job_type` (the operation)")
        if self.params is not None and self.parameters is not None:
            raise ValueError("give at most one of `params` or `parameters`")
        self.type, self.job_type = self.type or self.job_type or "", None
        self.params, self.parameters = self.params or self.parameters or {}, None


class BatchItem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One child of a batch given by params."""

    params: dict[str, Any] = {}
    title: Title = ""
    file_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class SubmitBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/v1/jobs/batch: one child job per file id or per item."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=64, examples=["noop"])]
    file_ids: (
        Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=1000)] | None
    ) = None
    items: (
        Annotated[list[BatchItem], msgspec.Meta(max_length=1000, examples=[[{"params": {"steps": 1}}, {}]])]
        | None
    ) = None
    params: dict[str, Any] = {}
    """Params shared by every child; an item's own params override them."""
    title: Title = ""
    description: Description = ""
    max_attempts: MaxAttempts | None = None
    timeout_s: TimeoutS | None = None
    """Run-time limit of each child's attempts, as for one job."""
    priority: Priority = 0
    client_request_id: RequestId | None = None
    scheduled_for: ClientTime | None = None
    callback_url: CallbackUrl | None = None
    cache: StrictBool = True
    """As for one job: false runs every child anew and stores nothing in the stage cache."""


MAX_STAGES = 10
"""Stages of one pipeline, at most."""


class PipelineStage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One stage of a pipeline: an operation and its params."""

    type: OperationName
    """The operation, e.g. `generate_srt`; its input is the stage before's main output."""
    params: Annotated[Params, OPERATION_PARAMS] = {}
    """The operation's params, validated against its schema."""


class SubmitPipeline(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /api/v1/pipelines: stages run in order on one input file, each taking the stage
    before's main output (`generate_srt` its .srt, `transcribe` its .json, `convert` its .mp4)."""

    file_id: Annotated[str, msgspec.Meta(max_length=64)]
    """The first stage's input file."""
    stages: Annotated[
        list[PipelineStage],
        msgspec.Meta(
            min_length=1,
            max_length=MAX_STAGES,
            examples=[[{"type": "generate_srt", "params": {}}, {"type": "fix_srt", "params": {}}]],
        ),
    ]
    title: Title = ""
    priority: Priority = 0
    """Higher runs first among the pending jobs of a pool (-10 to 10), for every stage."""
    callback_url: CallbackUrl | None = None
    """POSTed the pipeline, signed, when it ends."""
    cache: StrictBool = True
    """As for one job: false runs every stage anew and stores nothing in the stage cache."""


class QueuePosition(msgspec.Struct, kw_only=True):
    """Where a job stands in its pool's queue, as seed 001 counts it (app/_queue.py).

    Pending and retrying jobs wait in the queue (a retrying one keeps its submission's place and
    is taken again once its backoff ends); workers take them by priority, then in stream order.
    A running job is at the head: `{ahead: 0, total_active}`. A finished one (completed, failed,
    cancelled) is in no queue: `{ahead: 0, total_active: 0}`. A scheduled job joins the queue when
    it is due, and a batch parent is in none (its children are): theirs is null.
    """

    ahead: int
    """Jobs of the same pool a worker serves before this one: the pool's running jobs, and the
    pending or retrying ones of a higher priority, or of the same one submitted earlier."""
    total_active: int
    """The pool's jobs in the queue or held by a worker: pending, retrying and running (not
    scheduled ones, not yet due)."""


class Job(msgspec.Struct, kw_only=True):
    """A job as clients see it. It also carries seed 003's `JobResponse` names, worked out from
    jobcast's own: `job_type` (= `type`), `progress_percentage` (`progress` rounded down to an
    int), `progress_message` (= `current_step`) and `error_message` (= `error`)."""

    id: str
    type: str
    pool: str
    status: str
    title: str
    description: str
    params: dict[str, Any]
    file_id: str | None
    file_name: str | None
    """The input file's name when the job was submitted; it stays after the file is deleted."""
    progress: float
    current_step: str
    result: dict[str, Any] | None
    error: str | None
    attempt: int
    max_attempts: int
    timeout_s: float | None
    """The job's own run-time limit per attempt; None: its operation's default."""
    priority: int
    owner: str
    parent_id: str | None
    worker: str | None
    held_by: str | None
    """The worker still holding the job (it may not be deleted meanwhile)."""
    exhausted: bool
    """Failed because its attempts ran out."""
    client_request_id: str | None
    scheduled_for: datetime | None
    callback_url: str | None
    callback_status: str | None
    queue_position: QueuePosition | None
    """Null for a scheduled job and a batch parent (see QueuePosition)."""
    last_event_id: int
    """Stream sequence of the job's newest event: resume SSE from here with Last-Event-ID."""
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    job_type: Annotated[str, msgspec.Meta(description=SEED_JOB_TYPE)] = ""
    progress_percentage: Annotated[
        int, msgspec.Meta(description="Seed 003's progress: `progress` (0-100) rounded down to an int")
    ] = 0
    progress_message: Annotated[str, msgspec.Meta(description="Seed 003's name of `current_step`")] = ""
    error_message: Annotated[str | None, msgspec.Meta(description="Seed 003's name of `error`")] = None
    eta_s: float | None = None
    """A running job's seconds left, from the learned speed of its operation, model, device and
    compute type and its own progress; null before anything was measured and once it is not running."""
    estimated_start_s: float | None = None
    """A pending job's seconds until a worker takes it: the work ahead of it in its pool at the
    learned speeds, spread over the pool's live slots; null when any part of that is unknown."""

    def __post_init__(self) -> None:
        """Seed 003's names always say what jobcast's say."""
        self.job_type, self.progress_message, self.error_message = self.type, self.current_step, self.error
        self.progress_percentage = math.floor(self.progress)


class JobPage(msgspec.Struct, kw_only=True):
    """A page of jobs, newest first: `limit`/`offset` and, in seed 003's words, `page`/`per_page`."""

    items: list[Job]
    total: int
    """Jobs that match, on every page."""
    limit: int
    offset: int
    page: int = 1
    """The page `offset` falls on, counting from 1, in pages of `per_page` (exact when the request
    gave `page`)."""
    per_page: int = 0
    """= `limit`."""

    def __post_init__(self) -> None:
        """`page` and `per_page` follow from `limit` and `offset`."""
        self.per_page = self.limit
        self.page = self.offset // self.limit + 1 if self.limit > 0 else 1


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
    eta_s: float | None = None
    """The job's seconds left after this event (Job.eta_s): null unless it is running and measured."""


class SseMessage(msgspec.Struct, kw_only=True):
    """One Server-Sent Event of a job stream (its fields, as an SSE client reads them)."""

    data: str
    """One JSON object: an EventEnvelope on /events, a StatusUpdate on the Compileo stream."""
    event: str | None = None
    """The event's kind (`submitted`, `progress`, ...); absent on the Compileo stream."""
    id: str | None = None
    """The stream sequence, to resume from with Last-Event-ID."""


class QueueHealth(msgspec.Struct, kw_only=True):
    """Compileo's queue_health block, and the figures it is worked out from (docs/architecture.md)."""

    status: str
    """`unhealthy`: NATS does not answer, or work waits and no worker of any pool is live;
    `degraded`: some pool has work waiting and no live worker; else `healthy`."""
    resource_utilization: str
    """`high` from 90 % of the deployment's CPUs in use or 90 % of the live workers' slots busy."""
    limit_enforcement: str
    """`active`: per-key rate limit and stream quota both on; `partial`: one; `disabled`: neither."""
    pools: dict[str, str] = {}
    """Each pool's status: `degraded` when it has work waiting and no live worker, else `healthy`."""
    cpu_core_percent: float = 0.0
    """CPU use of the API and the live workers' processes, summed, each in percent of one core."""
    cpu_cores: float = 0.0
    """The CPUs those processes may use (affinity and cgroup quota), each machine's counted once."""
    busy_slots: int = 0
    """Slots of live workers running a job, of their `total_slots`."""
    total_slots: int = 0


class QueueStats(msgspec.Struct, kw_only=True):
    """GET /api/v1/jobs/queue/stats, in Compileo's shape."""

    pending_jobs: int
    running_jobs: int
    scheduled_jobs: int
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    retrying_jobs: int
    total_jobs: int
    queue_type: str
    cache_size: int
    """Models loaded in the live workers' caches (whisper: one per model, device and compute type)."""
    cpu_usage_percent: float
    """CPU use of the API and every live worker process over their last usage windows (a third of
    the worker TTL), in percent of the CPUs they may use (`queue_health.cpu_cores`): 0 to 100."""
    memory_usage_mb: float
    """Resident memory of the API process and every live worker process, summed."""
    active_workers: int
    """Workers whose heartbeat has not expired."""
    queue_health: QueueHealth


class TypeStatistics(msgspec.Struct, kw_only=True):
    """Admin statistics of one job type; times in seconds."""

    total: int
    counts: dict[str, int]
    success_rate: float | None
    failure_rate: float | None
    avg_run_s: float | None
    p50_run_s: float | None
    p95_run_s: float | None
    avg_queue_wait_s: float | None


class QueueSummary(msgspec.Struct, kw_only=True):
    """The queue, in the admin statistics: what waits and what runs, by type, and who runs it."""

    pending: int
    running: int
    pending_by_type: dict[str, int]
    running_by_type: dict[str, int]
    live_workers: int
    """Workers whose heartbeat has not expired."""
    workers_by_pool: dict[str, int]


class Statistics(msgspec.Struct, kw_only=True):
    """GET /api/v1/jobs/admin/statistics: seed 003's dashboard figures."""

    totals: TypeStatistics
    """Every job but batch parents (a batch counts as its children): `total`, `counts` by status,
    success and failure rates, and `avg_run_s`, the average processing time."""
    by_type: dict[str, TypeStatistics]
    """The same per job type (a batch parent's type is `batch_<type>`)."""
    queue: QueueSummary


class CleanupReport(msgspec.Struct, kw_only=True):
    """What DELETE /api/v1/jobs/admin/cleanup removed and kept."""

    days_old: int
    deleted: int
    """Top-level jobs deleted (a batch counts once, with its children)."""
    completed: int
    cancelled: int
    failed_kept: int
    """Failed jobs older than `days_old` that were kept (see `failed_days_old`)."""
    failed: int = 0
    """Failed jobs deleted (only with `failed_days_old`)."""
    files: int = 0
    """Files deleted with their jobs (only with `files=true`)."""


class FileInfo(msgspec.Struct, kw_only=True):
    """A stored file."""

    id: str
    name: str
    content_type: str
    size: int
    sha256: str
    job_id: str | None
    """The job that produced it; null for an upload."""
    owner: str
    created_at: datetime
    url: str
    """Where its bytes are served (Range requests work)."""


class FilePage(msgspec.Struct, kw_only=True):
    """A page of files, newest first."""

    items: list[FileInfo]
    total: int
    limit: int
    offset: int


class Health(msgspec.Struct):
    """GET /health and /ready."""

    status: str
    nats: bool = True
    applied_seq: int = 0
    stream_seq: int = 0
    tasks: dict[str, TaskState] | None = None
    """/ready: each supervised task (projection, key-watch, webhook-sweep) and its state."""


class WsCommand(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A message a client sends on /api/v1/ws."""

    action: str
    """`subscribe` or `unsubscribe`."""
    job_ids: list[str] = []
    all: bool = False
    """Every job of the caller, present and future."""
    last_event_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)] | None = None
    """With `subscribe`: replay the events after this sequence of the job ids (and with `all`, of
    every job of the caller) first."""
