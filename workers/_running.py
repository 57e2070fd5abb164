"""A job while a worker runs it: its handler's task, its run-time limit, and how it is stopped.

Stopping a job (a cancel, its run-time limit, a shutdown) sets its cancel flag, which whisper's
and PyAV's threads check between segments and packets; a handler that has not returned
`cancel_grace_s` later has its task cancelled. Cancelling a task does not stop a thread it
awaits, so the runtime then waits for the job's `run_blocking` threads before it publishes the
job's end and gives its slot to the next job.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from workers._context import Handler, JobContext

log = logging.getLogger("jobcast.worker")

WAITING_FOR_THREAD = "stopping: waiting for the handler's thread to stop"


def seconds_text(seconds: float) -> str:
    """Seconds as a job's error says them: `1`, `2.5`, `4000`."""
    return f"{round(seconds, 1):g}"


class RunningJob:
    """A job this worker is running now."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.task: asyncio.Task[dict[str, Any] | None] | None = None
        self.cancel_reason: str | None = None
        self.shutdown = False
        self.timed_out_after: float | None = None
        """The limit, in seconds, once the job ran past it."""
        self.started_at: float | None = None
        """Loop time the handler started."""

    @property
    def deadline(self) -> float | None:
        """Loop time the handler must be done by; None before it starts."""
        return None if self.started_at is None else self.started_at + self.ctx.time_limit_s

    def renewable(self, grace_s: float) -> bool:
        """Whether the job's message may still be kept alive: not past its deadline plus `grace_s`."""
        deadline = self.deadline
        return deadline is None or asyncio.get_running_loop().time() < deadline + grace_s

    def start(self, handler: Handler) -> None:
        """Run the handler; its run-time limit counts from now."""
        self.started_at = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(handler(self.ctx))

    def stop(self) -> None:
        """Cancel the handler's task, if it runs."""
        if self.task is not None:
            self.task.cancel()

    def cancel(self, reason: str, grace_s: float) -> None:
        """Stop the job on request: the flag now, the task `grace_s` later."""
        if self.cancel_reason is not None or self.timed_out_after is not None:
            return  # already stopping
        self.cancel_reason = reason
        self.ctx.cancel()
        asyncio.get_running_loop().call_later(grace_s, self.stop)

    async def finish(self, grace_s: float) -> None:
        """Wait for the handler; past the deadline, stop it (the flag, then the task) and wait for that."""
        assert self.task is not None
        assert self.started_at is not None
        loop = asyncio.get_running_loop()
        while not self.task.done():
            # Re-read every time: the limit grows once the handler knows its media's duration.
            remaining = self.started_at + self.ctx.time_limit_s - loop.time()
            if remaining > 0:
                await asyncio.wait({self.task}, timeout=remaining)
                continue
            if self.cancel_reason is None and not self.shutdown:
                self.timed_out_after = self.ctx.time_limit_s
                self.ctx.cancel()
                await self.ctx.reporter.announce(
                    f"stopping: timed out after {seconds_text(self.timed_out_after)} s"
                )
            await asyncio.wait({self.task}, timeout=grace_s)
            self.stop()
            await asyncio.wait({self.task})

    async def threads_stopped(self, wait_s: float) -> bool:
        """Wait up to `wait_s` for the handler's threads to return; say so in the job's events."""
        if not self.ctx.threads_running:
            return True
        loop = asyncio.get_running_loop()
        begin = loop.time()
        await self.ctx.reporter.announce(WAITING_FOR_THREAD)
        stopped = await self.ctx.threads_stopped(wait_s)
        job_id = self.ctx.job.job_id
        if stopped:
            log.info(
                "job %s: its thread stopped after %.2f s",
                job_id,
                loop.time() - begin,
                extra={"job_id": job_id},
            )
        else:
            log.warning(
                "job %s: its thread is still running %.0f s after the job was stopped; the slot stays taken",
                job_id, wait_s, extra={"job_id": job_id},
            )  # fmt: skip
        return stopped
