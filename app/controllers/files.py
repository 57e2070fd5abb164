"""Files: upload (multipart, streamed), list, metadata, content with Range, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
from litestar import Controller, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, MultipartBody, QueryParameter
from litestar.response import Stream
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT, HTTP_206_PARTIAL_CONTENT

from app._deps import Access, FilesDep, Owner
from app._schemas import MAX_INT, FileInfo, FilePage
from streams import CHUNK


@dataclass
class UploadForm:
    """The multipart form of an upload."""

    file: UploadFile


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range: bytes=a-b` header asks for; None for the whole file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # multiple ranges: answer with the whole file, as RFC 9110 allows
    first, _, last = spec.strip().partition("-")
    try:
        if first:
            start, end = int(first), int(last) if last else size - 1
        else:
            start, end = max(0, size - int(last)), size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        raise HTTPException(
            status_code=416,
            detail=f"range not satisfiable: {header}",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, min(end, size - 1)


async def _read(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(start)
        while length > 0:
            chunk = await handle.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


CONTENT_RESPONSES = {
    code: ResponseSpec(data_container=bytes, media_type="*/*", description=text, generate_examples=False)
    for code, text in {200: "The file's bytes, as its own content type", 206: "The range asked for"}.items()
}
"""A download answers with the file's own content type, not JSON."""


class FileController(Controller):
    """The file resource."""

    path = "/api/v1/files"
    tags = ["files"]

    @post("/", status_code=HTTP_201_CREATED, operation_id="uploadFile")
    async def upload(self, data: MultipartBody[UploadForm], files: FilesDep, owner: Owner) -> FileInfo:
        """Upload one file in the multipart field `file`."""
        try:
            return await files.upload(data.file, owner)
        finally:
            await data.file.close()

    @get("/", operation_id="listFiles")
    async def list_files(
        self,
        files: FilesDep,
        owner: Owner,
        job_id: Annotated[
            str | None, QueryParameter(max_length=64, description="Files a job produced")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        offset: Annotated[int, QueryParameter(ge=0, le=MAX_INT)] = 0,
    ) -> FilePage:
        """The caller's files, newest first."""
        return await files.find(owner, job_id, limit, offset)

    @get("/{file_id:str}", operation_id="getFile")
    async def get_file(self, file_id: FromPath[str], files: FilesDep, access: Access) -> FileInfo:
        """One file's metadata (an admin key: any owner's)."""
        return await files.get(file_id, access)

    @get("/{file_id:str}/content", operation_id="getFileContent", responses=CONTENT_RESPONSES)
    async def content(
        self,
        file_id: FromPath[str],
        files: FilesDep,
        access: Access,
        range_header: Annotated[
            str | None, HeaderParameter(name="Range", required=False, max_length=200)
        ] = None,
    ) -> Stream:
        """The file's bytes (an admin key: any owner's), streamed, with its content type; honours a single Range."""
        info, path = await files.local_copy(file_id, access)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'attachment; filename="{info.name}"',
            "ETag": f'"{info.sha256}"',
        }
        wanted = byte_range(range_header, info.size)
        if wanted is None:
            headers["Content-Length"] = str(info.size)
            return Stream(_read(path, 0, info.size), media_type=info.content_type, headers=headers)
        start, end = wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        headers["Content-Length"] = str(end - start + 1)
        return Stream(
            _read(path, start, end - start + 1), media_type=info.content_type, headers=headers,
            status_code=HTTP_206_PARTIAL_CONTENT,
        )  # fmt: skip

    @delete("/{file_id:str}", status_code=HTTP_204_NO_CONTENT, operation_id="deleteFile")
    async def delete_file(self, file_id: FromPath[str], files: FilesDep, access: Access) -> None:
        """Delete a file (an admin key: any owner's); jobs that used it keep their results."""
        await files.delete(file_id, access)
