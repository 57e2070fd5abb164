"""Pipelines: a parent job whose children are stages run in order, each on its own pool, each
taking the stage before's main output as its input.

Every stage is recorded at submit as a `waiting` submission on its events subject (the job is
`scheduled`, in no pool's queue, holding no worker slot), so the children's listing shows them
all from the start. A stage's submission proper goes to its pool only once the stage before
has completed; the `StageStarter` publishes it, reading SQLite (the projection, the one writer
of it) and writing only to the stream. Its message id is `<stage id>:<attempt>`, the same from
every API instance and after every restart, so JetStream drops the duplicates; a restarted
starter looks at every pipeline that has not ended once the projection has caught up.

The parent's submission lists the stages, so it is the one record of how many there are: a
submit or retry cut short after it (a crash, a failed publish) leaves stages unrecorded, or not
yet resubmitted, and the starter records them (the same ids and message ids) before it starts one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app._db import FileRow, JobRow
from app._exceptions import ConflictError, not_found
from app._hub import Applied
from app._publisher import Publisher
from app._queries import JobQueries
from app._schemas import Job, SubmitPipeline
from app._stages import WAITING, is_stale, main_output, planned_types, stage_id
from streams import (
    ACTIVE_STATUSES,
    OPERATIONS,
    PIPELINE_POOL,
    Failed,
    InvalidParamsError,
    JobStatus,
    OperationSpec,
    Submitted,
    TaskSupervisor,
    check_llm_endpoint,
    file_kind,
    kinds_text,
    operation,
    stage_inputs,
    suffix_kind,
    validate_params,
)

log = logging.getLogger("jobcast.pipelines")

PIPELINE_TYPE = "pipeline"
"""A pipeline parent's job type."""


def resubmission(row: JobRow, **changes: Any) -> Submitted:
    """The job's spec again, as its next attempt (with `changes`, e.g. a stage's input)."""
    event = Submitted(
        job_id=row.id, attempt=row.attempt + 1, type=row.type, pool=row.pool, owner=row.owner,
        params=row.params, title=row.title, description=row.description, file_id=row.file_id,
        parent_id=row.parent_id, max_attempts=row.max_attempts, priority=row.priority,
        created_at=row.created_at, client_request_id=row.client_request_id, callback_url=row.callback_url,
        timeout_s=row.timeout_s, file_name=row.file_name, cache=row.cache is not False,
    )  # fmt: skip
    return msgspec.structs.replace(event, **changes) if changes else event


def stage_record(parent: Submitted | JobRow, index: int) -> Submitted:
    """Stage `index` of a pipeline as recorded at submit, waiting, from the parent's submission
    (or its row): the same event, so the same message id, whoever publishes it."""
    pipeline_id = parent.job_id if isinstance(parent, Submitted) else parent.id
    planned = (parent.params or {})["stages"][index]
    spec = operation(planned["type"])
    return Submitted(
        job_id=stage_id(pipeline_id, index), type=spec.name, pool=spec.pool, owner=parent.owner,
        params=planned.get("params") or {}, title=f"{parent.title or PIPELINE_TYPE} · stage {index + 1}: {spec.name}",
        parent_id=pipeline_id, priority=parent.priority, max_attempts=spec.max_attempts,
        cache=parent.cache is not False, waiting=True,
    )  # fmt: skip


class StageStarter:
    """Starts each pipeline's next stage once the one before has completed (task `pipelines`)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.projection = publisher.projection
        self.db = publisher.db
        self._due = asyncio.Event()

    def start(self, tasks: TaskSupervisor) -> None:
        """Listen for pipelines the projection marks due, and run `pipelines` under `tasks`."""
        self.publisher.hub.listeners.append(self._on_applied)
        tasks.start("pipelines", self._run)

    def stop(self) -> None:
        """Stop listening (the supervisor stops the task)."""
        if self._on_applied in self.publisher.hub.listeners:
            self.publisher.hub.listeners.remove(self._on_applied)

    def _on_applied(self, item: Applied) -> None:
        if self.projection.pipelines_due:
            self._due.set()

    async def _run(self) -> None:
        # What the projection marks while it catches up may already have been acted on by an
        # instance that ran before: only a caught-up projection says what is due, and every
        # pipeline that has not ended is looked at once then (a crash between a stage's end and
        # the next one's submission, or in the middle of a submit or a retry, however long ago,
        # is covered here).
        await self.projection.caught_up.wait()
        self.projection.pipelines_due.clear()
        async with self.db.session() as session:
            due: set[str] = set(
                await session.scalars(
                    select(JobRow.id).where(
                        JobRow.pool == PIPELINE_POOL, JobRow.status.in_(sorted(ACTIVE_STATUSES))
                    )
                )
            )
        while True:
            for pipeline_id in sorted(due):
                await self.advance(pipeline_id)
            self._due.clear()
            if not self.projection.pipelines_due:
                await self._due.wait()
            due, self.projection.pipelines_due = self.projection.pipelines_due, set()

    async def advance(self, pipeline_id: str) -> int | None:
        """Publish what the pipeline's state in SQLite calls for: the submission proper of its first
        waiting stage once the stage before has completed. Returns the stream sequence of the event
        published, if any."""
        async with self.db.session() as session:
            parent = await session.get(JobRow, pipeline_id)
            if parent is None or parent.pool != PIPELINE_POOL:
                return None
            stages = list(
                await session.scalars(
                    select(JobRow).where(JobRow.parent_id == pipeline_id).order_by(JobRow.submit_seq)
                )
            )
        if JobStatus(parent.status).terminal:
            return None  # its waiting stages ended with it (app/_batch.py)
        planned = {stage_id(pipeline_id, index): index for index in range(len(planned_types(parent.params)))}
        stages.sort(key=lambda stage: planned.get(stage.id, len(planned)))  # in their planned places
        if (recorded := await self._record_missing(parent, stages)) is not None:
            return recorded  # once applied, the pipeline is due again
        for index, stage in enumerate(stages):
            if stage.status == JobStatus.COMPLETED:
                continue
            if stage.status != WAITING:
                return None  # in its pool's queue, or running
            if index == 0:
                file_id, file_name = parent.file_id, parent.file_name
            else:
                before = stages[index - 1]
                output = main_output(before.type, before.result)
                if output is None:
                    spec = OPERATIONS.get(before.type)
                    kind = spec.main_output if spec is not None else None
                    error = f"stage {index} ({before.type}) gave no {kind or 'output'} for this stage to take"
                    failed = Failed(job_id=stage.id, attempt=stage.attempt, error=error)
                    ack = await self.publisher.publish(
                        failed, msg_id=f"{stage.id}:{stage.attempt}:failed:pipeline"
                    )
                    return ack.seq
                file_id, file_name = output["file_id"], str(output.get("name", ""))
            # Its submission proper: same attempt, so its message id is `<id>:<attempt>` wherever
            # and however often it is published.
            proper = resubmission(
                stage, attempt=stage.attempt, file_id=file_id, file_name=file_name, waiting=False
            )
            log.info("pipeline %s: starting stage %d (%s)", pipeline_id, index + 1, stage.type)
            return (await self.publisher.publish(proper)).seq
        return None

    async def _record_missing(self, parent: JobRow, stages: list[JobRow]) -> int | None:
        """Record what a submit or retry cut short left out: each planned stage with no row, and
        each stage that ended before the pipeline's latest submission (a retry's) and was not
        resubmitted; the same events as theirs, so duplicates are dropped. Returns the last
        sequence published, None when nothing was missing."""
        by_id = {stage.id: stage for stage in stages}
        last = None
        for index in range(len(planned_types(parent.params))):
            stage = by_id.get(stage_id(parent.id, index))
            if stage is None:
                event = stage_record(parent, index)
            elif is_stale(stage.status, stage.queue_seq, parent.queue_seq):
                event = resubmission(stage, file_id=None, file_name=None, waiting=True)
            else:
                continue
            ack = await self.publisher.publish(event)
            if not ack.duplicate:  # else the submit or retry it raced got there first
                log.info("pipeline %s: recorded stage %d (%s) in its place", parent.id, index + 1, event.type)
            last = ack.seq
        return last


class PipelineCommands:
    """Submit and retry pipelines; cancel is a batch's (app/_commands.py cascades to the children)."""

    def __init__(self, publisher: Publisher, queries: JobQueries) -> None:
        self.publisher = publisher
        self.queries = queries
        self.settings = publisher.settings
        self.starter = StageStarter(publisher)

    async def submit(self, body: SubmitPipeline, owner: str) -> Job:
        """Check the chain of stages, record the parent and every stage, and start the first."""
        async with self.queries.db.session() as session:
            file = await session.get(FileRow, body.file_id)
        if file is None or file.owner != owner:
            raise not_found("file", body.file_id)
        stages = self._checked(body, file.name)
        await self.publisher.check_storage()
        pipeline_id = str(uuid.uuid4())
        parent = Submitted(
            job_id=pipeline_id, type=PIPELINE_TYPE, pool=PIPELINE_POOL, owner=owner, title=body.title,
            params={"stages": [{"type": spec.name, "params": params} for spec, params in stages]},
            file_id=body.file_id, file_name=file.name, priority=body.priority,
            callback_url=body.callback_url, max_attempts=1, cache=body.cache,
        )  # fmt: skip
        last = (await self.publisher.publish(parent)).seq
        # One by one: the stream's order is theirs. Cut short, the starter records the rest.
        for index in range(len(stages)):
            last = (await self.publisher.publish(stage_record(parent, index))).seq
        return await self._started(pipeline_id, last, owner)

    def _checked(self, body: SubmitPipeline, file_name: str) -> list[tuple[OperationSpec, dict[str, Any]]]:
        """Each stage's spec and validated params; InvalidParamsError (422) naming the first stage
        that does not take what the one before gives, with its JSON path."""
        checked: list[tuple[OperationSpec, dict[str, Any]]] = []
        given, source = file_kind(file_name), f"the input file {file_name!r} is {file_kind(file_name)}"
        for index, stage in enumerate(body.stages):
            where = f"stages[{index}]"
            spec = OPERATIONS.get(stage.type)
            if spec is None:
                raise InvalidParamsError(
                    f"{where}: unknown operation {stage.type!r}; known operations: "
                    f"{', '.join(sorted(OPERATIONS))} - at `$.{where}.type`"
                )
            if not spec.needs_file:
                raise InvalidParamsError(
                    f"{where}: {spec.name} takes no input file, so it cannot be a pipeline stage"
                    f" - at `$.{where}.type`"
                )
            if given not in stage_inputs(spec):
                raise InvalidParamsError(
                    f"{where}: {spec.name} takes {kinds_text(stage_inputs(spec))}, but {source} - at `$.{where}.type`"
                )
            try:
                params = validate_params(spec, stage.params, self.settings.llm_endpoints)
            except InvalidParamsError as exc:
                raise InvalidParamsError(str(exc).replace("`$.params", f"`$.{where}.params", 1)) from None
            checked.append((spec, params))
            if spec.main_output is None:
                if index < len(body.stages) - 1:
                    raise InvalidParamsError(
                        f"{where}: {spec.name} gives no output a next stage can take, so it can only be"
                        f" the last stage - at `$.{where}.type`"
                    )
                break
            given, source = suffix_kind(spec.main_output), f"{where} ({spec.name}) gives {spec.main_output}"
        return checked

    async def retry(self, row: JobRow, owner: str | None) -> Job:
        """Run a failed or cancelled pipeline again from its first stage that did not complete:
        the stages that completed keep their outputs and are not run again."""
        async with self.queries.db.session() as session:
            stages = list(
                await session.scalars(
                    select(JobRow).where(JobRow.parent_id == row.id).order_by(JobRow.submit_seq)
                )
            )
        again = [stage for stage in stages if stage.status != JobStatus.COMPLETED]
        for number, stage in enumerate(stages, 1):
            if stage in again and stage.status not in (JobStatus.FAILED, JobStatus.CANCELLED, WAITING):
                raise ConflictError(
                    f"stage {number} ({stage.type}) of pipeline {row.id} is {stage.status}; retry once it has stopped"
                )
        for stage in again:  # the allowlist may have changed since the pipeline was submitted
            if (spec := OPERATIONS.get(stage.type)) is not None:
                check_llm_endpoint(spec, stage.params, self.settings.llm_endpoints)
        await self.publisher.check_storage()
        last = (await self.publisher.publish(resubmission(row))).seq
        for stage in again:  # each waits again, the first for nothing: the starter submits it
            waiting = resubmission(stage, file_id=None, file_name=None, waiting=True)
            last = (await self.publisher.publish(waiting)).seq
        return await self._started(row.id, last, owner)

    @staticmethod
    async def refuse_stage(session: AsyncSession, row: JobRow) -> None:
        """ConflictError when `row` is a pipeline's stage: only the pipeline is retried, so that its
        stages keep their order and each its input."""
        parent = await session.get(JobRow, row.parent_id) if row.parent_id else None
        if parent is not None and parent.pool == PIPELINE_POOL:
            raise ConflictError(
                f"job {row.id} is a stage of pipeline {parent.id}: retry the pipeline"
                f" (POST /api/v1/jobs/{parent.id}/retry), which reruns it from this stage"
            )

    async def _started(self, pipeline_id: str, last: int, owner: str | None) -> Job:
        """Once `last` is applied, start the stage that is due (the starter would too, from the
        stream: same message id), and answer with the pipeline as the projection has it then."""
        await self.publisher.applied(last, pipeline_id)
        for _ in range(2):  # a stage recorded again (the starter's doing) is started the next time
            if (started := await self.starter.advance(pipeline_id)) is None:
                break
            await self.publisher.applied(started, pipeline_id)
        return await self.queries.get(pipeline_id, owner)
