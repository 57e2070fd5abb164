"""A KV watch that notices when it has fallen behind its bucket, for the API's long-lived watches
(the API keys, the learned speeds and heartbeats of the ETA board)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

WATCH_CHECK_S = 2.0
"""A watch silent this long checks that the bucket has nothing newer (see `follow_bucket`)."""


class WatchStalledError(Exception):
    """The watch missed a change of the bucket; its supervisor starts it again."""


async def follow_bucket(
    js: JetStreamContext,
    kv: KeyValue,
    what: str,
    on_entry: Callable[[KeyValue.Entry], None],
    on_loaded: Callable[[], None],
) -> None:
    """Call `on_entry` with each value and change of the bucket's keys, and `on_loaded` once the
    initial values are in; raises WatchStalledError once the watch is behind the bucket, so the
    supervisor starts it again (`what` names the watch in that error).

    The watch's consumer may have been on a cluster node that died: nats-py's KV watch has no
    heartbeat to notice, and would stay silent for good. A revision the bucket had at the last
    look and the watch has still not delivered means that. So does a bucket whose newest revision
    is below one the watch delivered: it was made again (a memory-storage bucket after a NATS
    restart numbers from 1 again), and the ordered consumer skips what it takes for old messages.
    Revisions the bucket no longer keeps (values past the bucket's TTL, purged markers) are not
    waited for: a bucket whose heartbeats have all expired is not a stalled watch.
    """
    watcher = await kv.watchall()
    seen, behind_at = 0, 0
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=WATCH_CHECK_S)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                if behind_at > seen:
                    raise WatchStalledError(
                        f"the {what} watch is at revision {seen}; the bucket was at {behind_at} "
                        f"{WATCH_CHECK_S:.0f} s ago"
                    ) from None
                behind_at = await _newest(js, kv, seen, what)
                continue
            if entry is None:  # the initial values have all arrived
                on_loaded()
                continue
            seen = max(seen, entry.revision or 0)
            on_entry(entry)
    finally:
        with contextlib.suppress(Exception):  # the connection may already be gone
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated


async def _newest(js: JetStreamContext, kv: KeyValue, seen: int, what: str) -> int:
    """The newest revision the bucket still keeps, or `seen` when it keeps none newer; raises
    WatchStalledError for a bucket made again (its last revision below `seen`)."""
    status = await kv.status()
    state = status.stream_info.state
    if state.last_seq < seen:
        raise WatchStalledError(
            f"the {what} watch is at revision {seen}; the bucket, made again, is at {state.last_seq}"
        )
    if state.last_seq == seen:
        return seen
    if not state.messages:
        return seen  # all expired or purged: nothing is left to deliver
    # The stream's last sequence may be a message no longer kept (a purged marker): ask for the
    # newest one kept, over the bucket's subjects (`$KV.<bucket>.`, the KV wire convention).
    stream = status.stream_info.config.name or f"KV_{status.bucket}"
    try:
        newest = (await js.get_last_msg(stream, f"$KV.{status.bucket}.>")).seq
    except NotFoundError:
        return seen
    return max(seen, newest or 0)
