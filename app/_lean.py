"""The hot statements of the projection's writer and of the synchronous reader, run on the DBAPI
cursor of a SQLAlchemy connection.

SQLAlchemy's execution of even a prebuilt statement cost about 40 us (its execution context,
events, the result's set-up), and each job's events and requests ran a dozen of them: a batch of
one event four, an SSE connect three. These run the same SQL on the same connection, in the same
transaction, through the DBAPI cursor, with each column's own SQLAlchemy bind and result
processors: the rows hold what SQLAlchemy would have written and read (tests/test_lean.py
compares the two). The SQL is SQLite's (qmark parameters), and SQLAlchemy's cursor events and
`echo` logging do not see these statements (nothing in jobcast listens to them). Each cursor is
closed when its block ends: one left open on a partly read result would hold its read snapshot.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.engine.interfaces import DBAPICursor

from app._db import EVENTS, FILES, JOBS, BookmarkRow, EventRow, JobRow, event_record, job_record

Processor = Callable[[Any], Any] | None


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


class _Columns:
    """Some columns of a table, with SQLAlchemy's bind and result processors of each."""

    def __init__(self, table: Table, names: Sequence[str], dialect: Dialect) -> None:
        if dialect.paramstyle != "qmark":
            raise ValueError(
                f"the lean statements are written for SQLite's qmark style, not {dialect.paramstyle}"
            )
        # The dialect's own implementation of each type (SQLite's DATETIME, JSON...), as SQLAlchemy's
        # compiled statements use them.
        types = [table.c[name].type.dialect_impl(dialect) for name in names]
        self.table = f'"{table.name}"'
        self.names = tuple(names)
        self.binds: tuple[Processor, ...] = tuple(t.bind_processor(dialect) for t in types)
        self.results: tuple[Processor, ...] = tuple(t.result_processor(dialect, None) for t in types)

    def bound(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Values in the columns' order, as SQLAlchemy binds them."""
        return tuple(v if p is None else p(v) for p, v in zip(self.binds, values, strict=True))

    def read(self, row: Sequence[Any]) -> dict[str, Any]:
        """A row of these columns, as SQLAlchemy returns it, by column name."""
        return {n: v if p is None else p(v) for n, p, v in zip(self.names, self.results, row, strict=True)}


class LeanStatements:
    """The writer's statements on the jobs, events and bookmark tables, for one dialect."""

    def __init__(self, dialect: Dialect, jobs: _Columns, mutable: Sequence[str]) -> None:
        every = jobs.names
        self.jobs = jobs
        self.changes = _Columns(JOBS, [*mutable, "id"], dialect)
        self.events = _Columns(EVENTS, ["seq", "job_id", "kind", "payload"], dialect)
        self._insert_job = (
            f"INSERT INTO {self.jobs.table} ({_quoted(every)}) VALUES ({', '.join('?' * len(every))})"
        )
        sets = ", ".join(f'"{name}" = ?' for name in mutable)
        self._update_job = f'UPDATE {self.jobs.table} SET {sets} WHERE "id" = ?'
        self._select_jobs = f'SELECT {_quoted(every)} FROM {self.jobs.table} WHERE "id" IN '
        self._insert_events = (
            f"INSERT INTO {self.events.table} ({_quoted(self.events.names)}) VALUES (?, ?, ?, ?)"
        )
        bookmarks = f'"{BookmarkRow.__tablename__}"'
        self._update_bookmark = f'UPDATE {bookmarks} SET "last_seq" = ? WHERE "name" = ?'
        self._insert_bookmark = f'INSERT INTO {bookmarks} ("name", "last_seq") VALUES (?, ?)'

    def select_jobs(self, cursor: DBAPICursor, job_ids: Sequence[str]) -> list[JobRow]:
        """The jobs of these ids that exist, as plain records."""
        cursor.execute(self._select_jobs + f"({', '.join('?' * len(job_ids))})", tuple(job_ids))
        return [job_record(self.jobs.read(row)) for row in cursor.fetchall()]

    def insert_jobs(self, cursor: DBAPICursor, jobs: Iterable[JobRow]) -> None:
        """Insert new jobs, every column."""
        names = self.jobs.names
        cursor.executemany(
            self._insert_job, [self.jobs.bound([getattr(job, n) for n in names]) for job in jobs]
        )

    def update_jobs(self, cursor: DBAPICursor, jobs: Iterable[JobRow]) -> None:
        """Write the mutable columns of existing jobs."""
        names = self.changes.names
        cursor.executemany(
            self._update_job, [self.changes.bound([getattr(job, n) for n in names]) for job in jobs]
        )

    def insert_events(self, cursor: DBAPICursor, events: Iterable[tuple[int, str, str, bytes]]) -> None:
        """Insert event rows: (seq, job id, kind, payload) each."""
        cursor.executemany(self._insert_events, [self.events.bound(event) for event in events])

    def move_bookmark(self, cursor: DBAPICursor, name: str, last_seq: int) -> None:
        """Set the named bookmark, creating it the first time."""
        cursor.execute(self._update_bookmark, (last_seq, name))
        if cursor.rowcount == 0:
            cursor.execute(self._insert_bookmark, (name, last_seq))


class LeanReads:
    """The synchronous reader's hot reads: a job by id, its owner, the job an idempotency key names,
    a page of a job's events, whether a job or file exists."""

    def __init__(self, dialect: Dialect, jobs: _Columns) -> None:
        every = jobs.names
        self.jobs = jobs
        self.events = _Columns(EVENTS, [column.name for column in EVENTS.columns], dialect)
        select_jobs = f"SELECT {_quoted(every)} FROM {self.jobs.table}"
        self._job = f'{select_jobs} WHERE "id" = ?'
        self._owner = f'SELECT "owner" FROM {self.jobs.table} WHERE "id" = ?'
        # The newest job of the key's ids (the partial index ix_jobs_owner_key).
        self._keyed = (
            f'{select_jobs} WHERE "owner" = ? AND "client_request_id" = ? ORDER BY "submit_seq" DESC LIMIT 1'
        )
        self._events_after = (
            f"SELECT {_quoted(self.events.names)} FROM {self.events.table}"
            ' WHERE "job_id" = ? AND "seq" > ? ORDER BY "seq" LIMIT ?'
        )
        self._exists = {table.name: f'SELECT 1 FROM "{table.name}" WHERE "id" = ?' for table in (JOBS, FILES)}

    def job(self, cursor: DBAPICursor, job_id: str) -> JobRow | None:
        """The job of this id, as a plain record."""
        return self._one_job(cursor, self._job, (job_id,))

    def owner_of(self, cursor: DBAPICursor, job_id: str) -> str | None:
        """The owner of the job of this id; None without one."""
        cursor.execute(self._owner, (job_id,))
        found = cursor.fetchone()
        return None if found is None else str(found[0])

    def keyed(self, cursor: DBAPICursor, owner: str, key: str) -> JobRow | None:
        """The owner's newest job of an idempotency key."""
        return self._one_job(cursor, self._keyed, (owner, key))

    def events_after(self, cursor: DBAPICursor, job_id: str, after: int, limit: int) -> list[EventRow]:
        """The job's first `limit` events after `after`, as plain records."""
        cursor.execute(self._events_after, (job_id, after, limit))
        return [event_record(self.events.read(row)) for row in cursor.fetchall()]

    def exists(self, cursor: DBAPICursor, table: Table, ident: str) -> bool:
        """Whether `table` (jobs or files) has a row of this id."""
        cursor.execute(self._exists[table.name], (ident,))
        return cursor.fetchone() is not None

    def _one_job(self, cursor: DBAPICursor, sql: str, params: tuple[Any, ...]) -> JobRow | None:
        cursor.execute(sql, params)
        found = cursor.fetchone()
        return None if found is None else job_record(self.jobs.read(found))


class _Prepared:
    """The statements of one engine's dialect, built once."""

    def __init__(self, dialect: Dialect) -> None:
        self.jobs = _Columns(JOBS, [column.name for column in JOBS.columns], dialect)
        self.reads = LeanReads(dialect, self.jobs)
        self.writes: dict[tuple[str, ...], LeanStatements] = {}


_PREPARED: weakref.WeakKeyDictionary[Engine, _Prepared] = weakref.WeakKeyDictionary()
"""By engine, and gone with it: the statements' processors hold the dialect, not the engine."""


def _prepared(conn: Connection) -> _Prepared:
    prepared = _PREPARED.get(conn.engine)
    if prepared is None:
        prepared = _PREPARED[conn.engine] = _Prepared(conn.dialect)
    return prepared


@contextlib.contextmanager
def _cursor(conn: Connection) -> Iterator[DBAPICursor]:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    finally:
        cursor.close()


@contextlib.contextmanager
def lean_reads(conn: Connection) -> Iterator[tuple[LeanReads, DBAPICursor]]:
    """The reads for `conn`'s dialect, and a cursor on `conn`'s DBAPI connection for the block."""
    with _cursor(conn) as cursor:
        yield _prepared(conn).reads, cursor


@contextlib.contextmanager
def lean_statements(
    conn: Connection, mutable: tuple[str, ...]
) -> Iterator[tuple[LeanStatements, DBAPICursor]]:
    """The writer's statements for `conn`'s dialect (`mutable`: the job columns an update writes),
    and a cursor on the DBAPI connection of `conn`'s transaction for the block."""
    prepared = _prepared(conn)
    statements = prepared.writes.get(mutable)
    if statements is None:
        statements = prepared.writes[mutable] = LeanStatements(conn.dialect, prepared.jobs, mutable)
    with _cursor(conn) as cursor:
        yield statements, cursor
