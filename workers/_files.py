"""Job inputs and outputs in the NATS object store, so workers need no shared disk."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js import api as js_api
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from streams import Event, FileStored, digest, file_url, safe_name
from workers._errors import PermanentError


class WorkerFiles:
    """Reads a job's input from, and writes its outputs to, the files bucket."""

    def __init__(self, store: ObjectStore, publish: Callable[[Event], Awaitable[None]]) -> None:
        self.store = store
        self.publish = publish

    async def fetch(self, file_id: str, folder: Path) -> Path:
        """Download a file into `folder` under its original name; PermanentError if it is gone."""
        try:
            info = await self.store.get_info(file_id)
        except ObjectNotFoundError:
            raise PermanentError(f"input file {file_id} not found") from None
        path = folder / safe_name(info.description or "", default=file_id)
        with path.open("wb") as handle:
            await self.store.get(file_id, writeinto=handle)
        return path

    async def save(self, path: Path, name: str, content_type: str, owner: str, job_id: str) -> dict[str, Any]:
        """Upload an output and announce it; returns its entry for the job's result."""
        file_id = str(uuid.uuid4())
        with path.open("rb") as handle:
            size, sha256 = await asyncio.to_thread(digest, handle)
        name = safe_name(name)
        with path.open("rb") as handle:
            await self.store.put(file_id, handle, meta=js_api.ObjectMeta(description=name))
        stored = FileStored(
            job_id=job_id, file_id=file_id, owner=owner, name=name, content_type=content_type,
            size=size, sha256=sha256,
        )  # fmt: skip
        await self.publish(stored)
        return {
            "file_id": file_id, "name": name, "content_type": content_type, "size": size,
            "sha256": sha256, "url": file_url(file_id),
        }  # fmt: skip
