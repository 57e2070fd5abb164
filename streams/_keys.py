"""How API keys are stored: the one hash the API checks and the `jobcast keys` command writes."""

from __future__ import annotations

import hashlib


def key_hash(key: str) -> str:
    """A key as stored: its sha256 in hex, so a leaked bucket leaks no key."""
    return hashlib.sha256(key.encode()).hexdigest()
