"""The worker runtime: a process's lifecycle around the fetch path and the running of jobs.

It connects, declares the stream and the pool's consumers, subscribes to the doorbell and the
control subjects, runs the fetch loop and the heartbeat under a supervisor, and on SIGTERM stops
fetching and gives running jobs `grace_s` to finish (arq's behaviour). The fetch path is in
workers/_fetch.py, one delivery of a job in workers/_attempt.py, publishing events in
workers/_events.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import nats.errors
import stamina
from nats.aio.client import Client
from nats.js import JetStreamContext

from streams import (
    ALL_CONTROL,
    PRIORITIES,
    TaskSupervisor,
    WorkerConsumer,
    cache_bucket,
    cache_files_store,
    close_quietly,
    connect,
    ensure_consumer,
    ensure_stream,
    files_store,
    is_transient,
    pool_submissions,
    speeds_bucket,
)
from workers._attempt import AttemptRunner
from workers._cache import StageCache
from workers._context import Handler
from workers._eta import SpeedBook
from workers._events import Events
from workers._fetch import Fetcher
from workers._files import WorkerFiles
from workers._heartbeat import Heartbeat
from workers._registry import CACHE_IDENTITY, handlers_for_pool, models_loaded
from workers._running import RunningJob
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

DECLARE_WAIT_INITIAL_S = 0.2
"""First pause after declaring the stream and consumers failed; it doubles up to DECLARE_WAIT_MAX_S."""
DECLARE_WAIT_MAX_S = 5.0


class Worker:
    """Takes jobs of one pool from JetStream and runs them, `settings.slots` at a time."""

    def __init__(self, settings: WorkerSettings, handlers: dict[str, Handler] | None = None) -> None:
        self.settings = settings
        self.handlers = handlers if handlers is not None else handlers_for_pool(settings.pool)
        self.consumers = {
            priority: WorkerConsumer(pool=settings.pool, priority=priority, ack_wait_s=settings.ack_wait_s)
            for priority in PRIORITIES
        }
        self.fetcher = Fetcher(settings, self.consumers)
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

    def request_stop(self) -> None:
        """Stop fetching; running jobs get `grace_s` to finish (arq's SIGTERM behaviour)."""
        self._stopping.set()
        self._slot_free.set()
        self.fetcher.wake()

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
            events = Events(self.js, self.settings)
            self.files = WorkerFiles(await files_store(self.js), events.publish_reliably)
            cache = StageCache(
                self.js, await cache_bucket(self.js), await cache_files_store(self.js),
                self.settings.cache_max_bytes, CACHE_IDENTITY,
            )  # fmt: skip
            attempts = AttemptRunner(
                self.nc, self.settings, self.handlers, events, self.files, running=self._running,
                llm_slots=self.llm_slots, announce=self._announce, slot_free=self._slot_free, cache=cache,
                speeds=SpeedBook(await speeds_bucket(self.js)),
            )  # fmt: skip
            await self.nc.subscribe(ALL_CONTROL, cb=attempts.on_control)
            await self.nc.subscribe(pool_submissions(self.settings.pool), cb=self.fetcher.on_submission)
            self.heartbeat = Heartbeat(
                self.js, self.settings.name, self.settings.pool, self.settings.slots, self.supervisor,
                models_loaded,
            )  # fmt: skip
            await self.heartbeat.start()
            self.ready.set()
            log.info(
                "worker %s: pool %s, %d slot(s)", self.settings.name, self.settings.pool, self.settings.slots
            )
            nc = self.nc

            async def fetch_loop() -> None:
                await self.fetcher.run(
                    nc, busy=lambda: len(self._tasks), slot_free=self._slot_free, stopping=self._stopping,
                    dispatch=lambda msg: self._spawn(attempts.process(msg)),
                )  # fmt: skip

            await self.supervisor.start("fetch", fetch_loop, until=self._stopping)
            await self._shutdown()
            await self.supervisor.stop()
            await self.heartbeat.stop()
        finally:
            await self.supervisor.stop()
            await close_quietly(self.nc)

    async def _declare(self) -> None:
        """Stream and consumers; retried while the broker is away (it may restart as we start)."""
        assert self.js is not None

        def retryable(exc: Exception) -> bool:
            return is_transient(exc) and not self._stopping.is_set()

        async for attempt in stamina.retry_context(
            on=retryable, attempts=None, timeout=None,
            wait_initial=DECLARE_WAIT_INITIAL_S, wait_max=DECLARE_WAIT_MAX_S, wait_jitter=0.0,
        ):  # fmt: skip
            with attempt:
                try:
                    await ensure_stream(self.js, update=False)  # the API owns its limits
                    for consumer in self.consumers.values():
                        await ensure_consumer(self.js, consumer)
                except (nats.errors.Error, TimeoutError) as exc:
                    if retryable(exc):
                        log.warning(
                            "declaring the stream and consumers failed (%s); retrying in %.1f s",
                            exc, attempt.next_wait,
                        )  # fmt: skip
                    raise

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
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

    def _announce(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.update(list(self._running))
