"""Stream and consumer configuration, as data.

Every process calls `ensure_stream`; the definitions below are the only source of
truth for how JetStream keeps jobs. The KV buckets and the files store are in
streams/_buckets.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from dataclasses import dataclass, replace

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError

from streams._env import env_float, env_int
from streams._errors import ReplicasError
from streams._limits import MAX_DELIVER
from streams._subjects import ALL_SUBJECTS, STREAM, pool_submissions, priority_token

log = logging.getLogger("jobcast.streams")


class Pool(enum.StrEnum):
    """Worker pools: each has its own durable consumer."""

    GPU = "gpu"
    CPU = "cpu"
    LLM = "llm"


STREAM_MAX_BYTES = 10 * 2**30
"""Default size limit of the JOBS stream, 10 GiB (JOBCAST_STREAM_MAX_BYTES; 0: no limit). Retention
(JOBCAST_RETENTION_DAYS) keeps the stream well below it; see ADMISSION_SHARE for what happens
near it."""
ADMISSION_SHARE = 0.9
"""New work (submissions, retries, uploads) is refused with 503 "storage full" once the stream
holds this share of its max_bytes; the rest is room for the events of the jobs already accepted,
so that they can finish and the limit itself is never reached."""
DUPLICATE_WINDOW_S = 120.0
"""Default duplicate window (JOBCAST_DUPLICATE_WINDOW_S)."""

JOBS_STREAM = js_api.StreamConfig(
    name=STREAM,
    description="jobcast: job submissions, lifecycle events and control messages",
    subjects=[ALL_SUBJECTS],
    # Limits retention: the stream is the log the API's SQLite projection is rebuilt
    # from, so messages stay after workers ack them, until the job is deleted (its subjects
    # are purged then) or retention deletes it.
    retention=js_api.RetentionPolicy.LIMITS,
    storage=js_api.StorageType.FILE,
    # A re-sent publish with the same Nats-Msg-Id inside this window is dropped by the
    # server: this is what makes an API retry after a lost PubAck harmless.
    duplicate_window=DUPLICATE_WINDOW_S,
    # Direct gets let workers read the last control/event message of a job cheaply.
    allow_direct=True,
    # `scheduled_for`: the stream itself holds a scheduled submission (jobs.schedule.<id>)
    # and publishes it to its jobs.submit subject when it is due (nats-server >= 2.12).
    allow_msg_schedules=True,
    # A deleted job's tombstone (jobs.deleted.<id>) expires by itself (header Nats-TTL).
    allow_msg_ttl=True,
    max_bytes=STREAM_MAX_BYTES,
    # At max_bytes the server drops the oldest messages (DiscardOld); nats-server does not allow
    # DiscardNew, which would refuse new ones instead, on a stream with message schedules. The
    # API therefore stops taking new work well before the limit (ADMISSION_SHARE), so that
    # nothing accepted is ever dropped.
    discard=js_api.DiscardPolicy.OLD,
)


MAX_REPLICAS = 5
"""JetStream keeps at most five copies of a stream."""


def stream_replicas() -> int:
    """JOBCAST_STREAM_REPLICAS (default 1): how many cluster nodes keep a copy of the JOBS stream, every
    KV bucket and the files store; 3 on a cluster, so that losing one node loses nothing.

    Raises:
        ValueError: not a whole number from 1 to MAX_REPLICAS.
    """
    text = os.environ.get("JOBCAST_STREAM_REPLICAS", "").strip() or "1"
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise ValueError(f"JOBCAST_STREAM_REPLICAS={text!r}: a whole number from 1 to {MAX_REPLICAS}")
    return int(text)


def jobs_stream() -> js_api.StreamConfig:
    """JOBS_STREAM with the settings in force: JOBCAST_STREAM_MAX_BYTES, JOBCAST_DUPLICATE_WINDOW_S and
    JOBCAST_STREAM_REPLICAS (the API brings the stream in line with them as it starts; workers only
    create it if missing)."""
    max_bytes = env_int("JOBCAST_STREAM_MAX_BYTES", STREAM_MAX_BYTES)
    window = env_float("JOBCAST_DUPLICATE_WINDOW_S", DUPLICATE_WINDOW_S)
    return replace(
        JOBS_STREAM, max_bytes=max_bytes if max_bytes > 0 else -1, duplicate_window=window,
        num_replicas=stream_replicas(),
    )  # fmt: skip


INSUFFICIENT_STORAGE = 10047
"""JetStream's error code when the server cannot reserve a stream's max_bytes in its store."""


STREAM_NAME_IN_USE = 10058
"""JetStream's error code for a create whose stream exists with another configuration."""
PLACEMENT_ERRORS = frozenset({10074, 10005})
"""Replicas the server cannot place: it is not clustered, or has too few suitable nodes."""


def refuse_placement(exc: APIError, what: str, replicas: int) -> None:
    """Raise a ReplicasError that says what to do when `exc` is the server refusing the replicas."""
    if exc.err_code in PLACEMENT_ERRORS:
        raise ReplicasError(
            f"{what} cannot be created with {replicas} replicas ({exc.description}): JOBCAST_STREAM_REPLICAS="
            f"{replicas} needs a JetStream cluster of at least {replicas} nodes; on one nats-server leave it at 1"
        ) from exc


async def raise_replicas(js: JetStreamContext, held: js_api.StreamInfo, replicas: int, what: str) -> None:
    """Raise an existing stream's replicas to `replicas`, or log why it cannot; never lowers them."""
    have = held.config.num_replicas or 1
    if have >= replicas:
        return
    name = held.config.name
    try:
        await js.update_stream(config=replace(held.config, num_replicas=replicas))
    except APIError as exc:
        log.error(
            "%s keeps %d replica(s), not the %d JOBCAST_STREAM_REPLICAS asks for: %s. Start enough JetStream "
            "nodes, then restart the API or run `nats stream edit %s --replicas %d`",
            what, have, replicas, exc.description, name, replicas,
        )  # fmt: skip
        return
    log.info("%s: replicas raised from %d to %d", what, have, replicas)
    await _settled(js, name or "", replicas)


SETTLE_TIMEOUT_S = 30.0
"""How long a stream whose replicas were just raised may take to elect its new leader and copy itself."""


async def _settled(js: JetStreamContext, name: str, replicas: int) -> None:
    """Return once stream `name` has a leader and `replicas - 1` current followers: until then its
    publishes time out (the new group elects its leader, then copies the stream to the new peers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT_S
    while loop.time() < deadline:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            cluster = (await js.stream_info(name)).cluster
            peers = (cluster.replicas or []) if cluster is not None and cluster.leader else None
            if peers is not None and len(peers) >= replicas - 1 and all(peer.current for peer in peers):
                return
        await asyncio.sleep(0.1)
    log.warning("stream %s has not settled on %d replicas within %.0f s", name, replicas, SETTLE_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class WorkerConsumer:
    """The durable pull consumer a pool's workers share for one priority.

    One consumer per priority keeps each priority FIFO; workers ask the highest
    priority first, so a high-priority job never waits behind low-priority ones.
    """

    pool: str
    priority: int = 0
    ack_wait_s: float = 30.0
    """Unacked this long, a message is redelivered. Workers send in_progress() every
    ack_wait/3 while a job runs, so only a dead worker lets it expire."""
    max_deliver: int = MAX_DELIVER
    """Server-side backstop, one past the highest `max_attempts` (MAX_ATTEMPTS): the per-job
    limit is `max_attempts`, enforced by the worker, which fails a job whose deliveries exceed
    it (e.g. a job that kills its worker). Were it lower, a job still asking to retry would
    never be delivered again and stay `retrying` for ever."""
    max_ack_pending: int = 1000
    """Jobs handed out but not yet acked, across all workers of the pool."""

    @property
    def durable(self) -> str:
        """Durable name: worker processes of one pool share it and survive restarts."""
        return f"workers-{self.pool}-{priority_token(self.priority)}"

    def config(self) -> js_api.ConsumerConfig:
        """The ConsumerConfig for this pool."""
        # No BackOff: with one, the server ignores the delay of a nak (it redelivers at
        # BackOff[n] - AckWait + delay), so the worker's retry backoff would not hold and a job
        # asking for 50 attempts would take most of an hour. A dead worker's job comes back
        # after AckWait; a crash loop ends at the job's max_attempts (the worker's precheck).
        return js_api.ConsumerConfig(
            durable_name=self.durable,
            filter_subject=pool_submissions(self.pool, self.priority),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            max_waiting=512,
        )


async def ensure_stream(js: JetStreamContext, *, update: bool = True) -> None:
    """Create the JOBS stream, or, with `update`, bring an existing one in line with `jobs_stream()`
    (its limits included: a changed JOBCAST_STREAM_MAX_BYTES applies at the API's next start).

    Workers pass update=False: a worker on another machine, started without the API's settings,
    must not move the stream's limits (a smaller byte limit would discard the oldest messages,
    live jobs' submissions among them, at once).
    """
    config = jobs_stream()
    try:
        await _add_or_update(js, config, update)
    except APIError as exc:
        if exc.err_code != INSUFFICIENT_STORAGE or os.environ.get("JOBCAST_STREAM_MAX_BYTES"):
            raise
        # The default limit is more than this server's JetStream store can reserve (a small
        # disk): no stream limit then; the server's own store limit refuses what does not fit.
        log.warning(
            "nats-server cannot reserve %d bytes for the JOBS stream (%s): it runs without a byte limit; "
            "set JOBCAST_STREAM_MAX_BYTES to what its store can hold",
            config.max_bytes, exc.description,
        )  # fmt: skip
        await _add_or_update(js, replace(config, max_bytes=-1), update)


async def _add_or_update(js: JetStreamContext, config: js_api.StreamConfig, update: bool) -> None:
    try:
        await js.add_stream(config=config)
    except APIError as exc:
        refuse_placement(exc, f"the {STREAM} stream", config.num_replicas or 1)
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        if not update:  # it exists, with another configuration
            return
        held = await js.stream_info(STREAM)
        config = _kept_replicas(config, held)
        if config.max_bytes is not None and 0 < config.max_bytes <= (held.state.bytes or 0):
            # Lowering the limit below what the stream holds would discard messages at once.
            log.error(
                "JOBCAST_STREAM_MAX_BYTES=%d is not above the %d bytes the JOBS stream holds: its limit "
                "stays %s; delete jobs first, or raise the setting",
                config.max_bytes, held.state.bytes, held.config.max_bytes,
            )  # fmt: skip
            config = replace(config, max_bytes=held.config.max_bytes)
        try:
            await js.update_stream(config=config)
        except APIError as exc:
            if exc.err_code not in PLACEMENT_ERRORS or config.num_replicas == held.config.num_replicas:
                raise
            log.error(
                "the %s stream keeps %d replica(s), not the %d JOBCAST_STREAM_REPLICAS asks for: %s. Start "
                "enough JetStream nodes, then restart the API or run `nats stream edit %s --replicas %d`",
                STREAM, held.config.num_replicas, config.num_replicas, exc.description, STREAM, config.num_replicas,
            )  # fmt: skip
            await js.update_stream(config=replace(config, num_replicas=held.config.num_replicas))
        else:
            if (held.config.num_replicas or 1) < (config.num_replicas or 1):
                log.info(
                    "the %s stream: replicas raised from %d to %d",
                    STREAM, held.config.num_replicas, config.num_replicas,
                )  # fmt: skip
                await _settled(js, STREAM, config.num_replicas or 1)


def _kept_replicas(config: js_api.StreamConfig, held: js_api.StreamInfo) -> js_api.StreamConfig:
    """`config`, but never with fewer replicas than the stream has: losing copies takes a deliberate act."""
    have, wanted = held.config.num_replicas or 1, config.num_replicas or 1
    if wanted >= have:
        return config
    log.warning(
        "JOBCAST_STREAM_REPLICAS=%d is below the %d replicas of the %s stream: it keeps %d; to lower them on "
        "purpose run `nats stream edit %s --replicas %d`",
        wanted, have, STREAM, have, STREAM, wanted,
    )  # fmt: skip
    return replace(config, num_replicas=have)


async def ensure_consumer(js: JetStreamContext, consumer: WorkerConsumer) -> None:
    """Create a pool's durable consumer; the server updates an existing one in place."""
    # Never delete and recreate: a fresh consumer would redeliver every job ever run.
    await js.add_consumer(STREAM, config=consumer.config())
