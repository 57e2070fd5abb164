"""A job while a worker runs it: its handler's task, its run-time limit, and how it is stopped.

Stopping a job (a cancel, its run-time limit, a shutdown) sets its cancel flag, which whisper's
and PyAV's threads check between segments and packets; a handler that has not returned
`cancel_grace_s` later has its task cancelled. Cancelling a task does not stop a thread it
awaits, so the runtime then waits for the job's `run_blocking` threads before it publishes the
job's end and gives its slot to the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from streams import running_subject
from workers._context import Handler, JobContext
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

WAITING_FOR_THREAD = "stopping: waiting for the handler's thread to stop"
PROBE_TIMEOUT_S = 1.0
"""How long a worker waits for a job's runner to answer on its running subject; silence past it is
a runner frozen or cut off whose connection the server has not dropped yet (it still counts)."""


def seconds_text(seconds: float) -> str:
    """Seconds as a job's error says them: `1`, `2.5`, `4000`."""
    return f"{round(seconds, 1):g}"


class RunningJob:
    """A job this worker is running now, and the delivery of its message that it answers."""

    def __init__(self, ctx: JobContext, msg: Msg) -> None:
        self.ctx = ctx
        self.msg = msg
        """The newest delivery of the job's message: its in_progress, ack, nak and term go there."""
        self.released = False
        """Its message is no longer renewed (it overran its limit and will not stop): a delivery
        of it that comes now runs anew, here or elsewhere."""
        self._claim: Subscription | None = None
        self.task: asyncio.Task[dict[str, Any] | None] | None = None
        self.cancel_reason: str | None = None
        self.shutdown = False
        self.timed_out_after: float | None = None
        """The limit, in seconds, once the job ran past it."""
        self.started_at: float | None = None
        """Loop time the handler started."""

    def adopt(self, msg: Msg) -> bool:
        """Answer `msg` from now on if it is a redelivery of this job's message (JetStream gave it
        out again after the in_progress() heartbeats were lost for AckWait): the run goes on, once.

        Returns False for another message, or once this one is released: that delivery runs anew.
        """
        if self.released or msg.metadata.sequence.stream != self.msg.metadata.sequence.stream:
            return False
        delivery = msg.metadata.num_delivered or 1
        if delivery > (self.msg.metadata.num_delivered or 1):
            self.msg = msg
        job_id = self.ctx.job.job_id
        log.info("job %s: delivery %d came while it runs here; the run goes on", job_id, delivery)
        return True

    async def claim(self, nc: Client, worker: str) -> None:
        """Answer on the job's running subject while this run renews its message (see `runner_of`)."""

        async def answer(request: Msg) -> None:
            with contextlib.suppress(nats.errors.Error):
                await request.respond(worker.encode())

        self._claim = await nc.subscribe(running_subject(self.ctx.job.job_id), cb=answer)

    async def unclaim(self) -> None:
        """Stop answering: the run is over, or its message is no longer renewed."""
        claim, self._claim = self._claim, None
        if claim is not None:
            with contextlib.suppress(nats.errors.Error):
                await claim.unsubscribe()

    async def renew(self, settings: WorkerSettings) -> None:
        """Send in_progress() every AckWait/3 until the job is past its deadline and the grace to
        stop and publish its end; then release it (JetStream redelivers it after AckWait)."""
        grace_s = settings.cancel_grace_s + settings.stop_wait_s + settings.publish_retry_s
        while True:
            await asyncio.sleep(max(0.2, settings.ack_wait_s / 3))
            if not self.renewable(grace_s):
                job_id = self.ctx.job.job_id
                log.error(
                    "job %s did not stop within %.0f s of its run-time limit; no longer renewing it",
                    job_id, grace_s, extra={"job_id": job_id},
                )  # fmt: skip
                self.released = True
                await self.unclaim()
                return
            with contextlib.suppress(nats.errors.Error):
                await self.msg.in_progress()

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


async def runner_of(nc: Client, job_id: str) -> str | None:
    """The worker that runs `job_id` and renews its message, asked on the job's running subject;
    None when no one does.

    No subscriber is no runner: a dead worker's connection, and its subscriptions with it, are
    gone, and a run that ended or let its job go has unsubscribed. A runner that does not answer
    (frozen, or cut off on a connection the server still holds), or a question that cannot be
    asked, counts as one: the job's next delivery asks again.
    """
    try:
        reply = await nc.request(running_subject(job_id), b"", timeout=PROBE_TIMEOUT_S)
        runner = reply.data.decode(errors="replace")
    except nats.errors.NoRespondersError:
        return None
    except nats.errors.Error as exc:
        runner = f"a worker that did not answer ({type(exc).__name__})"
    log.info("job %s: delivered again while %s runs it; left to it", job_id, runner, extra={"job_id": job_id})
    return runner
