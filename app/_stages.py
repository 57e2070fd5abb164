"""A pipeline's state, derived from its stages: pure functions of the stages' rows, so that a
database rebuilt from the stream derives the same parent however its batches fell."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from streams import OPERATIONS, JobStatus, file_kind, suffix_kind

WAITING = JobStatus.SCHEDULED
"""A stage recorded before its turn is `scheduled`: its submission proper waits for the stage before."""


def stage_id(pipeline_id: str, index: int) -> str:
    """A stage's job id, derived from its pipeline's and its place (as a batch's children are)."""
    return str(uuid.uuid5(uuid.UUID(pipeline_id), str(index)))


def planned_types(params: dict[str, Any] | None) -> list[str]:
    """The stage types a pipeline's submission lists, in order: the one record of how many stages
    it has (a stage whose own submission is not recorded yet still counts, as waiting)."""
    stages = (params or {}).get("stages")
    if not isinstance(stages, list):
        return []
    return [str(s.get("type", "")) if isinstance(s, dict) else "" for s in stages]


def is_stale(status: str, queue_seq: int | None, since: int | None) -> bool:
    """Whether a stage ended (not completed) before the pipeline's latest submission `since`:
    a retry resubmitted the pipeline, so the stage waits to run again."""
    return status in (JobStatus.FAILED, JobStatus.CANCELLED) and (queue_seq or 0) < (since or 0)


@dataclass(frozen=True, slots=True)
class Stage:
    """What a pipeline's derivation knows of one stage."""

    id: str
    type: str
    status: str
    submit_seq: int
    queue_seq: int | None
    """The stream sequence of its latest submission."""
    result: dict[str, Any] | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Derived:
    """A parent's state as its children make it; `status` None keeps the parent's own."""

    status: JobStatus | None
    result: dict[str, Any]
    step: str
    error: str | None = None


def outputs_of(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The output files a job's result lists (none when it has none)."""
    outputs = (result or {}).get("outputs")
    return [o for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []


def main_output(stage_type: str, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The output of a completed stage that the next one takes: the first of its outputs of the
    operation's main output kind (`OperationSpec.main_output`); None when it gave none."""
    spec = OPERATIONS.get(stage_type)
    if spec is None or spec.main_output is None:
        return None
    wanted = suffix_kind(spec.main_output)
    for output in outputs_of(result):
        if file_kind(str(output.get("name", ""))) == wanted and isinstance(output.get("file_id"), str):
            return output
    return None


def in_plan(pipeline_id: str, planned: list[str], rows: list[Stage]) -> list[Stage]:
    """The pipeline's stages in their planned order, one per stage its submission lists: a stage
    not recorded yet (its submission was cut short) waits; rows the plan does not name follow."""
    by_id = {row.id: row for row in rows}
    ordered = []
    for index, stage_type in enumerate(planned):
        found = by_id.pop(stage_id(pipeline_id, index), None)
        ordered.append(found or Stage(stage_id(pipeline_id, index), stage_type, WAITING, 0, None, None, None))
    return ordered + sorted(by_id.values(), key=lambda stage: stage.submit_seq)


def derive_pipeline(stages: list[Stage], counts: dict[str, int], since: int | None) -> Derived:
    """A pipeline parent from its stages in order (`in_plan`): failed once a stage failed, cancelled
    once one was cancelled, completed when the last completed, running once any stage left its
    queue; its result lists every stage's outputs in stage order.

    `since` is the sequence of the pipeline's latest submission: a stage that failed or was
    cancelled before it (a retry resubmits the pipeline, then those stages) waits to run again."""
    total = len(stages)
    result: dict[str, Any] = {
        "total": total,
        "counts": counts,
        "stages": [
            {"job_id": s.id, "type": s.type, "status": s.status, "outputs": outputs_of(s.result)}
            for s in stages
        ],
    }
    done = sum(1 for s in stages if s.status == JobStatus.COMPLETED)
    stages = [_current(stage, since) for stage in stages]
    for number, stage in enumerate(stages, 1):
        where = f"stage {number} of {total} ({stage.type})"
        if stage.status == JobStatus.FAILED:
            return Derived(
                JobStatus.FAILED, result, f"{where} failed", f"{where} failed: {stage.error or ''}"
            )
        if stage.status == JobStatus.CANCELLED:
            return Derived(JobStatus.CANCELLED, result, f"{where} cancelled", f"{where} was cancelled")
    if total and done == total:
        return Derived(JobStatus.COMPLETED, result, f"{total} of {total} stages done")
    current = next((n for n, s in enumerate(stages, 1) if s.status != JobStatus.COMPLETED), total)
    step = f"stage {current} of {total} ({stages[current - 1].type})" if stages else "no stages"
    queued = all(s.status in (JobStatus.PENDING, WAITING) for s in stages)
    return Derived(None if queued else JobStatus.RUNNING, result, step)


def _current(stage: Stage, since: int | None) -> Stage:
    """The stage as the pipeline's current run sees it: ended before that run began (and not
    completed), it waits for its resubmission."""
    return replace(stage, status=WAITING) if is_stale(stage.status, stage.queue_seq, since) else stage
