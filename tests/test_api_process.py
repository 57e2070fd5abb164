"""The `jobcast api` process itself: what it loads (P6's memory budget)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from streams import NatsServer
from tests.conftest import free_port, spawned
from tests.test_sessions import clean_env, wait_ready


async def test_the_api_process_serves_without_pydantic(nats_server: NatsServer, tmp_path: Path) -> None:
    """pydantic (installed for the llm worker's openai client) is never loaded by `jobcast api`:
    Litestar's pydantic plugins would cost 8 MB of its 80 MB (see `jobcast.cli.without_pydantic`)."""
    port = free_port()
    env = clean_env(JOBCAST_NATS_URL=nats_server.url, JOBCAST_DATA_DIR=str(tmp_path / "data"))
    argv = [sys.executable, "-m", "jobcast", "api", "--port", str(port)]
    async with spawned(argv, env) as proc, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        await wait_ready(proc, http)
        jobs = await http.get("/api/v1/jobs")
        assert (jobs.status_code, jobs.json()["items"]) == (200, [])
        assert (await http.get("/schema/openapi.json")).json()["info"]["title"] == "jobcast"
        libraries = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
        assert "_sqlite3" in libraries  # extension modules the process loaded are listed
        assert "pydantic_core" not in libraries


async def test_the_api_process_loads_jinja_only_for_a_page(nats_server: NatsServer, tmp_path: Path) -> None:
    """jinja2 (about 2 MB of RSS) is loaded by the first UI page, not by an API only scripts use;
    markupsafe's extension module shows when it is."""
    port = free_port()
    env = clean_env(JOBCAST_NATS_URL=nats_server.url, JOBCAST_DATA_DIR=str(tmp_path / "data"))
    argv = [sys.executable, "-m", "jobcast", "api", "--port", str(port)]
    async with spawned(argv, env) as proc, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        await wait_ready(proc, http)
        assert (await http.get("/api/v1/jobs")).json()["items"] == []
        maps = Path(f"/proc/{proc.pid}/maps")
        assert "markupsafe" not in await asyncio.to_thread(maps.read_text)
        page = await http.get("/ui/")
        assert page.status_code == 200, page.text
        assert "<form" in page.text
        assert "markupsafe" in await asyncio.to_thread(maps.read_text)
