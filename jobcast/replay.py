"""`jobcast events replay`: print one job's messages straight from JetStream, in stream order.

The output is what `nats stream view JOBS --subject 'jobs.events.<id>'` shows, merged in stream
order with the job's submissions (`jobs.submit.*.*.<id>`, `jobs.schedule.<id>`), control
messages (`jobs.control.<id>`) and, once it is deleted, its tombstone (`jobs.deleted.<id>`):
one JSON object per line, `{"seq": N, "subject": ..., "kind": ..., "event": {...}}`, where
`event` is the payload as it is on the wire. No API and no database are involved, so it also
works when the projection is lost or behind.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
from nats.js.api import RawStreamMsg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from jobcast.keys import cli_connection
from streams import (
    KIND_HEADER,
    STREAM,
    close_quietly,
    decode_event,
    is_terminal,
    job_history_subjects,
)

POLL_S = 0.25
"""How often `follow` looks for new messages once it has printed everything."""


async def _next(js: JetStreamContext, subject: str, seq: int) -> RawStreamMsg | None:
    """The first message on `subject` at or after `seq`, or None."""
    try:
        return await js.get_msg(STREAM, seq=seq, subject=subject, next=True)
    except NotFoundError:
        return None


def _line(msg: RawStreamMsg) -> tuple[dict[str, Any], bool]:
    """The printed object of one stream message, and whether it ends the job."""
    data = msg.data or b""
    try:
        payload: Any = msgspec.json.decode(data)
    except msgspec.DecodeError:
        payload = data.decode(errors="replace")
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind is None and msg.headers:
        kind = msg.headers.get(KIND_HEADER)
    try:
        terminal = is_terminal(decode_event(data))
    except (msgspec.DecodeError, msgspec.ValidationError):
        terminal = False
    return {"seq": msg.seq, "subject": msg.subject, "kind": kind, "event": payload}, terminal


async def _print_messages(js: JetStreamContext, job_id: str, follow: bool) -> int:
    """Print the job's messages; returns how many were printed."""
    subjects = job_history_subjects(job_id)
    printed = 0
    after = 0  # the last sequence printed
    heads: dict[str, RawStreamMsg | None] = {s: await _next(js, s, after + 1) for s in subjects}
    while True:
        pending = [m for m in heads.values() if m is not None]
        if not pending:
            if not follow or printed == 0:
                return printed
            await asyncio.sleep(POLL_S)
            heads = {s: await _next(js, s, after + 1) for s in subjects}
            continue
        msg = min(pending, key=lambda m: m.seq or 0)
        line, terminal = _line(msg)
        print(json.dumps(line, ensure_ascii=False), flush=True)
        printed += 1
        after = msg.seq or after
        if follow and terminal:
            return printed
        subject = next(s for s, m in heads.items() if m is msg)
        heads[subject] = await _next(js, subject, after + 1)


async def replay(job_id: str, data_dir: Path, follow: bool = False) -> int:
    """Print a job's messages from JetStream, one JSON per line; the exit code.

    With `follow`, keep printing new messages until one ends the job (completed, failed,
    cancelled). Exits 1 when the job has no messages in the stream (or NATS is unreachable),
    2 on an id that is not a subject token.
    """
    if not job_id or any(c in job_id for c in ".*> \t\r\n"):
        print(f"not a job id: {job_id!r}", file=sys.stderr)
        return 2
    nc = await cli_connection(data_dir, "jobcast-replay")
    if nc is None:
        return 1
    try:
        printed = await _print_messages(nc.jetstream(), job_id, follow)
    finally:
        await close_quietly(nc)
    if printed == 0:
        print(f"no messages for job {job_id} in stream {STREAM}", file=sys.stderr)
        return 1
    return 0
