"""A batch parent's children as its derivation needs them (app/_batch.py derives the parent)."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

from app._stages import Derived, Stage
from streams import TERMINAL_STATUSES, JobStatus


class Family:
    """A parent's children as far as its derivation needs them, with the status counts and
    the progress total kept up to date child by child; the total is exact (a Fraction), so the
    parent's progress never depends on the order its children were added in. A pipeline's also
    keeps each stage's type, result and error."""

    def __init__(self, pipeline: bool = False) -> None:
        self.pipeline = pipeline
        self.children: dict[str, tuple[str, int]] = {}
        """Each child's status and submit sequence."""
        self.counts: Counter[str] = Counter()
        self._stages: dict[str, Stage] = {}
        self._progress: dict[str, Fraction] = {}
        self._total = Fraction(0)

    def set(self, child: Any) -> None:
        """Record a child's state (a row of `_CHILDREN`, `_STAGES` or a JobRow), replacing what was known of it."""
        if (old := self.children.get(child.id)) is not None:
            self.counts[old[0]] -= 1
            self._total -= self._progress[child.id]
        weight = Fraction(100) if JobStatus(child.status).terminal else Fraction(child.progress)
        self.children[child.id], self._progress[child.id] = (child.status, child.submit_seq), weight
        self.counts[child.status] += 1
        self._total += weight
        if self.pipeline:
            self._stages[child.id] = Stage(
                child.id,
                child.type,
                child.status,
                child.submit_seq,
                child.queue_seq,
                child.result,
                child.error,
            )

    def progress(self, count: int) -> float:
        """The mean progress of `count` children, a finished child counting 100 (one not known, 0)."""
        return round(float(self._total / count), 2) if count else 0.0

    def in_submit_order(self) -> list[tuple[str, str]]:
        """(child id, status) in the order the children were submitted."""
        return [(cid, status) for cid, (status, _) in sorted(self.children.items(), key=lambda i: i[1][1])]

    def stages(self) -> list[Stage]:
        """A pipeline's stages in order."""
        return sorted(self._stages.values(), key=lambda stage: stage.submit_seq)

    def nonzero_counts(self) -> dict[str, int]:
        """The children by status, the statuses none has left out."""
        return {s: n for s, n in sorted(self.counts.items()) if n}

    def derive(self, ended: bool) -> Derived:
        """A batch parent: completed once every child completed, failed once all ended and some did
        not complete, running while any child has left its queue (else as it is); one that has
        `ended` already keeps its status, and its result only counts."""
        counts, total = self.counts, len(self.children)
        done = sum(counts[s] for s in TERMINAL_STATUSES)
        result: dict[str, object] = {"total": total, "counts": self.nonzero_counts()}
        status: JobStatus | None = JobStatus.RUNNING
        if ended:
            status = None
        elif done == total:
            status = JobStatus.COMPLETED if counts[JobStatus.COMPLETED] == total else JobStatus.FAILED
            ordered = self.in_submit_order()
            for outcome in sorted(TERMINAL_STATUSES):
                result[str(outcome)] = [cid for cid, s in ordered if s == outcome]
        elif counts[JobStatus.PENDING] + counts[JobStatus.SCHEDULED] == total:
            status = None
        error = f"{total - counts[JobStatus.COMPLETED]} of {total} children did not complete"
        return Derived(status, result, f"{done} of {total} done", error)
