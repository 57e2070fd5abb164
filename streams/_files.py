"""File conventions both sides keep: safe names, digests, where bytes are served."""

from __future__ import annotations

import hashlib
import re
from typing import IO

CHUNK = 1 << 20


def safe_name(name: str, default: str = "file") -> str:
    """A file name that cannot escape a directory: its last component, tame characters only."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .")[:200]
    return base or default


def digest(handle: IO[bytes]) -> tuple[int, str]:
    """Size and sha256 of a file object read from its start; leaves it rewound."""
    sha, size = hashlib.sha256(), 0
    handle.seek(0)
    while chunk := handle.read(CHUNK):
        sha.update(chunk)
        size += len(chunk)
    handle.seek(0)
    return size, sha.hexdigest()


def file_url(file_id: str) -> str:
    """Where the API serves a file's bytes."""
    return f"/api/v1/files/{file_id}/content"
