"""The worker runtime: a durable pull consumer per pool, a fetch loop, heartbeats, shutdown.

One message on jobs.submit.<pool>.<id> is one job attempt. The worker publishes
`started`, throttled `progress`, then `completed` / `failed` / `retrying` / `cancelled`,
and acks only after that terminal event is stored, so a worker killed at any point
loses nothing: the message is redelivered and the next worker carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from collections import Counter
from typing import Any, Literal

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from streams import (
    ALL_CONTROL,
    JOB_HEADER,
    KIND_HEADER,
    OPERATIONS,
    PRIORITIES,
    STREAM,
    Cancelled,
    CancelRequested,
    Event,
    Failed,
    FileStored,
    Progress,
    Retrying,
    Started,
    Submitted,
    TaskSupervisor,
    WorkerConsumer,
    close_quietly,
    connect,
    control_subject,
    decode_event,
    encode_event,
    ensure_consumer,
    ensure_stream,
    events_subject,
    files_store,
    files_subject,
    is_terminal,
    job_id_of,
    pool_submissions,
    utcnow,
)
from workers._context import Handler, JobContext, Reporter
from workers._errors import EventRejectedError, PublishGaveUpError
from workers._files import WorkerFiles
from workers._heartbeat import Heartbeat
from workers._outcome import backoff, outcome_of, restamped, time_limit
from workers._registry import handlers_for_pool, models_loaded
from workers._running import RunningJob, runner_of, seconds_text
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

_NO_WAIT = b'{"batch":1,"no_wait":true}'
BELL_RECHECK_S = 0.05
"""After the doorbell rings, how long an empty pull is retried at once rather than slept on."""


class Worker:
    """Takes jobs of one pool from JetStream and runs them, `settings.slots` at a time."""

    def __init__(self, settings: WorkerSettings, handlers: dict[str, Handler] | None = None) -> None:
        self.settings = settings
        self.handlers = handlers if handlers is not None else handlers_for_pool(settings.pool)
        self.consumers = {
            priority: WorkerConsumer(pool=settings.pool, priority=priority, ack_wait_s=settings.ack_wait_s)
            for priority in PRIORITIES
        }
        self._hot: set[int] = set(PRIORITIES)
        """Priorities that may hold jobs; all of them at first."""
        self._doorbell = asyncio.Event()
        self._rung: dict[int, float] = {}
        self._unanswered: Counter[int] = Counter()
        """Bells per priority not yet matched by a job pulled from it: while there are none, an
        empty pull is not retried (it would be, every millisecond for BELL_RECHECK_S)."""
        """When the doorbell last rang for each priority (loop time)."""
        self.heartbeat: Heartbeat | None = None
        self.files: WorkerFiles | None = None
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._running: dict[str, RunningJob] = {}
        self.llm_slots = asyncio.Semaphore(settings.llm_concurrency)
        """MAX_LLM_CONCURRENCY for the whole worker: every LLM request of every job holds one."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the consumer exists and the fetch loop runs."""
        self.supervisor = TaskSupervisor(on_change=self._announce)
        """Runs the fetch loop and the heartbeat, restarting either if it fails; its state goes
        into the heartbeat record."""

    # lifecycle ---------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching; running jobs get `grace_s` to finish (arq's SIGTERM behaviour)."""
        self._stopping.set()
        self._slot_free.set()
        self._doorbell.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT start a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> None:
        """Connect, consume until asked to stop, then shut down within the grace period."""
        self.nc = await connect(self.settings.nats_url, name=f"jobcast-worker-{self.settings.pool}")
        self.js = self.nc.jetstream()
        try:
            await self._declare()
            await self.nc.subscribe(ALL_CONTROL, cb=self._on_control)
            await self.nc.subscribe(pool_submissions(self.settings.pool), cb=self._on_submission)
            self.files = WorkerFiles(await files_store(self.js), self._publish_reliably)
            self.heartbeat = Heartbeat(
                self.js, self.settings.name, self.settings.pool, self.settings.slots, self.supervisor,
                models_loaded,
            )  # fmt: skip
            await self.heartbeat.start()
            self.ready.set()
            log.info(
                "worker %s: pool %s, %d slot(s)", self.settings.name, self.settings.pool, self.settings.slots
            )
            await self.supervisor.start("fetch", self._fetch_loop, until=self._stopping)
            await self._shutdown()
            await self.supervisor.stop()
            await self.heartbeat.stop()
        finally:
            await self.supervisor.stop()
            await close_quietly(self.nc)

    async def _declare(self) -> None:
        """Stream and consumers; retried while the broker is away (it may restart as we start)."""
        assert self.js is not None
        delay = 0.2
        while True:
            try:
                await ensure_stream(self.js, update=False)  # the API owns its limits
                for consumer in self.consumers.values():
                    await ensure_consumer(self.js, consumer)
                return
            except (nats.errors.Error, TimeoutError) as exc:
                if self._stopping.is_set():
                    raise
                log.warning("declaring the stream and consumers failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_submission(self, msg: Msg) -> None:
        """The doorbell: a job was just submitted to this pool at the subject's priority."""
        token = msg.subject.split(".")[3]
        priority = -int(token[1:]) if token.startswith("m") else int(token[1:])
        self._hot.add(priority)
        self._rung[priority] = asyncio.get_running_loop().time()
        self._unanswered[priority] += 1
        self._doorbell.set()

    async def _fetch_loop(self) -> None:
        # Ask each priority that may hold jobs, highest first, for as many jobs as there are free
        # slots (one round trip for all of them); with nothing anywhere, sleep until the doorbell
        # rings, re-asking every priority now and then for redeliveries and retries, which ring
        # no bell.
        while not self._stopping.is_set():
            # Tasks, not _running: a job holds its slot from the moment it is fetched.
            if len(self._tasks) >= self.settings.slots:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            self._doorbell.clear()
            free = self.settings.slots - len(self._tasks)
            msgs: list[Msg] = []
            for priority in PRIORITIES:
                if priority not in self._hot:
                    continue
                self._hot.discard(priority)  # before asking: a bell meanwhile puts it back
                msgs = await self._pull(self.consumers[priority].durable, free)
                if msgs:
                    self._hot.add(priority)
                    self._unanswered[priority] -= len(msgs)
                    if self._unanswered[priority] <= 0:
                        del self._unanswered[priority]
                        self._rung.pop(priority, None)
                    break
            msg = msgs[0] if msgs else None
            now = asyncio.get_running_loop().time()
            recent = [p for p, at in self._rung.items() if now - at < BELL_RECHECK_S] if msg is None else []
            if recent:
                # The bell (a core subscription) can ring before the stream has stored the
                # submission, so the pull right after it finds nothing: ask again shortly instead
                # of sleeping until the idle poll (up to 0.5 s of dispatch latency otherwise).
                self._hot.update(recent)
                await asyncio.sleep(0.001)
            elif msg is None:
                self._rung.clear()
                self._unanswered.clear()
                try:
                    async with asyncio.timeout(self.settings.idle_poll_s):
                        await self._doorbell.wait()
                except TimeoutError:
                    self._hot.update(PRIORITIES)
            elif self._stopping.is_set():
                for each in msgs:
                    await each.nak()
            else:
                for each in msgs:
                    self._spawn(self._process(each))

    async def _pull(self, durable: str, count: int) -> list[Msg]:
        """Up to `count` jobs from a consumer if it has them, without waiting (one round trip)."""
        if count <= 1:
            msg = await self._pull_one(durable)
            return [] if msg is None else [msg]
        assert self.nc is not None
        got: list[Msg] = []
        over = asyncio.get_running_loop().create_future()

        async def on_reply(msg: Msg) -> None:
            # A status (404 no more messages, 408, 409) ends the pull, as does the last job asked for.
            if not (msg.headers and msg.headers.get("Status")):
                got.append(msg)
            elif not over.done():
                over.set_result(None)
            if len(got) >= count and not over.done():
                over.set_result(None)

        request = b'{"batch":%d,"no_wait":true}' % count
        try:
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox, cb=on_reply)
            try:
                await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}", request, reply=inbox)
                async with asyncio.timeout(5):
                    await over
            finally:
                await sub.unsubscribe()
        except TimeoutError:
            pass  # keep what came; a job that arrives after this is redelivered after ack_wait
        except nats.errors.Error as exc:
            log.debug("pull from %s failed: %s", durable, exc)
            await asyncio.sleep(0.2)
        return got

    async def _pull_one(self, durable: str) -> Msg | None:
        """One job from a consumer if it has one, without waiting (one round trip)."""
        assert self.nc is not None
        try:
            # old_style: JetStream answers on the inbox with the job's own subject, which
            # the shared response mux cannot match; a per-request inbox matches by sid.
            msg = await self.nc.request(
                f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}", _NO_WAIT, timeout=5, old_style=True
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.Error,
        ) as exc:
            log.debug("pull from %s failed: %s", durable, exc)
            await asyncio.sleep(0.2)
            return None
        if msg.headers and msg.headers.get("Status"):
            return None  # 404 no messages, 408 expired, 409 consumer changed: nothing now
        return msg

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    async def _shutdown(self) -> None:
        if any(r.task is not None for r in self._running.values()):
            log.info("stopping: %d job(s) get %.0f s to finish", len(self._running), self.settings.grace_s)
            _, pending = await asyncio.wait(
                [r.task for r in self._running.values() if r.task is not None], timeout=self.settings.grace_s
            )
            for running in list(self._running.values()):
                if running.task in pending:
                    running.shutdown = True
                    running.ctx.cancel()  # its threads stop at their next check
                    running.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    # one job -----------------------------------------------------------------------

    async def _process(self, msg: Msg) -> None:
        try:
            job = decode_event(msg.data)
        except msgspec.MsgspecError as exc:
            log.error("dropping undecodable message on %s: %s", msg.subject, exc)
            await msg.term()
            return
        if not isinstance(job, Submitted):
            await msg.term()
            return
        if (current := self._running.get(job.job_id)) is not None and current.adopt(msg):
            return  # the one run goes on, answering this delivery; this slot is free at once
        delivery = msg.metadata.num_delivered or 1
        attempt = job.attempt + delivery - 1
        ids: dict[str, Any] = {"job_id": job.job_id, "attempt": attempt, "worker": self.settings.name}

        async def publish_progress(percent: float, step: str) -> None:
            with contextlib.suppress(nats.errors.Error):
                await self._publish(Progress(job_id=job.job_id, attempt=attempt, progress=percent, step=step))

        reporter = Reporter(publish_progress, asyncio.get_running_loop())
        limit_s, per_media_s = time_limit(job, OPERATIONS.get(job.type))
        ctx = JobContext(
            job, attempt, delivery, reporter, files=self.files, settings=self.settings,
            scratch_prefix=f"jobcast-{job.job_id[:8]}-", time_limit_s=limit_s, time_per_media_s=per_media_s,
            llm_slots=self.llm_slots,
        )  # fmt: skip
        running = RunningJob(ctx, msg)
        # Registered before the checks below, so a cancel that arrives meanwhile is not missed.
        self._running[job.job_id] = running
        self._announce()
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
            if self._running.get(job.job_id) is running:  # not a newer run of a job this one released
                del self._running[job.job_id]
            self._announce()
            self._slot_free.set()

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
        assert self.nc is not None
        await running.claim(self.nc, self.settings.name)  # before `started`: it answers from then on
        # `started` is not awaited before the handler runs (one round trip less per job).
        # It leaves first on this connection, so the stream stores it before the handler's
        # progress; its ack is awaited before the outcome is published.
        started = asyncio.create_task(self._publish_reliably(Started(**ids, delivery=delivery)))
        try:
            if running.cancel_reason is not None:
                outcome: Event = Cancelled(**ids, reason=running.cancel_reason)
            else:
                running.start(self.handlers[job.type])
                await running.finish(self.settings.cancel_grace_s)
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
            recorded = await self._record(outcome)
            if isinstance(recorded, Retrying):
                await running.msg.nak(delay=recorded.delay_s)
            else:
                await running.msg.ack()
        else:
            await self._finish(running, outcome)

    def _announce(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.update(list(self._running))

    async def _precheck(
        self, job: Submitted, ids: dict[str, Any], delivery: int
    ) -> Event | Literal["ack", "leave"] | None:
        """What to do instead of running: an event to finish with, "ack" to only ack, "leave" to
        leave the message to the live worker that runs it, None to run."""
        cancel, last = await asyncio.gather(
            self._last(control_subject(job.job_id)), self._last(events_subject(job.job_id))
        )
        if last is not None and is_terminal(last) and last.attempt >= job.attempt:
            if getattr(last, "worker", None) is not None:
                return "ack"  # finished before its ack got through (its worker died in between)
            # Ended by the API (cancelled while queued): say that no worker holds it any more.
            return msgspec.structs.replace(last, attempt=ids["attempt"], worker=ids["worker"], ts=utcnow())
        in_flight = isinstance(last, Started | Progress) and last.attempt >= job.attempt
        # Redelivered while it runs (its runner's heartbeats were lost for AckWait, as in a leader
        # election): a live runner keeps the job, and it alone ends it.
        if in_flight and self.nc is not None and await runner_of(self.nc, job.job_id) is not None:
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

    async def _finish(self, running: RunningJob, event: Event) -> None:
        event = await self._record(event)
        log.info(
            "job %s %s", event.job_id, event.kind, extra={"job_id": event.job_id, "attempt": event.attempt}
        )
        await running.msg.ack()

    # cancellation ------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        running = self._running.get(job_id_of(msg.subject))
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

    # publishing ----------------------------------------------------------------------

    async def _last(self, subject: str) -> Event | None:
        assert self.js is not None
        try:
            raw = await self.js.get_last_msg(STREAM, subject, direct=True)
        except NotFoundError:
            return None
        try:
            return decode_event(raw.data or b"")
        except msgspec.MsgspecError:
            return None

    async def _publish(self, event: Event, msg_id: str | None = None) -> None:
        assert self.js is not None
        headers = {KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        # A file's `file_stored` goes on the file's own subject: it outlives the job's history
        # when the job is deleted and its files are kept.
        subject = (
            files_subject(event.file_id) if isinstance(event, FileStored) else events_subject(event.job_id)
        )
        await self.js.publish(subject, encode_event(event), headers=headers)

    async def _publish_reliably(self, event: Event) -> None:
        """Publish an event, riding out a broker restart for `publish_retry_s`; the msg id makes
        retries safe. Raises EventRejectedError when no retry can help, PublishGaveUpError after."""
        msg_id = f"{event.job_id}:{event.attempt}:{event.kind}"
        if isinstance(event, FileStored):
            msg_id += f":{event.file_id}"
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.publish_retry_s
        delay = 0.1
        while True:
            try:
                await self._publish(event, msg_id=msg_id)
                return
            except (nats.errors.MaxPayloadError, BadRequestError) as exc:
                # Too big for the server's max_payload, or refused by the stream (e.g. its
                # max_msg_size): the same bytes fail the same way every time.
                size = len(encode_event(event))
                raise EventRejectedError(
                    f"the {event.kind} event ({size} bytes) could not be stored: {exc or type(exc).__name__}"
                ) from exc
            except (nats.errors.Error, TimeoutError) as exc:
                if loop.time() >= give_up_at:
                    raise PublishGaveUpError(
                        f"publishing {event.kind} failed for {seconds_text(self.settings.publish_retry_s)} s "
                        f"({exc or type(exc).__name__})"
                    ) from exc
                log.warning("publishing %s for %s failed (%s); retrying", event.kind, event.job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _record(self, event: Event) -> Event:
        """Publish the event that ends an attempt; one the stream cannot take becomes a small
        `failed` that says why (the job must end either way). Returns what was published."""
        try:
            await self._publish_reliably(event)
        except EventRejectedError as exc:
            log.error("job %s: %s", event.job_id, exc, extra={"job_id": event.job_id})
            event = Failed(
                job_id=event.job_id, attempt=event.attempt, worker=self.settings.name, error=str(exc)
            )
            await self._publish_reliably(event)
        return event
