"""SQLite through SQLAlchemy async: the jobs projection, its event log, and its bookmark.

Only the projection writes (one writer path); request handlers read through short
sessions. WAL lets readers run beside that writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine, create_engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from streams import durable_mode


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC without an offset (SQLite has no time zones); returns aware datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of jobcast's tables."""


class JobRow(Base):
    """A job as the projection last saw it."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    pool: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(128))
    title: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    file_id: Mapped[str | None] = mapped_column(String(64))
    file_name: Mapped[str | None] = mapped_column(String(256))
    """The input file's name when the job was submitted (it outlives the file)."""
    parent_id: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[str] = mapped_column(Text, default="")
    eta_s: Mapped[float | None] = mapped_column(Float)
    """Seconds left of the running attempt, as its last progress event estimated; None otherwise."""
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    """The job's own run-time limit per attempt; None: its operation's default."""
    cache: Mapped[bool | None] = mapped_column(Boolean)
    """Whether it may use the stage cache (its submission's `cache`); None in an older database."""
    priority: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256))
    held_by: Mapped[str | None] = mapped_column(String(256))
    """The worker that started the current attempt and has not let go of it yet."""
    exhausted: Mapped[bool] = mapped_column(Boolean, default=False)
    """Failed because its attempts ran out."""
    client_request_id: Mapped[str | None] = mapped_column(String(256))
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime)
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_status: Mapped[str | None] = mapped_column(String(16))
    """pending, delivered or failed; None without a callback_url."""
    submit_seq: Mapped[int] = mapped_column(Integer)
    """Stream sequence of the first submission: the order jobs were accepted in."""
    queue_seq: Mapped[int] = mapped_column(Integer)
    """Stream sequence of the latest submission: where workers will find it in the queue."""
    last_seq: Mapped[int] = mapped_column(Integer)
    """Stream sequence of the newest event recorded for this job."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_jobs_owner_seq", "owner", "submit_seq"),
        Index("ix_jobs_status_seq", "status", "submit_seq"),
        Index("ix_jobs_parent", "parent_id", "submit_seq"),
        Index("ix_jobs_pool_status", "pool", "status", "priority", "queue_seq"),
        # The job an idempotency key names, whichever generation of the key's ids it has.
        Index(
            "ix_jobs_owner_key",
            "owner",
            "client_request_id",
            "submit_seq",
            sqlite_where=text("client_request_id IS NOT NULL"),
        ),
    )


JOBS = cast(Table, JobRow.__table__)
_NO_JOB = dict.fromkeys(column.name for column in JOBS.columns)


class _Record:
    """See `job_record`."""

    def __init__(self, values: Mapping[Any, Any]) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"<record {self.__dict__.get('id')}>"


def job_record(values: Mapping[Any, Any]) -> JobRow:
    """A job's row as a plain object with JobRow's attributes (the columns not in `values` None),
    for code that holds rows outside any ORM session: the projection's writer folds these, and the
    synchronous reader returns them. An instrumented JobRow cost 24 us to build and 0.4 us per
    attribute set, this 0.3 us and 0.02 us. Typed as JobRow for its attributes only: it is no ORM
    instance (never to be passed to a Session, nor checked with isinstance)."""
    return cast(JobRow, _Record({**_NO_JOB, **values}))


def event_record(values: Mapping[Any, Any]) -> EventRow:
    """An event's row as a plain object with EventRow's attributes (see `job_record`)."""
    return cast(EventRow, _Record(values))


class EventRow(Base):
    """One event of a job, as clients receive it (the envelope, encoded once).

    A batch parent's derived events reuse the sequence of the child event that caused
    them, so `seq` is unique per job, not per table.
    """

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq", unique=True),)


EVENTS = cast(Table, EventRow.__table__)


class FileRow(Base):
    """A file's metadata; its bytes are in the object store under its id."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256))
    content_type: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(64))
    """The job that produced it; None for an upload."""
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_files_owner_seq", "owner", "seq"), Index("ix_files_job", "job_id"))


FILES = cast(Table, FileRow.__table__)


class BookmarkRow(Base):
    """The last stream sequence applied, committed with the rows it produced."""

    __tablename__ = "projection_bookmark"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer)


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable against process crashes in WAL mode, and the stream is the log the
    # projection is rebuilt from; durable mode asks for an fsync per commit anyway.
    cursor.execute("PRAGMA synchronous=FULL" if durable_mode() else "PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_writer(dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
    _sqlite_pragmas(dbapi_connection, entry)
    # SQLAlchemy emits BEGIN itself (below): the driver's implicit BEGIN would come only at the
    # first write, after the batch's reads.
    dbapi_connection.isolation_level = None


def _begin_immediate(conn: Connection) -> None:
    # On the DBAPI connection itself: through exec_driver_sql it cost ~25 us of SQLAlchemy's
    # execution machinery, on every projection batch.
    conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]


def _add_missing_columns(conn: Connection) -> None:
    """ALTER TABLE ... ADD COLUMN for each nullable model column a table of an older database lacks
    (create_all creates missing tables only); its existing rows read NULL there."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(conn.dialect)
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')


class Database:
    """The engine and session factory of one API process."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)
        parsed = make_url(url)
        self.writer: Engine = create_engine(parsed.set(drivername=parsed.get_backend_name()))
        """A synchronous engine for the projection's writer thread: one thread hop per batch."""
        self.reader: Engine = create_engine(parsed.set(drivername=parsed.get_backend_name()))
        """Synchronous reads on the event loop, only for those that take microseconds (a job by
        id, its queue position): cheaper than the hop to aiosqlite's thread and back. In WAL mode
        readers do not wait for the writer."""
        if self.writer.dialect.name == "sqlite":
            event.listen(self.writer, "connect", _sqlite_writer)
            event.listen(self.writer, "begin", _begin_immediate)
            event.listen(self.reader, "connect", _sqlite_pragmas)

    async def create_all(self) -> None:
        """Create missing tables, the nullable columns a newer jobcast added to existing ones, and the
        indexes it added to them."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(_add_missing_columns)
            for table in Base.metadata.sorted_tables:
                for index in table.indexes:
                    await conn.run_sync(index.create, checkfirst=True)

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        self.writer.dispose()
        self.reader.dispose()
