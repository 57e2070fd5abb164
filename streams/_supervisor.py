"""Long-lived tasks that do not die in silence: logged, restarted with capped backoff, reported.

The API's projection, key watch and webhook sweep, and the worker's fetch loop and heartbeat,
each run under a `TaskSupervisor`. A task that raises (or returns while it should run for
ever) has its traceback logged and is started again after an exponential, jittered delay
capped at `max_backoff_s`; the delay starts over once a run has stayed up `healthy_s`.
`status()` says what runs and what is down, for `/ready` and the worker's heartbeat.
It knows nothing of Litestar or NATS, so the API and the workers share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec

from streams._events import utcnow

log = logging.getLogger("jobcast.supervisor")

STOP_TIMEOUT_S = 2.0
"""How long `stop` waits for the cancelled tasks: on 3.11 a cancel that races with
asyncio.timeout's own can leave a task pending for good; it is left behind, not waited on."""


class TaskPhase(enum.StrEnum):
    """Where a supervised task is."""

    RUNNING = "running"
    RESTARTING = "restarting"
    """It failed and waits for its next start."""
    FINISHED = "finished"
    """It ended because it was asked to (the supervisor stopped, or its `until` event was set)."""


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One supervised task as `/ready` and the worker heartbeat show it."""

    state: TaskPhase
    since: datetime
    """When it entered this state (UTC)."""
    restarts: int = 0
    """How many times it failed (each failure is followed by a restart)."""
    last_error: str | None = None
    """Its latest failure (`Type: message`); kept after it runs again, for the operator."""


class TaskSupervisor:
    """Runs named long-lived tasks and restarts any that fails."""

    def __init__(
        self,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        healthy_s: float = 60.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Args:
        backoff_s: the delay after a first failure; it doubles with each further one.
        max_backoff_s: the cap of that delay.
        healthy_s: a run that lasted this long resets the delay to `backoff_s`.
        on_change: called after every change of a task's state (e.g. to publish it at once).
        """
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_s = healthy_s
        self.on_change = on_change
        self._states: dict[str, TaskState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(
        self, name: str, factory: Callable[[], Awaitable[None]], *, until: asyncio.Event | None = None
    ) -> asyncio.Task[None]:
        """Run `factory()` as task `name`, and again whenever it fails.

        Without `until`, the task is meant to run until `stop`: returning counts as a failure.
        With it, a return (or a pending restart) once `until` is set ends the task for good.
        Returns the supervising task, which ends when the supervised one has finished.
        """
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is supervised already")
        self._set(name, TaskPhase.RUNNING)
        task = asyncio.create_task(self._supervise(name, factory, until), name=name)
        self._tasks[name] = task
        return task

    async def stop(self) -> None:
        """Cancel every task (no restart follows) and wait for them, bounded."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for task in stuck:
                log.warning("task %s did not stop within %.0f s", task.get_name(), STOP_TIMEOUT_S)
        for name in self._tasks:
            if self._states[name].state != TaskPhase.FINISHED:
                self._set(name, TaskPhase.FINISHED)

    def status(self) -> dict[str, TaskState]:
        """Every task's state, by name."""
        return dict(self._states)

    def down(self) -> list[str]:
        """The names of the tasks that are not running, sorted."""
        return sorted(name for name, state in self._states.items() if state.state != TaskPhase.RUNNING)

    async def _supervise(
        self, name: str, factory: Callable[[], Awaitable[None]], until: asyncio.Event | None
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff_s
        while True:
            began = loop.time()
            trace: BaseException | None
            try:
                await factory()
                if until is not None and until.is_set():
                    self._set(name, TaskPhase.FINISHED)
                    return
                error, trace = "returned while it should run until stopped", None
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    self._set(name, TaskPhase.FINISHED)
                    raise
                # Not cancelled itself: something it awaited was (a bug, like any other).
                error, trace = "CancelledError: an awaited future was cancelled", exc
            except Exception as exc:
                error, trace = f"{type(exc).__name__}: {exc}", exc
            if loop.time() - began >= self.healthy_s:
                delay = self.backoff_s
            wait = random.uniform(delay / 2, delay)
            log.error(
                "task %s failed (%s); restarting in %.2f s",
                name,
                error,
                wait,
                exc_info=trace,
                extra={"task": name},
            )
            self._set(name, TaskPhase.RESTARTING, error=error, failed=True)
            if until is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await until.wait()
                if until.is_set():
                    self._set(name, TaskPhase.FINISHED)
                    return
            delay = min(delay * 2, self.max_backoff_s)
            self._set(name, TaskPhase.RUNNING)
            log.info("task %s restarted", name, extra={"task": name})

    def _set(self, name: str, state: TaskPhase, *, error: str | None = None, failed: bool = False) -> None:
        before = self._states.get(name)
        self._states[name] = TaskState(
            state=state,
            since=utcnow(),
            restarts=(before.restarts if before else 0) + failed,
            last_error=error or (before.last_error if before else None),
        )
        if self.on_change is not None:
            self.on_change()
