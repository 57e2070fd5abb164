"""Files: bytes in the NATS object store, metadata projected into SQLite from file events."""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import uuid
from pathlib import Path
from typing import IO

import nats.errors
from litestar.datastructures import UploadFile
from nats.js import api as js_api
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore
from sqlalchemy import func, select

from app._db import FileRow
from app._exceptions import NotFoundError, not_found, queue_unavailable
from app._publisher import Publisher
from app._schemas import FileInfo, FilePage
from streams import STREAM, FileDeleted, FileStored, digest, file_url, files_subject, safe_name

_EXTRA_TYPES = {
    ".srt": "application/x-subrip",
    ".vtt": "text/vtt",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
}


def content_type_of(name: str) -> str:
    """The type implied by the (sanitised) name; a client's declared type is not trusted."""
    suffix = Path(name).suffix.lower()
    return _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_view(row: FileRow) -> FileInfo:
    """The client's view of a file."""
    return FileInfo(
        id=row.id, name=row.name, content_type=row.content_type, size=row.size, sha256=row.sha256,
        job_id=row.job_id, owner=row.owner, created_at=row.created_at, url=file_url(row.id),
    )  # fmt: skip


class FileService:
    """Upload, list, read and delete an owner's files."""

    def __init__(self, jobs: Publisher, store: ObjectStore, cache_dir: Path) -> None:
        self.jobs = jobs
        self.db = jobs.db
        self.store = store
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    async def upload(self, upload: UploadFile, owner: str) -> FileInfo:
        """Store an uploaded file (already spooled to disk by the multipart parser) as the owner's."""
        return await self.save(upload.file, upload.filename or "", owner)

    async def save(self, handle: IO[bytes], name: str, owner: str) -> FileInfo:
        """Store the bytes of a seekable file object, read from its start, as the owner's file `name`."""
        await self.jobs.check_storage()
        name = safe_name(name, default="upload")
        size, sha256 = await asyncio.to_thread(digest, handle)
        file_id = str(uuid.uuid4())
        await self.store.put(file_id, handle, meta=js_api.ObjectMeta(description=name))  # type: ignore[arg-type]
        event = FileStored(
            job_id="", file_id=file_id, owner=owner, name=name, content_type=content_type_of(name),
            size=size, sha256=sha256,
        )  # fmt: skip
        ack = await self.jobs.publish(event, msg_id=f"file:{file_id}")
        await self.jobs.wait_applied(ack.seq, file_id)
        return await self.get(file_id, owner)

    async def get(self, file_id: str, owner: str | None) -> FileInfo:
        """One file's metadata; NotFoundError for another owner's file too."""
        return file_view(await self._row(file_id, owner))

    async def _row(self, file_id: str, owner: str | None) -> FileRow:
        async with self.db.session() as session:
            row = await session.get(FileRow, file_id)
        if row is None or (owner is not None and row.owner != owner):
            raise not_found("file", file_id)
        return row

    async def names(self, file_ids: set[str], owner: str | None) -> dict[str, str]:
        """Display names of the owner's files among `file_ids` (deleted ones are left out)."""
        if not file_ids:
            return {}
        query = select(FileRow.id, FileRow.name).where(FileRow.id.in_(sorted(file_ids)))
        if owner is not None:
            query = query.where(FileRow.owner == owner)
        async with self.db.session() as session:
            return {file_id: name for file_id, name in (await session.execute(query)).all()}

    async def find(self, owner: str | None, job_id: str | None, limit: int, offset: int) -> FilePage:
        """The owner's files, newest first."""
        query = select(FileRow)
        if owner is not None:
            query = query.where(FileRow.owner == owner)
        if job_id is not None:
            query = query.where(FileRow.job_id == job_id)
        async with self.db.session() as session:
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(query.order_by(FileRow.seq.desc()).limit(limit).offset(offset))
            items = [file_view(row) for row in rows]
        return FilePage(items=items, total=total or 0, limit=limit, offset=offset)

    async def local_copy(self, file_id: str, owner: str | None) -> tuple[FileInfo, Path]:
        """The file and a local copy of its bytes (objects never change, so copies are kept)."""
        info = await self.get(file_id, owner)
        path = self.cache_dir / file_id
        if not path.exists():
            partial = self.cache_dir / f"{file_id}.{uuid.uuid4().hex}.part"
            try:
                with partial.open("wb") as handle:
                    await self.store.get(file_id, writeinto=handle)
                os.replace(partial, path)
            except ObjectNotFoundError:
                raise not_found("file", file_id) from None
            finally:
                partial.unlink(missing_ok=True)
        return info, path

    async def delete(self, file_id: str, owner: str | None) -> None:
        """Delete a file's bytes and metadata; its subject in the stream keeps only the
        `file_deleted` tombstone, which expires like a job's (see app/_retention.py)."""
        await self._row(file_id, owner)
        with contextlib.suppress(ObjectNotFoundError):
            await self.store.delete(file_id)
        (self.cache_dir / file_id).unlink(missing_ok=True)
        try:
            await self.jobs.js.purge_stream(STREAM, subject=files_subject(file_id))
        except (nats.errors.Error, TimeoutError) as exc:
            raise queue_unavailable(exc) from exc
        ack = await self.jobs.publish(FileDeleted(job_id="", file_id=file_id))
        await self.jobs.wait_applied(ack.seq, file_id)

    async def delete_produced(self, job_ids: list[str]) -> int:
        """Delete the files these jobs produced; returns how many (one deleted meanwhile by
        someone else, e.g. a second instance's retention sweep, is not counted)."""
        async with self.db.session() as session:
            ids = list(await session.scalars(select(FileRow.id).where(FileRow.job_id.in_(job_ids))))
        deleted = 0
        for file_id in ids:
            with contextlib.suppress(NotFoundError):
                await self.delete(file_id, None)
                deleted += 1
        return deleted
