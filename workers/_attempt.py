"""One delivery of a job: the checks before it runs, its handler, and how the attempt is settled.

A delivery publishes `started`, throttled `progress`, then `completed` / `failed` / `retrying` /
`cancelled`, and is acked only after that terminal event is stored, so a worker killed at any
point loses nothing: the message is redelivered and the next worker carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from streams import (
    OPERATIONS,
    Cancelled,
    CancelRequested,
    Completed,
    Event,
    Failed,
    Progress,
    Retrying,
    Started,
    Submitted,
    control_subject,
    decode_event,
    events_subject,
    is_terminal,
    is_unit_operation,
    job_id_of,
    speed_family,
    speed_key,
    speed_params,
    utcnow,
)
from workers._cache import StageCache
from workers._context import Handler, JobContext, Reporter
from workers._errors import PublishGaveUpError
from workers._eta import SpeedBook
from workers._events import Events
from workers._files import WorkerFiles
from workers._outcome import backoff, outcome_of, restamped, time_limit
from workers._registry import models_loaded
from workers._running import RunningJob, runner_of, seconds_text
from workers._settings import WorkerSettings
from workers.whisper import resolve_device

log = logging.getLogger("jobcast.worker")

Early = Event | Literal["ack", "leave"] | None
"""What a delivery does instead of running: an event to finish with, "ack" to only ack, "leave"
to leave the message to the live worker that runs it; None to run."""


class AttemptRunner:
    """Runs the deliveries a worker fetched, and stops them on a cancel request."""

    def __init__(
        self,
        nc: Client,
        settings: WorkerSettings,
        handlers: dict[str, Handler],
        events: Events,
        files: WorkerFiles,
        *,
        running: dict[str, RunningJob],
        llm_slots: asyncio.Semaphore,
        announce: Callable[[], None],
        slot_free: asyncio.Event,
        cache: StageCache | None = None,
        speeds: SpeedBook | None = None,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.handlers = handlers
        self.events = events
        self.files = files
        self.running = running
        """The jobs this worker runs now, by id (shared with the worker, which waits for them on stop)."""
        self.llm_slots = llm_slots
        self.announce = announce
        """Called when `running` changes: the heartbeat says which jobs run here."""
        self.slot_free = slot_free
        """Set when a run ends: the fetch loop may take the next job."""
        self.cache = cache
        """The stage cache: a cacheable job is looked up before its handler and stored after it."""
        self.speeds = speeds
        """The learned speeds: a job's ETA starts from its key's, and a completed job updates it."""

    async def process(self, msg: Msg) -> None:
        """Run one delivery of a job message and settle it (ack, nak or term)."""
        try:
            job = decode_event(msg.data)
        except msgspec.MsgspecError as exc:
            log.error("dropping undecodable message on %s: %s", msg.subject, exc)
            await msg.term()
            return
        if not isinstance(job, Submitted):
            await msg.term()
            return
        if (current := self.running.get(job.job_id)) is not None and current.adopt(msg):
            return  # the one run goes on, answering this delivery; this slot is free at once
        delivery = msg.metadata.num_delivered or 1
        attempt = job.attempt + delivery - 1
        ids: dict[str, Any] = {"job_id": job.job_id, "attempt": attempt, "worker": self.settings.name}

        async def publish_progress(percent: float, step: str) -> None:
            with contextlib.suppress(nats.errors.Error):
                await self.events.publish(
                    Progress(
                        job_id=job.job_id,
                        attempt=attempt,
                        progress=percent,
                        step=step,
                        eta_s=ctx.eta.estimate(percent, time.monotonic()),
                    )
                )

        reporter = Reporter(publish_progress, asyncio.get_running_loop())
        limit_s, per_media_s = time_limit(job, OPERATIONS.get(job.type))
        ctx = JobContext(
            job, attempt, delivery, reporter, files=self.files, settings=self.settings,
            scratch_prefix=f"jobcast-{job.job_id[:8]}-", time_limit_s=limit_s, time_per_media_s=per_media_s,
            llm_slots=self.llm_slots,
        )  # fmt: skip
        running = RunningJob(ctx, msg)
        # Registered before the checks below, so a cancel that arrives meanwhile is not missed.
        self.running[job.job_id] = running
        self.announce()
        heartbeat = asyncio.create_task(running.renew(self.settings))
        try:
            await self._attempt(running, ids, delivery)
        except PublishGaveUpError as exc:
            # The broker stayed away: let go of the attempt so the slot serves again. The message,
            # never acked, comes back (after this nak, or after ack_wait if the nak is lost too),
            # and the next delivery finds the end if it was stored after all.
            log.error("job %s: %s; it will be delivered again", job.job_id, exc, extra={"job_id": job.job_id})
            with contextlib.suppress(nats.errors.Error):
                await running.msg.nak(delay=backoff(self.settings, delivery))
        finally:
            heartbeat.cancel()
            await running.unclaim()  # the message is acked or let go: no longer this run's to answer for
            await ctx.threads_stopped(None)  # a thread that outlived stop_wait_s still holds the slot
            if ctx.scratch is not None:
                await asyncio.to_thread(shutil.rmtree, ctx.scratch, True)
            if self.running.get(job.job_id) is running:  # not a newer run of a job this one released
                del self.running[job.job_id]
            self.announce()
            self.slot_free.set()

    async def _attempt(self, running: RunningJob, ids: dict[str, Any], delivery: int) -> None:
        """Run one delivery of a job and record how it ended."""
        job = running.ctx.job
        early = await self._precheck(job, ids, delivery)
        if early == "ack":
            await running.msg.ack()
            return
        if early == "leave":  # back after AckWait once its runner stops renewing it
            with contextlib.suppress(nats.errors.Error):
                await running.msg.nak(delay=self.settings.ack_wait_s)
            return
        if early is not None:
            await self._finish(running, early)
            return
        await running.claim(self.nc, self.settings.name)  # before `started`: it answers from then on
        # `started` is not awaited before the handler runs (one round trip less per job).
        # It leaves first on this connection, so the stream stores it before the handler's
        # progress; its ack is awaited before the outcome is published.
        started = asyncio.create_task(self.events.publish_reliably(Started(**ids, delivery=delivery)))
        took_s = start_s = 0.0
        cold = False  # this worker loaded a model during the run
        key: str | None = None  # the job's key in the speeds bucket, once it runs
        try:
            if running.cancel_reason is not None:
                outcome: Event = Cancelled(**ids, reason=running.cancel_reason)
            else:
                key = self._speed_key(job)
                if key is not None and self.speeds is not None:
                    running.ctx.eta.speed = await self.speeds.read(key)
                handler = self.handlers[job.type]
                loaded = models_loaded()
                running.start(handler if self.cache is None else self.cache.around(job, handler))
                await running.finish(self.settings.cancel_grace_s)
                ended = time.monotonic()
                took_s, start_s = ended - running.ctx.eta.started, running.ctx.eta.start_cost(ended)
                cold = models_loaded() > loaded
                outcome = outcome_of(running, ids, delivery, self.settings)
        finally:
            await started
        if running.ctx.threads_running:
            # The end is published once the handler's threads have stopped (or stop_wait_s later),
            # and says when that was.
            stopped = await running.threads_stopped(self.settings.stop_wait_s)
            note = (
                None
                if stopped
                else f"its thread had not stopped {seconds_text(self.settings.stop_wait_s)} s later"
            )
            outcome = restamped(outcome, note)
        await running.ctx.reporter.flush()
        if isinstance(outcome, Retrying):
            recorded = await self.events.record(outcome)
            if isinstance(recorded, Retrying):
                await running.msg.nak(delay=recorded.delay_s)
            else:
                await running.msg.ack()
        else:
            recorded = await self._finish(running, outcome)
            if not (cold and not running.ctx.eta.paced):
                # A cold run without a pace of its own would put its model load into the speed.
                await self._learn(running, key, recorded, took_s, start_s)

    @staticmethod
    def _speed_key(job: Submitted) -> str | None:
        """The job's key in the speeds bucket, with the device and compute type this worker runs
        it with (a CPU and a GPU worker learn apart); None for an operation that counts no units."""
        if not is_unit_operation(job.type):
            return None
        params = dict(job.params)
        if "device" in speed_params(job.type):
            params["device"], params["compute_type"] = resolve_device(
                params.get("device"), params.get("compute_type")
            )
        return speed_key(job.type, params)

    async def _learn(
        self, running: RunningJob, key: str | None, recorded: Event, took_s: float, start_s: float
    ) -> None:
        """A job recorded as completed by running (not from the stage cache) teaches its key's speed."""
        job, units = running.ctx.job, running.ctx.eta.units
        if self.speeds is None or key is None or units is None or not isinstance(recorded, Completed):
            return
        if (recorded.result or {}).get("cached"):
            return
        await self.speeds.learn(key, took_s, units, start_s, speed_family(job.type, job.params))

    async def _precheck(self, job: Submitted, ids: dict[str, Any], delivery: int) -> Early:
        """What to do instead of running (see `Early`)."""
        cancel, last = await asyncio.gather(
            self.events.last(control_subject(job.job_id)), self.events.last(events_subject(job.job_id))
        )
        if last is not None and is_terminal(last) and last.attempt >= job.attempt:
            if getattr(last, "worker", None) is not None:
                return "ack"  # finished before its ack got through (its worker died in between)
            # Ended by the API (cancelled while queued): say that no worker holds it any more.
            return msgspec.structs.replace(last, attempt=ids["attempt"], worker=ids["worker"], ts=utcnow())
        in_flight = isinstance(last, Started | Progress) and last.attempt >= job.attempt
        # Redelivered while it runs (its runner's heartbeats were lost for AckWait, as in a leader
        # election): a live runner keeps the job, and it alone ends it.
        if in_flight and await runner_of(self.nc, job.job_id) is not None:
            return "leave"
        if isinstance(cancel, CancelRequested) and cancel.attempt >= job.attempt:
            return Cancelled(**ids, reason=cancel.reason or "cancelled")
        if delivery > job.max_attempts:
            return Failed(
                **(ids | {"attempt": ids["attempt"] - 1}), exhausted=True,
                error=f"gave up after {job.max_attempts} attempt(s): the worker running it stopped "
                "without finishing (crash, kill or lost connection)",
            )  # fmt: skip
        if job.type not in self.handlers:
            return Failed(
                **ids, error=f"no handler for operation {job.type!r} in pool {self.settings.pool!r}"
            )
        return None

    async def _finish(self, running: RunningJob, event: Event) -> Event:
        """Record the attempt's end and ack it; returns the event recorded (see Events.record)."""
        event = await self.events.record(event)
        log.info(
            "job %s %s", event.job_id, event.kind, extra={"job_id": event.job_id, "attempt": event.attempt}
        )
        await running.msg.ack()
        return event

    async def on_control(self, msg: Msg) -> None:
        """A control message: a cancel request stops the job if it runs here."""
        running = self.running.get(job_id_of(msg.subject))
        if running is None:
            return
        try:
            event = decode_event(msg.data)
        except msgspec.MsgspecError:
            return
        if not isinstance(event, CancelRequested) or event.attempt < running.ctx.job.attempt:
            return
        # A handler that does not notice within the grace period is stopped outright.
        running.cancel(event.reason or "cancelled", self.settings.cancel_grace_s)
