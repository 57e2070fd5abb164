"""A running job's ETA: its units of work (media seconds, LLM chunks), the learned speed of its
operation, its own speed so far, and the learning when it completes.

`JobEta` is pure (a clock is passed in); `SpeedBook` reads and writes the speeds bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
import stamina
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from streams import Speed, learned

log = logging.getLogger("jobcast.worker")

MIN_OWN_PROGRESS = 0.1
"""Without a learned speed, the job's own speed stands alone only once this share of it is done:
before, one slow first step (a model loading) would be taken for the whole job's pace."""
LEARN_TRIES = 3
"""Compare-and-set attempts of one update before its sample is dropped (another worker's update
of the same key won each time; an average missing one sample is still an average)."""


class JobEta:
    """The seconds left of one run: what the learned speed leaves of it, moving towards the job's
    own pace as it advances (all the way at 100 %).

    Its own pace is measured from its first progress past 0 %, not from its start: what comes
    before (download, model load, decoding the audio) is paid once, and extrapolating it over the
    rest would overestimate (bench eta measured it: +180 % at 50 % of speech60.mp3)."""

    def __init__(self, started: float, speed: Speed | None = None) -> None:
        self.started = started
        """When the run began (the clock `estimate` is given)."""
        self.speed = speed
        """The learned speed of the job's key, once it has been read; None before or without one."""
        self.units: float | None = None
        """The job's units of work, once the operation has said (None: unknown, no ETA)."""
        self._anchor: tuple[float, float] | None = None
        """(share done, time) at the first progress past 0 %: where its own pace is measured from."""

    def estimate(self, percent: float, now: float) -> float | None:
        """Seconds left at `percent` done, at time `now` (calls come in the order of the job's
        progress); None while neither a learned speed nor the job's own pace says anything."""
        if self.units is None or self.units <= 0:
            return None
        done = min(1.0, max(0.0, percent / 100.0))
        if done > 0 and self._anchor is None:
            self._anchor = (done, now)
        own = None
        if self._anchor is not None and done > self._anchor[0] and now > self._anchor[1]:
            pace = (now - self._anchor[1]) / (done - self._anchor[0])  # seconds per share done
            own = (1 - done) * pace
        if self.speed is not None:
            expected = self.speed.start_s + self.units * self.speed.seconds_per_unit
            learned_left = max(0.0, expected - (now - self.started))
            left = learned_left if own is None else (1 - done) * learned_left + done * own
        elif own is not None and done >= MIN_OWN_PROGRESS:
            left = own
        else:
            return None
        return round(max(0.0, left), 1)

    @property
    def paced(self) -> bool:
        """Whether the run showed a pace of its own: a progress step between 0 and 100 %."""
        return self._anchor is not None and self._anchor[0] < 1.0

    def start_cost(self, now: float) -> float:
        """Seconds of the run that ended at `now` spent before its units' pace: the time to its
        first progress past 0 %, less that progress's share at the pace it then kept. 0 when it
        showed no pace (no progress between 0 and 100 %: all its time is taken as its pace)."""
        if self._anchor is None or self.units is None or self.units <= 0:
            return 0.0
        done, at = self._anchor
        if done >= 1.0 or now <= at:
            return 0.0
        per_share = (now - at) / (1.0 - done)
        return max(0.0, (at - self.started) - done * per_share)


def learned_from(
    seconds: float, units: float, start_s: float, family: str
) -> Callable[[Speed | None], Speed]:
    """The update of a key's speed by one job (see streams.learned), for a compare-and-set retry."""
    return lambda previous: learned(previous, seconds, units, time.time(), start_s, family)


class SpeedBook:
    """The speeds bucket as a worker uses it: read a key's speed, fold a completed job into it."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self, key: str) -> Speed | None:
        """The key's learned speed; None when none is stored (or NATS does not answer)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("reading speed %s failed: %s", key, exc)
            return None
        try:
            return msgspec.json.decode(entry.value or b"", type=Speed)
        except msgspec.DecodeError:
            return None

    async def learn(
        self, key: str, seconds: float, units: float, start_s: float = 0.0, family: str = ""
    ) -> None:
        """Fold a job of `units` that took `seconds` (`start_s` of them before its pace) into the
        key's average, compare-and-set: two workers finishing jobs of one key at once both count
        (last-writer-wins would drop one)."""
        if units <= 0 or seconds <= 0:
            return
        try:
            async for attempt in stamina.retry_context(
                on=KeyWrongLastSequenceError, attempts=LEARN_TRIES, wait_initial=0.01, wait_max=0.1
            ):
                with attempt:
                    await self._update(key, learned_from(seconds, units, start_s, family))
        except (KeyWrongLastSequenceError, nats.errors.Error, TimeoutError) as exc:
            log.debug("learning speed %s failed: %s", key, exc)

    async def _update(self, key: str, job: Callable[[Speed | None], Speed]) -> None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            previous, revision = None, 0
        else:
            revision = entry.revision or 0
            try:
                previous = msgspec.json.decode(entry.value or b"", type=Speed)
            except msgspec.DecodeError:
                previous = None
        value = msgspec.json.encode(job(previous))
        if revision:
            await self.kv.update(key, value, last=revision)
        else:
            await self.kv.create(key, value)
