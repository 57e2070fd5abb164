"""Worker heartbeats in a KV bucket with a TTL: a live worker refreshes its key, a dead one's expires."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from streams import (
    ProcessUsage,
    TaskSupervisor,
    WorkerInfo,
    cpu_count,
    machine_id,
    rss_mb,
    worker_ttl,
    workers_bucket,
)

log = logging.getLogger("jobcast.worker")

MIN_BEAT_GAP_S = 0.2
"""The least time between two beats. A busy worker starts and ends jobs thousands of times a second,
and a beat for each (cgroup and RSS reads, and a KV put that every API's watch receives) took about
8 % of its CPU under P2. The API's view of free slots (a 202's `estimated_start_s`) may lag this much."""


class Heartbeat:
    """Keeps `<pool>.<name>` fresh in the workers bucket while the worker lives."""

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        pool: str,
        slots: int,
        tasks: TaskSupervisor,
        models_loaded: Callable[[], int] = lambda: 0,
    ) -> None:
        self.js = js
        self.tasks = tasks
        """Runs the beating loop (task `heartbeat`) and the CPU sampler (task `cpu-sampler`); their status
        goes into every beat."""
        self.models_loaded = models_loaded
        """How many models the process holds loaded, for every beat."""
        self.usage = ProcessUsage()
        self.key = f"{pool}.{re.sub(r'[^A-Za-z0-9_=-]', '-', name)}"
        self.info = WorkerInfo(
            name=name, pool=pool, slots=slots, running=[], host=socket.gethostname(), pid=os.getpid(),
            started_at=time.time(), last_seen=time.time(), machine=machine_id(), machine_cpus=os.cpu_count() or 0,
        )  # fmt: skip
        self._kv: KeyValue | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Announce the worker and keep announcing it."""
        self._kv = await workers_bucket(self.js)
        await self._beat()
        self.tasks.start("cpu-sampler", self.usage.run)
        self.tasks.start("heartbeat", self._loop)

    def update(self, running: list[str]) -> None:
        """The jobs running now; published at once (at most MIN_BEAT_GAP_S after the last beat), not at
        the next periodic beat."""
        self.info.running = running
        self._wake.set()

    async def stop(self) -> None:
        """Remove the key once `tasks` has stopped the loop: the worker is gone now, not in TTL seconds."""
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self.key)

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races
            # with the event being set, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(worker_ttl() / 3):
                    await self._wake.wait()
            self._wake.clear()
            await self._beat()
            # A change wakes a beat at once, but beats come at most one per MIN_BEAT_GAP_S: what
            # changes meanwhile goes out with the next.
            await asyncio.sleep(MIN_BEAT_GAP_S)

    async def _beat(self) -> None:
        assert self._kv is not None
        self.info.last_seen = time.time()
        self.info.tasks = self.tasks.status()
        self.info.cpu_percent = self.usage.cpu_percent()
        self.info.cpu_count = cpu_count()  # both change when a container's limits are updated live
        self.info.cpu_quota = self.usage.cgroups.cpu_quota()
        self.info.rss_mb = rss_mb()
        self.info.models_loaded = self.models_loaded()
        try:
            await self._kv.put(self.key, msgspec.json.encode(self.info))
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("heartbeat failed: %s", exc)
