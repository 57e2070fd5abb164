"""The fetch path: a pool's jobs pulled highest priority first, as slots free up.

One durable consumer per priority keeps each priority FIFO (streams.WorkerConsumer). A worker asks
the priorities that may hold jobs, highest first, without waiting (`no_wait`: one round trip
each), and learns which may hold jobs from a doorbell: a plain NATS subscription on the pool's
submit subjects. Why not nats.py's `fetch` or JetStream's priority groups: docs/architecture.md,
"Priorities".
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from streams import PRIORITIES, STREAM, WorkerConsumer
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

_NO_WAIT = b'{"batch":1,"no_wait":true}'
BELL_RECHECK_S = 0.05
"""After the doorbell rings, how long an empty pull is retried at once rather than slept on."""
PULL_TIMEOUT_S = 5.0
"""How long a pull waits for JetStream's answer (a `no_wait` pull is answered at once)."""
PULL_ERROR_PAUSE_S = 0.2
"""After a pull fails (the broker away), how long the fetch loop pauses before it asks on."""


def pull_subject(durable: str) -> str:
    """The JetStream API subject that hands out the next messages of consumer `durable`."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}"


class Fetcher:
    """Takes jobs from a pool's priority consumers, highest first, as many as there are free slots."""

    def __init__(self, settings: WorkerSettings, consumers: dict[int, WorkerConsumer]) -> None:
        self.settings = settings
        self.consumers = consumers
        self._hot: set[int] = set(PRIORITIES)
        """Priorities that may hold jobs; all of them at first."""
        self._doorbell = asyncio.Event()
        self._rung: dict[int, float] = {}
        """When the doorbell last rang for each priority (loop time)."""
        self._unanswered: Counter[int] = Counter()
        """Bells per priority not yet matched by a job pulled from it: while there are none, an
        empty pull is not retried (it would be, every millisecond for BELL_RECHECK_S)."""

    def wake(self) -> None:
        """End an idle wait now (to notice a stop request)."""
        self._doorbell.set()

    async def on_submission(self, msg: Msg) -> None:
        """The doorbell: a job was just submitted to this pool at the subject's priority."""
        token = msg.subject.split(".")[3]
        priority = -int(token[1:]) if token.startswith("m") else int(token[1:])
        self._hot.add(priority)
        self._rung[priority] = asyncio.get_running_loop().time()
        self._unanswered[priority] += 1
        self._doorbell.set()

    async def run(
        self,
        nc: Client,
        *,
        busy: Callable[[], int],
        slot_free: asyncio.Event,
        stopping: asyncio.Event,
        dispatch: Callable[[Msg], None],
    ) -> None:
        """Hand every job pulled to `dispatch` while fewer than `slots` are `busy`, until `stopping`."""
        # Ask each priority that may hold jobs, highest first, for as many jobs as there are free
        # slots (one round trip for all of them); with nothing anywhere, sleep until the doorbell
        # rings, re-asking every priority now and then for redeliveries and retries, which ring
        # no bell.
        while not stopping.is_set():
            # `busy` counts tasks, not running jobs: a job holds its slot from the moment it is fetched.
            if busy() >= self.settings.slots:
                slot_free.clear()
                await slot_free.wait()
                continue
            self._doorbell.clear()
            msgs = await self._pull_highest(nc, self.settings.slots - busy())
            now = asyncio.get_running_loop().time()
            recent = [p for p, at in self._rung.items() if now - at < BELL_RECHECK_S] if not msgs else []
            if recent:
                # The bell (a core subscription) can ring before the stream has stored the
                # submission, so the pull right after it finds nothing: ask again shortly instead
                # of sleeping until the idle poll (up to 0.5 s of dispatch latency otherwise).
                self._hot.update(recent)
                await asyncio.sleep(0.001)
            elif not msgs:
                self._rung.clear()
                self._unanswered.clear()
                try:
                    async with asyncio.timeout(self.settings.idle_poll_s):
                        await self._doorbell.wait()
                except TimeoutError:
                    self._hot.update(PRIORITIES)
            elif stopping.is_set():
                for each in msgs:
                    await each.nak()
            else:
                for each in msgs:
                    dispatch(each)

    async def _pull_highest(self, nc: Client, free: int) -> list[Msg]:
        """Up to `free` jobs from the highest priority that has any, asking only the hot ones."""
        for priority in PRIORITIES:
            if priority not in self._hot:
                continue
            self._hot.discard(priority)  # before asking: a bell meanwhile puts it back
            msgs = await self._pull(nc, self.consumers[priority].durable, free)
            if msgs:
                self._hot.add(priority)
                self._unanswered[priority] -= len(msgs)
                if self._unanswered[priority] <= 0:
                    del self._unanswered[priority]
                    self._rung.pop(priority, None)
                return msgs
        return []

    async def _pull(self, nc: Client, durable: str, count: int) -> list[Msg]:
        """Up to `count` jobs from a consumer if it has them, without waiting (one round trip)."""
        if count <= 1:
            msg = await self._pull_one(nc, durable)
            return [] if msg is None else [msg]
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
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, cb=on_reply)
            try:
                await nc.publish(pull_subject(durable), request, reply=inbox)
                async with asyncio.timeout(PULL_TIMEOUT_S):
                    await over
            finally:
                await sub.unsubscribe()
        except TimeoutError:
            pass  # keep what came; a job that arrives after this is redelivered after ack_wait
        except nats.errors.Error as exc:
            await _pause_after(durable, exc)
        return got

    async def _pull_one(self, nc: Client, durable: str) -> Msg | None:
        """One job from a consumer if it has one, without waiting (one round trip)."""
        try:
            # old_style: JetStream answers on the inbox with the job's own subject, which
            # the shared response mux cannot match; a per-request inbox matches by sid.
            msg = await nc.request(pull_subject(durable), _NO_WAIT, timeout=PULL_TIMEOUT_S, old_style=True)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None
        except nats.errors.Error as exc:
            await _pause_after(durable, exc)
            return None
        if msg.headers and msg.headers.get("Status"):
            return None  # 404 no messages, 408 expired, 409 consumer changed: nothing now
        return msg


async def _pause_after(durable: str, exc: Exception) -> None:
    # Not a retry of its own: the fetch loop asks on (the next priority, then all of them at the
    # idle poll); the pause keeps it from spinning while the broker is away.
    log.debug("pull from %s failed: %s", durable, exc)
    await asyncio.sleep(PULL_ERROR_PAUSE_S)
