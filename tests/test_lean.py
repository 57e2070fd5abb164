"""The projection's lean statements (app/_lean.py) store and read what SQLAlchemy's own would."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from app._batch import write_batch
from app._db import EVENTS, FILES, JOBS, Database
from app._lean import lean_reads, lean_statements
from app._settings import Settings
from streams import Completed, Event, Progress, Started, Submitted, encode_event

WHEN = datetime(2026, 12, 1, 18, 30, 15, 123456, tzinfo=UTC)


class _Message:
    def __init__(self, data: bytes) -> None:
        self.data = data


def _events() -> list[Event]:
    """Jobs whose rows hold each kind of value: JSON with nesting, non-ASCII and nulls, aware
    datetimes, None, booleans, floats."""
    full = Submitted(
        job_id="full", type="noop", pool="cpu", owner="ann", params={"steps": [1, 2], "text": "é ✓", "none": None},
        title="Tïtle", description="line\nbreak", file_id="f1", file_name="a b.flac", max_attempts=5, priority=3,
        created_at=WHEN, client_request_id="key-1", scheduled_for=WHEN - timedelta(days=1),
        callback_url="https://example.test/hook", timeout_s=12.5, cache=False, ts=WHEN,
    )  # fmt: skip
    bare = Submitted(job_id="bare", type="noop", pool="cpu", owner="bob", ts=WHEN)
    return [
        full,
        bare,
        Started(job_id="full", attempt=1, worker="w-1", ts=WHEN + timedelta(seconds=1)),
        Progress(job_id="full", attempt=1, progress=33.33, step="step 1 of 3", eta_s=4.5, ts=WHEN),
        Completed(
            job_id="full", attempt=1, worker="w-1", result={"text": "ok", "n": 1.5, "list": [None]}, ts=WHEN
        ),
    ]


def _raw(path: Path, table: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()


async def test_lean_rows_are_what_sqlalchemy_writes_and_reads(tmp_path: Path) -> None:
    lean_db, core_db = (
        Database(f"sqlite+aiosqlite:///{tmp_path}/lean.db"),
        Database(f"sqlite+aiosqlite:///{tmp_path}/core.db"),
    )
    for db in (lean_db, core_db):
        await db.create_all()
    decoded = [(_Message(encode_event(e)), seq, e) for seq, e in enumerate(_events(), start=1)]
    try:
        with lean_db.writer.begin() as conn:
            write_batch(conn, decoded[:2], 2, True, set())  # type: ignore[arg-type]
        with lean_db.writer.begin() as conn:
            write_batch(conn, decoded[2:], len(decoded), True, set())  # type: ignore[arg-type]
        # What SQLAlchemy reads back from the lean rows, written again by SQLAlchemy's own statements.
        with lean_db.writer.connect() as conn:
            jobs = [dict(row._mapping) for row in conn.execute(select(JOBS).order_by(JOBS.c.id))]
            events = [dict(row._mapping) for row in conn.execute(select(EVENTS).order_by(EVENTS.c.id))]
            with lean_statements(conn, ("status",)) as (statements, cursor):
                leanly_read = [vars(job) for job in statements.select_jobs(cursor, ["bare", "full"])]
        with core_db.writer.begin() as conn:
            conn.execute(insert(JOBS), jobs)
            conn.execute(insert(EVENTS), events)
    finally:
        await lean_db.dispose()
        await core_db.dispose()
    assert jobs[1]["params"] == {"steps": [1, 2], "text": "é ✓", "none": None}
    assert jobs[1]["result"] == {"text": "ok", "n": 1.5, "list": [None]}
    assert jobs[1]["scheduled_for"] == WHEN - timedelta(days=1)
    assert jobs[1]["completed_at"] == WHEN
    assert (jobs[0]["result"], jobs[0]["cache"], jobs[1]["cache"]) == (None, True, False)
    assert len(events) == 5
    assert {e["job_id"] for e in events} == {"bare", "full"}
    # Stored byte for byte as SQLAlchemy stores them, and read as SQLAlchemy reads them.
    for table in ("jobs", "job_events"):
        assert _raw(tmp_path / "lean.db", table) == _raw(tmp_path / "core.db", table)
    assert sorted(leanly_read, key=lambda job: job["id"]) == jobs
    assert _raw(tmp_path / "lean.db", "projection_bookmark") == [("jobs", 5)]


async def test_lean_reads_return_what_sqlalchemy_reads(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/jobs.db")
    await db.create_all()
    decoded = [(_Message(encode_event(e)), seq, e) for seq, e in enumerate(_events(), start=1)]
    try:
        with db.writer.begin() as conn:
            write_batch(conn, decoded, len(decoded), True, set())  # type: ignore[arg-type]
        with db.reader.connect() as conn:
            by_sqlalchemy = {row.id: dict(row._mapping) for row in conn.execute(select(JOBS))}
            events = [dict(row._mapping) for row in conn.execute(select(EVENTS).order_by(EVENTS.c.seq))]
            with lean_reads(conn) as (reads, cursor):
                full, bare, missing = (reads.job(cursor, job_id) for job_id in ("full", "bare", "nope"))
                keyed = reads.keyed(cursor, "ann", "key-1")
                after = reads.events_after(cursor, "full", 3, 10)
                owners = [reads.owner_of(cursor, job_id) for job_id in ("full", "bare", "nope")]
                exists = [
                    reads.exists(cursor, JOBS, "bare"),
                    reads.exists(cursor, JOBS, "nope"),
                    reads.exists(cursor, FILES, "f1"),
                ]
    finally:
        await db.dispose()
    assert full is not None
    assert bare is not None
    assert keyed is not None
    assert vars(full) == by_sqlalchemy["full"]
    assert vars(bare) == by_sqlalchemy["bare"]
    assert vars(keyed) == by_sqlalchemy["full"]
    assert missing is None
    assert [vars(event) for event in after] == [e for e in events if e["job_id"] == "full" and e["seq"] > 3]
    assert [event.kind for event in after] == ["progress", "completed"]
    assert owners == ["ann", "bob", None]
    assert exists == [True, False, False]


def test_a_database_other_than_sqlite_is_refused_at_start() -> None:
    # The lean statements are SQLite's SQL: another database fails at once, in one line.
    with pytest.raises(ValueError, match="keeps its projection in SQLite") as raised:
        Settings(database_url="postgresql+asyncpg://jobcast:s3cret@db/jobcast")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="through aiosqlite"):
        Settings(database_url="sqlite:////var/lib/jobcast/jobcast.db")  # the API's reads are async
    with pytest.raises(ValueError, match="not a SQLAlchemy URL"):
        Settings(database_url="::nothing::")
    url = "sqlite+aiosqlite:////var/lib/jobcast/jobcast.db"
    assert Settings(database_url=url).sqlalchemy_url == url
