"""Long-lived tasks are supervised: a fault is logged, shows on /ready, and the task comes back.

Each API test injects a fault into one task of the real API (the projection, the key watch,
the webhook sweep) and the worker test into the fetch loop of a real worker; while it lasts
/ready answers 503 naming the task, and once it clears the task runs and works again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.kv import KeyValue

from app import Settings
from app._metrics import Metrics
from app._projection import Projection
from app._retention import Retention
from app._webhooks import Webhooks
from streams import STREAM, NatsServer, TaskPhase, TaskSupervisor, close_quietly, connect, keys_bucket
from streams._buckets import KEYS_BUCKET
from tests.conftest import ApiServer, WorkerRunner, submit, wait_terminal
from tests.test_admin import Receiver, wait_for
from tests.test_security import BAD_KEY, put_key
from workers._fetch import Fetcher

# the helper itself ---------------------------------------------------------------------------


async def test_a_failing_task_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    release = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await release.wait()  # the third run stays up until released, then returns (a failure too)

    tasks = TaskSupervisor(backoff_s=0.01, max_backoff_s=0.02)
    tasks.start("flaky", flaky)
    await wait_for(_is(lambda: tasks.status()["flaky"].state == TaskPhase.RUNNING and len(runs) == 3))
    state = tasks.status()["flaky"]
    assert (state.restarts, state.last_error) == (2, "RuntimeError: boom 2")
    assert tasks.down() == []
    failures = [r for r in caplog.records if r.name == "jobcast.supervisor" and r.levelno == logging.ERROR]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["boom 1", "boom 2"]
    assert "Traceback" in caplog.text
    assert "in flaky" in caplog.text

    release.set()  # returning while it should run is a failure: it is started again (and again)
    await wait_for(_is(lambda: len(runs) >= 4))
    assert tasks.status()["flaky"].last_error == "returned while it should run until stopped"
    await tasks.stop()
    assert tasks.status()["flaky"].state == TaskPhase.FINISHED


@pytest.mark.slow
async def test_backoff_doubles_to_its_cap_with_jitter_and_resets_after_a_healthy_run() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    stay_up = asyncio.Event()

    async def failing() -> None:
        starts.append(loop.time())
        if stay_up.is_set():
            await asyncio.sleep(0.35)  # longer than healthy_s: the next delay starts over
        raise RuntimeError("down")

    tasks = TaskSupervisor(backoff_s=0.02, max_backoff_s=0.64, healthy_s=0.3)
    tasks.start("failing", failing)
    await wait_for(_is(lambda: len(starts) >= 9))
    stay_up.set()
    count = len(starts)
    await wait_for(_is(lambda: len(starts) >= count + 2))
    await tasks.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Each delay lies in the upper half of its ceiling, which doubles up to the cap; scheduling
    # can only add to it (uncapped, the last ones would be 1.28 s and 2.56 s at least).
    for gap, ceiling in zip(gaps[:8], [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 0.64, 0.64], strict=True):
        assert ceiling / 2 - 0.005 <= gap < ceiling + 0.3, gaps
    # After a run of 0.35 s the delay is back at the first one (0.02 s), not the cap's 0.32+ s.
    assert gaps[count] < 0.35 + 0.02 + 0.25, gaps


async def test_a_task_with_until_ends_when_asked_and_stop_cancels_the_others() -> None:
    stopping = asyncio.Event()

    async def loop_until_stopping() -> None:
        await stopping.wait()

    tasks = TaskSupervisor()
    done = tasks.start("until", loop_until_stopping, until=stopping)
    tasks.start("forever", asyncio.Event().wait)
    stopping.set()
    await asyncio.wait_for(done, 5)
    assert tasks.status()["until"].state == TaskPhase.FINISHED
    assert tasks.status()["until"].restarts == 0
    assert tasks.down() == ["until"]
    await asyncio.wait_for(tasks.stop(), 5)
    assert tasks.status()["forever"].state == TaskPhase.FINISHED
    with pytest.raises(ValueError, match="supervised already"):
        tasks.start("forever", asyncio.Event().wait)


# the API's tasks -----------------------------------------------------------------------------


async def test_ready_lists_every_supervised_task(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert {name: (t["state"], t["restarts"], t["last_error"]) for name, t in body["tasks"].items()} == {
        name: ("running", 0, None)
        for name in (
            "projection",
            "key-watch",
            "webhook-sweep",
            "retention-sweep",
            "cpu-sampler",
            "pipelines",
            "eta-watch",
        )
    }


async def test_projection_restarts_after_a_failing_batch(
    client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings, nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    fault = threading.Event()  # read in the projection's writer thread
    write = Projection._write

    def failing_write(self: Projection, *args: Any) -> Any:
        if fault.is_set():
            raise RuntimeError("injected projection fault")
        return write(self, *args)

    monkeypatch.setattr(Projection, "_write", failing_write)
    fault.set()
    # A submit waiting for its own write while the projection is down gets its answer after
    # the restart (the wait does not hang, and the batch that failed is not lost).
    pending = asyncio.create_task(client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 2}}))
    down = await wait_down(client, "projection")
    assert (
        down["tasks"]["projection"]["last_error"] == "RuntimeError (details in the log)"
    )  # no data: /ready is public
    assert_traceback_logged(caplog, "injected projection fault")
    fault.clear()
    response = await pending
    assert response.status_code == 202, response.text
    await wait_up(client, "projection")
    assert (await wait_terminal(client, response.json()["id"]))["status"] == "completed"
    more = await submit(client, params={"steps": 2})
    assert (await wait_terminal(client, more["id"]))["status"] == "completed"
    await assert_stream_applied_once(settings, nats_server)


async def test_projection_does_not_apply_a_committed_batch_twice(
    client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings, nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The fault hits after the batch's transaction committed: resuming from the sequence held
    # in memory would apply it again (and fail on the rows it already wrote, for ever).
    faults = [RuntimeError("injected fault after commit")]
    observe = Metrics.observe

    def failing_observe(self: Metrics, *args: Any) -> None:
        if faults:
            raise faults.pop()
        observe(self, *args)

    monkeypatch.setattr(Metrics, "observe", failing_observe)
    job = await submit(client, params={"steps": 2})
    assert (await wait_terminal(client, job["id"]))["status"] == "completed"
    body = await wait_up(client, "projection")
    assert body["tasks"]["projection"]["last_error"] == "RuntimeError (details in the log)"
    assert_traceback_logged(caplog, "injected fault after commit")
    await assert_stream_applied_once(settings, nats_server)


@pytest.fixture
async def keyed(
    nats_server: NatsServer, settings: Settings
) -> AsyncIterator[tuple[ApiServer, dict[str, str]]]:
    """The API with keys for alice, bob and root (admin); started here, before caplog's test phase
    (Litestar's logging set-up at start would take caplog's handler off the root logger)."""
    keys = {
        name: await put_key(nats_server.url, name, admin=name == "root") for name in ("alice", "bob", "root")
    }
    server = ApiServer(settings)
    await server.start()
    yield server, keys
    await server.stop()


async def test_key_watch_restarts_and_applies_a_revocation_made_while_down(
    keyed: tuple[ApiServer, dict[str, str]], nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    server, keys = keyed
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

        def as_(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {keys[name]}"}

        assert (await http.get("/api/v1/jobs", headers=as_("alice"))).status_code == 200
        next_entry = KeyValue.KeyWatcher.updates  # how the key watch reads (with a timeout)

        async def broken(self: KeyValue.KeyWatcher, timeout: float = 5.0) -> KeyValue.Entry | None:
            raise RuntimeError("injected key-watch fault")

        monkeypatch.setattr(KeyValue.KeyWatcher, "updates", broken)
        keys["carol"] = await put_key(nats_server.url, "carol")  # arrives; the next read fails
        down = await wait_down(http, "key-watch")
        assert down["tasks"]["key-watch"]["last_error"] == "RuntimeError (details in the log)"
        assert_traceback_logged(caplog, "injected key-watch fault")
        await revoke(nats_server.url, "alice")  # both while the watch is down
        await revoke(nats_server.url, "bob", leave_no_marker=True)
        monkeypatch.setattr(KeyValue.KeyWatcher, "updates", next_entry)
        await wait_up(http, "key-watch")

        async def refused(name: str) -> bool:
            response = await http.get("/api/v1/jobs", headers=as_(name))
            return response.status_code == 401 and response.json() == BAD_KEY

        await wait_for(lambda: refused("alice"), timeout=5)
        await wait_for(lambda: refused("bob"), timeout=5)
        assert (await http.get("/api/v1/jobs", headers=as_("carol"))).status_code == 200
        assert (await http.get("/api/v1/jobs/admin/queue-status", headers=as_("root"))).status_code == 200
        await revoke(nats_server.url, "carol")  # and the restarted watch follows changes live

        await wait_for(lambda: refused("carol"), timeout=5)


@pytest.fixture
async def sweep_only(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    """The API with the push path of webhooks off, so only the sweep (every 0.2 s) can deliver,
    as for a callback whose sender died."""
    monkeypatch.setattr(Webhooks, "_on_applied", lambda self, item: None)
    server = ApiServer(replace(settings, webhook_sweep_s=0.2))
    await server.start()
    yield server
    await server.stop()


async def test_webhook_sweep_restarts_and_delivers(
    sweep_only: ApiServer, worker: WorkerRunner, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    spawn = Webhooks._spawn

    def broken(self: Webhooks, job_id: str) -> None:
        raise RuntimeError("injected webhook-sweep fault")

    monkeypatch.setattr(Webhooks, "_spawn", broken)
    async with Receiver([200]) as hook, httpx.AsyncClient(base_url=sweep_only.url, timeout=30) as http:
        job = await submit(http, params={"steps": 1}, callback_url=hook.url)
        assert (await wait_terminal(http, job["id"]))["status"] == "completed"
        down = await wait_down(http, "webhook-sweep")
        assert down["tasks"]["webhook-sweep"]["last_error"] == "RuntimeError (details in the log)"
        assert_traceback_logged(caplog, "injected webhook-sweep fault")
        assert hook.requests == []
        monkeypatch.setattr(Webhooks, "_spawn", spawn)
        await wait_up(http, "webhook-sweep")

        async def delivered() -> bool:
            body = (await http.get(f"/api/v1/jobs/{job['id']}")).json()
            return body["callback_status"] == "delivered"

        await wait_for(delivered)
        assert [job["id"] in body.decode() for _, body in hook.requests] == [True]


async def test_retention_sweep_restarts_and_deletes(
    settings: Settings,
    worker: WorkerRunner,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delete_expired = Retention._delete_expired

    async def broken(self: Retention, *args: Any) -> Any:
        raise RuntimeError("injected retention-sweep fault")

    monkeypatch.setattr(Retention, "_delete_expired", broken)
    server = ApiServer(replace(settings, retention_days=0.2 / 86400, retention_sweep_s=0.2))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            job = await submit(http, params={"steps": 1})
            assert (await wait_terminal(http, job["id"]))["status"] == "completed"
            down = await wait_down(http, "retention-sweep")
            assert down["tasks"]["retention-sweep"]["last_error"] == "RuntimeError (details in the log)"
            assert_traceback_logged(caplog, "injected retention-sweep fault")
            assert (await http.get(f"/api/v1/jobs/{job['id']}")).status_code == 200
            monkeypatch.setattr(Retention, "_delete_expired", delete_expired)
            await wait_up(http, "retention-sweep")

            async def deleted() -> bool:
                return (await http.get(f"/api/v1/jobs/{job['id']}")).status_code == 404

            await wait_for(deleted)
    finally:
        await server.stop()


# the worker's fetch loop ---------------------------------------------------------------------


async def test_worker_fetch_loop_restarts_and_takes_jobs_again(
    client: httpx.AsyncClient, worker: WorkerRunner, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    pull = Fetcher._pull

    async def broken(self: Fetcher, nc: Any, durable: str, count: int) -> list[Any]:
        raise RuntimeError("injected fetch fault")

    monkeypatch.setattr(Fetcher, "_pull", broken)
    job = await submit(client, params={"steps": 1})  # its doorbell makes the loop pull, and fail
    # The worker has no HTTP: its heartbeat record (the admin workers list) says what is down.
    seen = await wait_for(lambda: _worker_task(client, "fetch", "restarting"))
    assert seen["last_error"] == "RuntimeError: injected fetch fault"
    assert_traceback_logged(caplog, "injected fetch fault")
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["status"] == "pending"
    monkeypatch.setattr(Fetcher, "_pull", pull)
    assert (await wait_terminal(client, job["id"]))["status"] == "completed"
    seen = await wait_for(lambda: _worker_task(client, "fetch", "running"))
    assert seen["restarts"] >= 1
    assert (await _worker_task(client, "heartbeat", "running"))["restarts"] == 0
    assert worker.worker.supervisor.down() == []


# helpers -------------------------------------------------------------------------------------


def _is(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


async def _worker_task(client: httpx.AsyncClient, name: str, state: str) -> dict[str, Any] | None:
    """The state of task `name` in the one worker's heartbeat record, if it is `state`."""
    (record,) = (await client.get("/api/v1/jobs/admin/queue-status")).json()["workers"]
    task: dict[str, Any] | None = record["tasks"].get(name)
    return task if task is not None and task["state"] == state else None


async def wait_down(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """Poll /ready until it answers 503 naming task `name` as restarting; returns the body."""

    async def down() -> dict[str, Any] | None:
        response = await client.get("/ready")
        body: dict[str, Any] = response.json()
        if response.status_code == 503 and name in body["status"]:
            assert body["status"].startswith("down: ")
            assert body["tasks"][name]["state"] == "restarting"
            return body
        return None

    body: dict[str, Any] = await wait_for(down)
    return body


async def wait_up(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """Poll /ready until it answers 200 with task `name` restarted; returns the body."""

    async def up() -> dict[str, Any] | None:
        response = await client.get("/ready")
        body: dict[str, Any] = response.json()
        if response.status_code == 200 and body["tasks"][name]["restarts"] >= 1:
            assert body["status"] == "ready"
            assert {t["state"] for t in body["tasks"].values()} == {"running"}
            return body
        return None

    body: dict[str, Any] = await wait_for(up, timeout=15)
    return body


def assert_traceback_logged(caplog: pytest.LogCaptureFixture, message: str) -> None:
    """The supervisor logged the failure at ERROR with its traceback."""
    logged = [
        record
        for record in caplog.records
        if record.name == "jobcast.supervisor" and record.levelno == logging.ERROR and record.exc_info
    ]
    assert any(str(record.exc_info[1]) == message for record in logged if record.exc_info), caplog.text
    assert "Traceback (most recent call last)" in caplog.text


async def revoke(nats_url: str, name: str, leave_no_marker: bool = False) -> None:
    """Delete a key from the bucket, as `jobcast keys revoke` does; with `leave_no_marker`, its
    delete marker goes too (as `purge_deletes` does), so a new watch does not even see it go."""
    nc = await connect(nats_url, "t")
    try:
        js = nc.jetstream()
        await (await keys_bucket(js)).delete(name)
        if leave_no_marker:
            await js.purge_stream(f"KV_{KEYS_BUCKET}", subject=f"$KV.{KEYS_BUCKET}.{name}")
    finally:
        await close_quietly(nc)


async def assert_stream_applied_once(settings: Settings, nats_server: NatsServer) -> None:
    """Every message of the stream (all job events here) is one event row: none skipped, none twice."""
    nc = await connect(nats_server.url, "t")
    try:
        last = (await nc.jetstream().stream_info(STREAM)).state.last_seq
    finally:
        await close_quietly(nc)

    def seqs(path: Path) -> tuple[list[int], int]:
        with sqlite3.connect(path) as db:
            rows = [seq for (seq,) in db.execute("SELECT seq FROM job_events ORDER BY seq")]
            (bookmark,) = db.execute("SELECT last_seq FROM projection_bookmark").fetchone()
        return rows, bookmark

    async def caught_up() -> list[int] | None:
        rows, bookmark = await asyncio.to_thread(seqs, settings.data_dir / "jobcast.db")
        return rows if bookmark == last else None

    assert await wait_for(caught_up) == list(range(1, last + 1))
