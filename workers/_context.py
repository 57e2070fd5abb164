"""What a handler gets: its job, a throttled progress reporter, and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from streams import MEDIA_UNIT_OPERATIONS, Submitted
from workers._errors import JobCancelledError, PermanentError
from workers._eta import JobEta
from workers._files import WorkerFiles
from workers._settings import WorkerSettings

P = ParamSpec("P")
T = TypeVar("T")

PublishProgress = Callable[[float, str], Awaitable[None]]


class Reporter:
    """Progress updates, throttled to at most one event per `min_interval` or `min_delta` percent.

    `update` is cheap and thread-safe, so blocking code running in a thread may call it;
    the latest value is always published eventually (`flush` forces it out).
    """

    def __init__(
        self,
        publish: PublishProgress,
        loop: asyncio.AbstractEventLoop,
        min_interval: float = 0.25,
        min_delta: float = 1.0,
    ) -> None:
        self._publish = publish
        self._loop = loop
        self._min_interval = min_interval
        self._min_delta = min_delta
        self._lock = threading.Lock()
        self._pending: tuple[float, str] | None = None
        self._last_value = -100.0
        self._last_at = 0.0
        self._pump: asyncio.Task[None] | None = None
        self._loop_thread = threading.get_ident()  # created on the loop's thread

    def update(self, percent: float, step: str = "") -> None:
        """Record progress (0-100) and the current step."""
        percent = min(100.0, max(0.0, float(percent)))
        with self._lock:
            self._pending = (percent, step)
        if threading.get_ident() == self._loop_thread:
            self._kick()
        else:
            self._loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = self._loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with self._lock:
                pending = self._pending
            if pending is None:
                return
            wait = self._last_at + self._min_interval - time.monotonic()
            if wait > 0 and abs(pending[0] - self._last_value) < self._min_delta:
                await asyncio.sleep(wait)
                continue
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_value, self._last_at = pending[0], time.monotonic()
            await self._publish(*pending)

    async def flush(self) -> None:
        """Publish what is pending now, ignoring the throttle."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            await asyncio.wait([self._pump])
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._last_value, self._last_at = pending[0], time.monotonic()
            await self._publish(*pending)

    async def announce(self, step: str) -> None:
        """Publish `step` now at the current percent (the runtime's own steps, such as stopping)."""
        with self._lock:
            percent = self._pending[0] if self._pending is not None else max(0.0, self._last_value)
            self._pending = (percent, step)
        await self.flush()


class JobContext:
    """Everything a handler may use while it runs one job."""

    def __init__(
        self,
        job: Submitted,
        attempt: int,
        delivery: int,
        reporter: Reporter,
        files: WorkerFiles | None = None,
        workdir: Path | None = None,
        settings: WorkerSettings | None = None,
        scratch_prefix: str | None = None,
        time_limit_s: float = 3600.0,
        time_per_media_s: float = 0.0,
        llm_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.job = job
        self.settings = settings or WorkerSettings()
        """The worker's settings (LLM endpoint, concurrency, ...)."""
        self.llm_slots = llm_slots or asyncio.Semaphore(self.settings.llm_concurrency)
        """The worker's MAX_LLM_CONCURRENCY slots, shared by all its jobs: each HTTP request to the
        LLM holds one while in flight (without a worker, this job's own)."""
        self.files = files
        self._workdir = workdir
        self._scratch_prefix = scratch_prefix
        self._workdir_lock = threading.Lock()
        self.scratch: Path | None = None
        """The folder `workdir` made, if a handler asked for it; the runtime removes it."""
        self.saved: list[tuple[Path, dict[str, Any]]] = []
        """Each output stored so far: the local file it was read from, and its result entry (what
        the stage cache keeps of a run)."""
        self.attempt = attempt
        """Run number of this job, counting every delivery and manual retry."""
        self.delivery = delivery
        """JetStream delivery count of this submission (1 on the first run)."""
        self.reporter = reporter
        self.cancelled = threading.Event()
        """Set once the job is cancelled or past its run-time limit; blocking code polls it between
        steps."""
        self._cancelled_async: asyncio.Event | None = None
        self.time_limit_s = time_limit_s
        """The run-time limit of this attempt in seconds; the runtime stops the handler past it."""
        self._base_limit_s = time_limit_s
        self._time_per_media_s = time_per_media_s
        self._threads = 0
        self._threads_idle = asyncio.Event()
        self._threads_idle.set()
        self.eta = JobEta(time.monotonic())
        """The run's ETA: its units come from `media_duration` / `work_units`, its learned speed from
        the runtime; every progress event carries its estimate."""

    @property
    def workdir(self) -> Path:
        """A private scratch folder, made on first use (most jobs need none) and removed when the
        job ends; without a `scratch_prefix`, the given folder or the system's temp folder."""
        with self._workdir_lock:
            if self._workdir is None:
                if self._scratch_prefix is None:
                    return Path(tempfile.gettempdir())
                self._workdir = self.scratch = Path(tempfile.mkdtemp(prefix=self._scratch_prefix))
            return self._workdir

    @property
    def params(self) -> dict[str, Any]:
        """The validated params of the job."""
        return self.job.params

    def progress(self, percent: float, step: str = "") -> None:
        """Report progress; throttled, thread-safe."""
        self.reporter.update(percent, step)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but raise JobCancelledError as soon as the job is cancelled."""
        if self._cancelled_async is None:
            self._cancelled_async = asyncio.Event()
            if self.cancelled.is_set():
                self._cancelled_async.set()
        try:
            async with asyncio.timeout(seconds):
                await self._cancelled_async.wait()
        except TimeoutError:
            return
        raise JobCancelledError("cancelled")

    def cancel(self) -> None:
        """Mark the job cancelled (called by the runtime on the event loop)."""
        self.cancelled.set()
        if self._cancelled_async is not None:
            self._cancelled_async.set()

    def check_cancelled(self) -> None:
        """Raise JobCancelledError if the job was cancelled; call between steps."""
        if self.cancelled.is_set():
            raise JobCancelledError("cancelled")

    async def input_file(self) -> Path:
        """The job's input file, downloaded into the work folder."""
        if self.job.file_id is None:
            raise PermanentError("this operation needs a file_id")
        assert self.files is not None, "the runtime provides file access"
        return await self.files.fetch(self.job.file_id, self.workdir)

    async def save_output(self, path: Path, name: str, content_type: str) -> dict[str, Any]:
        """Store an output file as the job owner's; returns its result entry (id, name, url, ...).

        Raises JobCancelledError once the job was cancelled or ran past its limit: work that ended
        after it was told to stop (whisper finishing its last segment) leaves no outputs behind.
        """
        assert self.files is not None, "the runtime provides file access"
        self.check_cancelled()
        entry = await self.files.save(path, name, content_type, self.job.owner, self.job.job_id)
        self.saved.append((path, entry))
        return entry

    def media_duration(self, seconds: float) -> None:
        """Say how long the input media is: an operation's default run-time limit grows with it."""
        if self._time_per_media_s:
            self.time_limit_s = self._base_limit_s + self._time_per_media_s * max(0.0, seconds)
        if self.job.type in MEDIA_UNIT_OPERATIONS:
            self.eta.units = max(0.0, seconds)

    def work_units(self, units: float) -> None:
        """Say how many units of work (LLM chunks) the job has: its ETA is counted in them."""
        self.eta.units = max(0.0, units)

    async def run_blocking(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking work in a thread; the runtime's heartbeat keeps the job alive meanwhile.

        The thread is counted until it returns, even when the awaiting task is cancelled first, so
        the runtime frees the job's slot only once the thread has really stopped (`threads_stopped`).
        """
        loop = asyncio.get_running_loop()
        self._threads += 1
        self._threads_idle.clear()

        def call() -> T:
            try:
                return func(*args, **kwargs)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(self._thread_ended)

        return await loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, call))

    def _thread_ended(self) -> None:
        self._threads -= 1
        if self._threads == 0:
            self._threads_idle.set()

    @property
    def threads_running(self) -> int:
        """Threads of `run_blocking` that have not returned yet."""
        return self._threads

    async def threads_stopped(self, timeout: float | None) -> bool:
        """Wait until every `run_blocking` thread has returned; False if some still run at `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._threads_idle.wait()
        except TimeoutError:
            return False
        return True


class Handler(Protocol):
    """An operation: runs one job and returns its result."""

    async def __call__(self, ctx: JobContext) -> dict[str, Any] | None: ...
