"""Job commands: submit (one job or a batch), cancel, retry and an admin's force-complete, each
published to the job log and answered once the projection has applied it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app._db import FileRow, JobRow
from app._exceptions import ConflictError, not_found
from app._pipelines import PipelineCommands, resubmission
from app._publisher import Publisher, TombstonedError
from app._queries import JobQueries
from app._schemas import BatchItem, Job, SubmitBatch, SubmitJob
from streams import (
    ACTIVE_STATUSES,
    BATCH_POOL,
    MAX_RESULT_BYTES,
    OPERATIONS,
    PARENT_POOLS,
    PIPELINE_POOL,
    Cancelled,
    CancelRequested,
    Completed,
    InvalidParamsError,
    JobStatus,
    OperationSpec,
    Submitted,
    check_llm_endpoint,
    operation,
    result_size,
    validate_params,
)


class JobCommands:
    """Changes to jobs: each is an event published to JetStream, then read back from SQLite."""

    def __init__(self, publisher: Publisher, queries: JobQueries) -> None:
        self.publisher = publisher
        self.queries = queries
        self.settings = publisher.settings
        self.pipelines = PipelineCommands(publisher, queries)

    async def submit(
        self, body: SubmitJob, owner: str, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Validate and publish one submission; returns the job once the projection has it, and
        whether it is new (False: the idempotency key named an existing job)."""
        spec = operation(body.type)
        params = validate_params(spec, body.params, self.settings.llm_endpoints)
        file_name = await self._check_input(spec, body.file_id, owner, "`$.file_id`")
        scheduled_for = _utc(body.scheduled_for)
        key = body.client_request_id or idempotency_key
        if key and (existing := self.queries.keyed(owner, key)) is not None:
            return existing, False
        await self.publisher.check_storage()
        for job_id in _candidate_ids(owner, key):
            event = Submitted(
                job_id=job_id, type=spec.name, pool=spec.pool, owner=owner, params=params, title=body.title,
                description=body.description or "", file_id=body.file_id, priority=body.priority,
                max_attempts=body.max_attempts or spec.max_attempts, client_request_id=key,
                scheduled_for=scheduled_for, callback_url=body.callback_url,
                timeout_s=body.timeout_s, file_name=file_name, cache=body.cache,
            )  # fmt: skip
            with self.publisher.projection.expecting(job_id):
                try:
                    ack = await self.publisher.publish(event, fresh=key is not None)
                except TombstonedError:
                    continue  # the key's job of this id was deleted: the next id is a new job
                handoff = await self.publisher.applied(ack.seq, job_id)
            if handoff is not None and handoff.row.owner == owner:
                return self.queries.submitted(handoff.row, handoff.position), not ack.duplicate
            if (job := await self.queries.existing(job_id, owner)) is not None:
                return job, not ack.duplicate  # not handed over: read it back
            if not ack.duplicate:
                raise not_found("job", job_id)
            # A duplicate of a submission whose job is gone (deleted, its tombstone expired
            # within the duplicate window): the next id.
        raise _key_exhausted(key)

    async def submit_batch(
        self, body: SubmitBatch, owner: str, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """A parent job and one child per file id or item, each an ordinary job of its pool."""
        spec = operation(body.type)
        if (body.file_ids is None) == (body.items is None):
            raise InvalidParamsError("give exactly one of `file_ids` or `items` - at `$`")
        items = body.items if body.items is not None else [BatchItem(file_id=f) for f in body.file_ids or []]
        if not items:
            raise InvalidParamsError("a batch needs at least one file or item - at `$.items`")
        names = []
        for index, item in enumerate(items):
            where = f"`$.file_ids[{index}]`" if body.file_ids is not None else f"`$.items[{index}].file_id`"
            names.append(await self._check_input(spec, item.file_id, owner, where))
        check_llm_endpoint(spec, body.params, self.settings.llm_endpoints)  # named where it was given
        children_params = []
        for index, item in enumerate(items):
            try:
                merged = {**body.params, **item.params}
                children_params.append(validate_params(spec, merged, self.settings.llm_endpoints))
            except InvalidParamsError as exc:
                raise InvalidParamsError(
                    str(exc).replace("`$.params", f"`$.items[{index}].params", 1)
                ) from None
        scheduled_for = _utc(body.scheduled_for)
        key = body.client_request_id or idempotency_key
        if key and (existing := self.queries.keyed(owner, key)) is not None:
            return existing, False
        await self.publisher.check_storage()
        common: dict[str, Any] = {
            "owner": owner, "priority": body.priority, "max_attempts": body.max_attempts or spec.max_attempts,
            "scheduled_for": scheduled_for,
        }  # fmt: skip
        for parent_id in _candidate_ids(owner, key):
            parent = Submitted(
                job_id=parent_id, type=f"batch_{spec.name}", pool=BATCH_POOL, params={"type": spec.name,
                "params": body.params, "count": len(items)}, title=body.title, description=body.description,
                client_request_id=key, callback_url=body.callback_url, **(common | {"max_attempts": 1}),
            )  # fmt: skip
            try:
                ack = await self.publisher.publish(parent, fresh=key is not None)
            except TombstonedError:
                continue
            if not ack.duplicate:
                break
            await self.publisher.applied(ack.seq, parent_id)
            if await self.queries.existing(parent_id, owner) is not None:
                break  # a concurrent duplicate: its children are duplicates too
        else:
            raise _key_exhausted(key)
        children = [
            Submitted(
                job_id=str(uuid.uuid5(uuid.UUID(parent_id), str(index))),
                type=spec.name,
                pool=spec.pool,
                params=params,
                title=item.title or f"{body.title or spec.name} #{index + 1}",
                file_id=item.file_id,
                file_name=name,
                parent_id=parent_id,
                timeout_s=body.timeout_s,
                cache=body.cache,
                **common,
            )
            for index, (item, params, name) in enumerate(zip(items, children_params, names, strict=True))
        ]
        acks = await asyncio.gather(*(self.publisher.publish(child) for child in children))
        await self.publisher.applied(max([ack.seq, *(a.seq for a in acks)]), parent_id)
        return await self.queries.get(parent_id, owner), not ack.duplicate

    async def cancel(self, job_id: str, owner: str | None, reason: str = "cancelled by request") -> Job:
        """Cancel an active job (a batch: its active children too). Queued jobs end at once; a
        running job is stopped by its worker, which publishes `cancelled`."""
        async with self.queries.db.session() as session:
            row = await self.queries.row(session, job_id, owner)
            if JobStatus(row.status).terminal:
                raise ConflictError(
                    f"job {job_id} is already {row.status}; only active jobs can be cancelled"
                )
            children = await self._active_children(session, job_id)
        # The parent first: once it is cancelled, its children's cancels cannot make it `failed`.
        first = await self._cancel_one(row, reason)
        seqs = await asyncio.gather(*(self._cancel_one(child, reason) for child in children))
        await self.publisher.applied(max([first, *seqs]), job_id)
        return await self.queries.get(job_id, owner)

    async def _cancel_one(self, row: JobRow, reason: str) -> int:
        ack = await self.publisher.publish(CancelRequested(job_id=row.id, attempt=row.attempt, reason=reason))
        if row.status == JobStatus.RUNNING and row.pool not in PARENT_POOLS:
            return ack.seq  # its worker stops it and says so
        ended = Cancelled(job_id=row.id, attempt=row.attempt, reason=reason)
        return (await self.publisher.publish(ended, msg_id=f"{row.id}:{row.attempt}:cancelled:api")).seq

    async def retry(self, job_id: str, owner: str | None) -> Job:
        """Run a failed or cancelled job again as a new attempt (a batch: its unfinished children)."""
        async with self.queries.db.session() as session:
            row = await self.queries.row(session, job_id, owner)
            if row.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise ConflictError(
                    f"job {job_id} is {row.status}; only failed or cancelled jobs can be retried"
                )
            if row.pool == PIPELINE_POOL:
                return await self.pipelines.retry(row, owner)  # from its first stage that did not complete
            await self.pipelines.refuse_stage(session, row)
            children = list(
                await session.scalars(
                    select(JobRow)
                    .where(
                        JobRow.parent_id == job_id, JobRow.status.in_([JobStatus.FAILED, JobStatus.CANCELLED])
                    )
                    .order_by(JobRow.submit_seq)
                )
            )
        for each in (row, *children):  # the allowlist may have changed since the job was submitted
            if (spec := OPERATIONS.get(each.type)) is not None:
                check_llm_endpoint(spec, each.params, self.settings.llm_endpoints)
        await self.publisher.check_storage()
        acks = [await self.publisher.publish(resubmission(row))]
        acks += await asyncio.gather(*(self.publisher.publish(resubmission(child)) for child in children))
        await self.publisher.applied(max(a.seq for a in acks), job_id)
        return await self.queries.get(job_id, owner)

    async def force_complete(self, job_id: str, result: dict[str, Any] | None) -> Job:
        """Admin: mark an active job completed with `result`; a worker running it is told to stop."""
        if (size := result_size(result)) > MAX_RESULT_BYTES:
            raise InvalidParamsError(
                f"a result is at most {MAX_RESULT_BYTES} bytes of JSON; this one is {size} - at `$.result`"
            )
        async with self.queries.db.session() as session:
            row = await self.queries.row(session, job_id, None)
            children = await self._active_children(session, job_id)
        if JobStatus(row.status).terminal:
            raise ConflictError(f"job {job_id} is already {row.status}")
        done = Completed(job_id=job_id, attempt=row.attempt, result=result)
        ack = await self.publisher.publish(done, msg_id=f"{job_id}:{row.attempt}:completed:admin")
        # Then stop a worker that runs it: its `cancelled` comes after `completed` and changes nothing.
        reason = "force-completed by an admin"
        await self.publisher.publish(CancelRequested(job_id=job_id, attempt=row.attempt, reason=reason))
        # A parent's (batch, pipeline) active children are work nobody waits for any more: they end
        # as a cancel ends them, after the parent's `completed`, so they cannot move it.
        seqs = await asyncio.gather(*(self._cancel_one(child, reason) for child in children))
        await self.publisher.applied(max([ack.seq, *seqs]), job_id)
        return await self.queries.get(job_id, None)

    @staticmethod
    async def _active_children(session: AsyncSession, job_id: str) -> list[JobRow]:
        """A parent's children that have not ended (none for a job that is no parent)."""
        return list(
            await session.scalars(
                select(JobRow).where(JobRow.parent_id == job_id, JobRow.status.in_(sorted(ACTIVE_STATUSES)))
            )
        )

    async def _check_input(
        self, spec: OperationSpec, file_id: str | None, owner: str, where: str
    ) -> str | None:
        """An operation that reads a file needs one, and it must be the caller's; returns its name."""
        if not spec.needs_file:
            return None
        if file_id is None:
            raise InvalidParamsError(
                f"operation {spec.name!r} needs an input file: upload it, then give its id - at {where}"
            )
        async with self.queries.db.session() as session:
            row = await session.get(FileRow, file_id)
        if row is None or row.owner != owner:
            raise not_found("file", file_id)
        return row.name


_IDEMPOTENCY_NAMESPACE = uuid.UUID("0f0b7a54-5b0e-4d43-8c36-8a1f7a2a6a11")
MAX_KEY_GENERATIONS = 64
"""A key names at most this many jobs in turn, each deleted before the next (see `_candidate_ids`)."""


def _job_id(owner: str, key: str | None, generation: int = 0) -> str:
    """A random id, or with an idempotency key one derived from owner and key, so concurrent
    duplicates collide on the same id (and on the same Nats-Msg-Id). Each time the key's job is
    deleted, the key moves on to its next generation: a resubmission is a new job, never the
    deleted one, so nothing meant for the old job (a client's late cancel) reaches the new one."""
    if key is None:
        return str(uuid.uuid4())
    return str(
        uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{owner}\n{key}" + (f"\n{generation}" if generation else ""))
    )


def _candidate_ids(owner: str, key: str | None) -> Iterator[str]:
    """The ids a submission tries in turn: one random id, or the key's ids by generation (the
    server refuses the ids of deleted jobs while their tombstones last)."""
    if key is None:
        yield _job_id(owner, None)
        return
    for generation in range(MAX_KEY_GENERATIONS):
        yield _job_id(owner, key, generation)


def _key_exhausted(key: str | None) -> ConflictError:
    return ConflictError(
        f"client_request_id {key!r} already named {MAX_KEY_GENERATIONS} jobs that were deleted; use a new one"
    )


def _utc(given: str | None) -> datetime | None:
    """A client's RFC 3339 time in UTC; a naive one is taken to be UTC already."""
    if given is None:
        return None
    try:
        moment = msgspec.convert(given, datetime)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(f"{exc}: {given!r} - at `$.scheduled_for`") from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
