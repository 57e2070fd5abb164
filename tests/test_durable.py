"""Durable mode: NATS fsyncs every write and SQLite every commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from app import Settings
from streams import NatsServer
from tests.conftest import ApiServer, submit


async def test_durable_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBCAST_DURABLE", "1")
    server = NatsServer(tmp_path / "nats")
    assert server.durable
    await server.start()
    try:
        assert "sync_interval: always" in (tmp_path / "nats" / "server.conf").read_text()
        api = ApiServer(Settings(data_dir=tmp_path / "data", nats_url=server.url))
        await api.start()
        try:
            async with httpx.AsyncClient(base_url=api.url) as client:
                job = await submit(client)
                assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["status"] == "pending"
        finally:
            await api.stop()
    finally:
        await server.stop()
    log = (tmp_path / "nats" / "nats-server.log").read_text()
    assert f"Using configuration file: {tmp_path / 'nats' / 'server.conf'}" in log
    with sqlite3.connect(tmp_path / "data" / "jobcast.db") as db:
        assert db.execute("select count(*) from jobs").fetchone() == (1,)
    from app._db import _sqlite_pragmas  # the pragma each connection gets in durable mode

    probe = sqlite3.connect(tmp_path / "probe.db")
    _sqlite_pragmas(probe, None)  # type: ignore[arg-type]
    assert probe.execute("pragma synchronous").fetchone() == (2,)  # FULL
    probe.close()


def test_default_is_not_durable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JOBCAST_DURABLE", raising=False)
    assert not NatsServer(tmp_path).durable
