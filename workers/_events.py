"""A worker's side of a job's history: publishing its events (riding out a broker restart) and
reading the last one of a subject."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import nats.errors
import stamina
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from streams import (
    JOB_HEADER,
    KIND_HEADER,
    STREAM,
    Event,
    Failed,
    FileStored,
    decode_event,
    encode_event,
    events_subject,
    files_subject,
)
from workers._errors import EventRejectedError, PublishGaveUpError
from workers._running import seconds_text
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

PUBLISH_WAIT_INITIAL_S = 0.1
"""First pause after a failed publish; it doubles up to PUBLISH_WAIT_MAX_S."""
PUBLISH_WAIT_MAX_S = 2.0


def transient(exc: Exception) -> bool:
    """Whether a broker error may go away on its own (a restart, a leader election, a lost reply)."""
    return isinstance(exc, nats.errors.Error | TimeoutError)


class Events:
    """Publishes the events of the jobs a worker runs, and reads back the last event of a subject."""

    def __init__(self, js: JetStreamContext, settings: WorkerSettings) -> None:
        self.js = js
        self.settings = settings

    async def last(self, subject: str) -> Event | None:
        """The last event on `subject`; None if there is none or it cannot be decoded."""
        try:
            raw = await self.js.get_last_msg(STREAM, subject, direct=True)
        except NotFoundError:
            return None
        try:
            return decode_event(raw.data or b"")
        except msgspec.MsgspecError:
            return None

    async def publish(self, event: Event, msg_id: str | None = None) -> None:
        """Publish `event` once, on its job's subject (a stored file's on the file's own)."""
        headers = {KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        # A file's `file_stored` goes on the file's own subject: it outlives the job's history
        # when the job is deleted and its files are kept.
        subject = (
            files_subject(event.file_id) if isinstance(event, FileStored) else events_subject(event.job_id)
        )
        await self.js.publish(subject, encode_event(event), headers=headers)

    async def publish_reliably(self, event: Event) -> None:
        """Publish an event, riding out a broker restart for `publish_retry_s`; the msg id makes
        retries safe. Raises EventRejectedError when no retry can help, PublishGaveUpError after."""
        msg_id = f"{event.job_id}:{event.attempt}:{event.kind}"
        if isinstance(event, FileStored):
            msg_id += f":{event.file_id}"
        retry_s = self.settings.publish_retry_s
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + retry_s  # for the log line; stamina stops
        try:
            try:
                # The first try outside stamina: a retry context costs more than the publish it
                # wraps (stamina and tenacity build their state per call, ~23 us, twice per job).
                await self._publish_once(event, msg_id, give_up_at)
                return
            except Exception as exc:
                if not transient(exc):
                    raise
                first = exc
            await asyncio.sleep(min(PUBLISH_WAIT_INITIAL_S, max(0.0, give_up_at - loop.time())))
            if loop.time() >= give_up_at:
                raise first
            # stamina's first try comes at once: its pauses start at the second step of the schedule.
            async for attempt in stamina.retry_context(
                on=transient, attempts=None, timeout=give_up_at - loop.time(),
                wait_initial=2 * PUBLISH_WAIT_INITIAL_S, wait_max=PUBLISH_WAIT_MAX_S, wait_jitter=0.0,
            ):  # fmt: skip
                with attempt:
                    await self._publish_once(event, msg_id, give_up_at)
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishGaveUpError(
                f"publishing {event.kind} failed for {seconds_text(retry_s)} s ({exc or type(exc).__name__})"
            ) from exc

    async def _publish_once(self, event: Event, msg_id: str, give_up_at: float) -> None:
        try:
            await self.publish(event, msg_id=msg_id)
        except (nats.errors.MaxPayloadError, BadRequestError) as exc:
            # Too big for the server's max_payload, or refused by the stream (e.g. its
            # max_msg_size): the same bytes fail the same way every time.
            size = len(encode_event(event))
            raise EventRejectedError(
                f"the {event.kind} event ({size} bytes) could not be stored: {exc or type(exc).__name__}"
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            if asyncio.get_running_loop().time() < give_up_at:  # not the last try
                log.warning("publishing %s for %s failed (%s); retrying", event.kind, event.job_id, exc)
            raise

    async def record(self, event: Event) -> Event:
        """Publish the event that ends an attempt; one the stream cannot take becomes a small
        `failed` that says why (the job must end either way). Returns what was published."""
        try:
            await self.publish_reliably(event)
        except EventRejectedError as exc:
            log.error("job %s: %s", event.job_id, exc, extra={"job_id": event.job_id})
            event = Failed(
                job_id=event.job_id, attempt=event.attempt, worker=self.settings.name, error=str(exc)
            )
            await self.publish_reliably(event)
        return event
