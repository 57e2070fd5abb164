"""No job hangs: results stay under their bound, attempts end, run time is limited, slots wait for threads."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import replace
from datetime import datetime
from typing import Any

import httpx
import nats
import pytest
from nats.js.errors import NotFoundError

from app._db import Database
from streams import (
    JOBS_STREAM,
    MAX_ATTEMPTS,
    MAX_DELIVER,
    MAX_RESULT_BYTES,
    STREAM,
    NatsServer,
    Submitted,
    WorkerConsumer,
    encode_event,
    ensure_stream,
    events_subject,
    submit_subject,
)
from tests.conftest import WorkerRunner, submit, wait_terminal
from tests.test_semantics import history
from workers import Worker, WorkerSettings
from workers._context import JobContext


@pytest.fixture
def worker_settings(worker_settings: WorkerSettings) -> WorkerSettings:
    """conftest's cpu worker, stopping handlers, retrying and polling fast."""
    return replace(
        worker_settings, cancel_grace_s=0.2, stop_wait_s=15.0, retry_base_s=0.001, retry_max_s=0.005,
        idle_poll_s=0.05,
    )  # fmt: skip


def at(envelope: dict[str, Any]) -> datetime:
    """When the event of an envelope happened."""
    return datetime.fromisoformat(envelope["event"]["ts"])


def steps(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"]["step"] for e in events if e["kind"] == "progress"]


async def then_next_job_runs(client: httpx.AsyncClient) -> dict[str, Any]:
    """A plain job submitted now completes: the worker took it, its slot was free."""
    after = await submit(client, params={"steps": 1})
    done = await wait_terminal(client, after["id"], timeout=15)
    assert done["status"] == "completed", done
    return done


# 1. results too big for a message ----------------------------------------------------------------


async def test_oversized_result_fails_the_job_at_once_and_frees_the_slot(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    loop = asyncio.get_running_loop()
    begin = loop.time()
    job = await submit(client, params={"steps": 0, "result_bytes": 3_000_000})
    done = await wait_terminal(client, job["id"], timeout=15)
    took = loop.time() - begin
    assert done["status"] == "failed", done
    assert done["result"] is None
    assert done["error"].startswith("the result is 3000"), done["error"]
    assert f"over the {MAX_RESULT_BYTES}-byte bound" in done["error"]
    assert took < 10, took  # seconds, not the minutes of a publish retried for ever
    await then_next_job_runs(client)


async def test_result_under_the_bound_completes(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 0, "result_bytes": 60_000})
    done = await wait_terminal(client, job["id"], timeout=15)
    assert done["status"] == "completed", done
    assert len(done["result"]["filler"]) == 60_000


async def test_an_event_the_stream_rejects_fails_the_job(
    client: httpx.AsyncClient, worker: WorkerRunner, nats_server: NatsServer
) -> None:
    # A stream whose operator capped messages below the result bound: the server answers the
    # `completed` event with "message size exceeds maximum allowed", which no retry can change.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().update_stream(config=replace(JOBS_STREAM, max_msg_size=20_000))
    finally:
        await nc.close()
    job = await submit(client, params={"steps": 0, "result_bytes": 30_000})
    done = await wait_terminal(client, job["id"], timeout=15)
    assert done["status"] == "failed", done
    assert done["error"].startswith("the completed event (30"), done["error"]
    assert "could not be stored" in done["error"]
    assert "maximum" in done["error"].lower()
    await then_next_job_runs(client)


@pytest.mark.slow
async def test_publishing_gives_up_on_a_broker_that_stays_away(
    worker_settings: WorkerSettings, nats_server: NatsServer
) -> None:
    # Transient errors are retried for `publish_retry_s`, then the attempt is let go: the slot is
    # free again, and the message, never acked, is redelivered once the broker is back.
    runner = WorkerRunner(replace(worker_settings, publish_retry_s=1.0))
    await runner.start()
    worker = runner.worker
    try:
        assert worker.js is not None
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            job = Submitted(
                job_id="gone-broker", type="noop", pool="cpu", owner="t", params={"steps": 1, "duration_s": 1}
            )
            await js.publish(submit_subject("cpu", 0, job.job_id), encode_event(job))
        finally:
            await nc.close()
        async with asyncio.timeout(10):
            while not worker._running:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        await nats_server.stop()
        loop = asyncio.get_running_loop()
        begin = loop.time()
        async with asyncio.timeout(15):
            while worker._tasks:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert loop.time() - begin < 10
        await nats_server.start()
        nc = await nats.connect(nats_server.url)
        try:
            async with asyncio.timeout(20):
                while True:
                    # the broker may have gone before even `started` was stored: nothing there yet
                    with contextlib.suppress(NotFoundError):
                        last = await nc.jetstream().get_last_msg(STREAM, events_subject(job.job_id))
                        if b'"kind":"completed"' in (last.data or b""):
                            break
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
    finally:
        await runner.stop()


async def test_a_forced_result_is_bounded_too(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 0})  # no worker here: it stays pending
    forced = await client.post(
        f"/api/v1/jobs/admin/{job['id']}/force-complete", json={"result": {"filler": "x" * MAX_RESULT_BYTES}}
    )
    assert forced.status_code == 422, forced.text
    assert forced.json()["detail"] == (
        f"a result is at most {MAX_RESULT_BYTES} bytes of JSON; this one is {MAX_RESULT_BYTES + 13}"
        " - at `$.result`"
    )
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["status"] == "pending"


# 2. attempts that agree with MaxDeliver -----------------------------------------------------------


@pytest.mark.slow
async def test_highest_max_attempts_that_always_fails_ends_failed(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(
        client, params={"steps": 0, "fail_times": 100, "error": "flaky"}, max_attempts=MAX_ATTEMPTS
    )
    done = await wait_terminal(client, job["id"], timeout=30)
    assert (done["status"], done["attempt"], done["exhausted"]) == ("failed", MAX_ATTEMPTS, True), done
    assert done["error"].startswith(f"gave up after {MAX_ATTEMPTS} attempt(s): flaky"), done["error"]


async def test_max_attempts_past_the_bound_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/jobs", json={"type": "noop", "max_attempts": MAX_ATTEMPTS + 1})
    assert response.status_code == 400, response.text  # as every field of the body outside `params`
    assert response.json()["extra"] == [
        {"message": f"Expected `int` <= {MAX_ATTEMPTS}", "key": "max_attempts", "source": "body"}
    ]


async def test_an_existing_consumer_is_brought_in_line_on_start(
    worker_settings: WorkerSettings, nats_server: NatsServer
) -> None:
    # A consumer as an older jobcast left it: MaxDeliver 20, and a BackOff that overrides the
    # delay of every nak. A worker's start updates it in place.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await ensure_stream(js)
        consumer = WorkerConsumer(pool="cpu", ack_wait_s=worker_settings.ack_wait_s)
        await js.add_consumer(STREAM, config=replace(consumer.config(), max_deliver=20, backoff=[2.0, 4.0]))
        runner = WorkerRunner(worker_settings)
        await runner.start()
        await runner.stop()
        config = (await js.consumer_info(STREAM, consumer.durable)).config
        assert (config.max_deliver, config.backoff) == (MAX_DELIVER, None)
        assert MAX_DELIVER == MAX_ATTEMPTS + 1
    finally:
        await nc.close()


# 3. run-time limits --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_hung_handler_times_out_and_the_worker_takes_the_next_job(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 0, "hang_s": 600}, timeout_s=1)
    assert job["timeout_s"] == 1
    done = await wait_terminal(client, job["id"], timeout=15)
    assert done["status"] == "failed", done
    assert done["error"] == "timed out after 1 s"
    assert done["exhausted"] is False
    events = await history(client, job["id"])
    started = next(e for e in events if e["kind"] == "started")
    took = (at(events[-1]) - at(started)).total_seconds()
    print(
        f"hung handler stopped {took - 1:.2f} s after its 1 s limit"
    )  # the figure docs/reliability.md quotes
    assert 1 <= took < 8, took  # limit, cancel_grace_s, the task's cancellation; CI may be slow
    assert "stopping: timed out after 1 s" in steps(events)
    await then_next_job_runs(client)


async def test_timeout_s_is_bounded(client: httpx.AsyncClient) -> None:
    for value, message in (
        (0, "Expected `float` >= 1.0"),
        (0.5, "Expected `float` >= 1.0"),
        (7 * 24 * 3600 + 1, "Expected `float` <= 604800.0"),
        ("soon", "Expected `float | null`, got `str`"),
    ):
        response = await client.post("/api/v1/jobs", json={"type": "noop", "timeout_s": value})
        assert response.status_code == 400, (value, response.text)
        assert response.json()["extra"] == [{"message": message, "key": "timeout_s", "source": "body"}]


async def test_timeout_s_survives_a_retry_and_an_older_database(
    client: httpx.AsyncClient, tmp_path: Any
) -> None:
    job = await submit(client, params={"steps": 0}, timeout_s=5)
    assert (await client.post(f"/api/v1/jobs/{job['id']}/cancel")).status_code == 200
    again = await client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert again.status_code in (200, 202), again.text
    assert (again.json()["attempt"], again.json()["timeout_s"]) == (2, 5)

    # A database an older jobcast made lacks the column: starting adds it.
    path = tmp_path / "old.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await database.create_all()
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE jobs DROP COLUMN timeout_s")
        await database.create_all()
    finally:
        await database.dispose()
    with sqlite3.connect(path) as conn:
        assert "timeout_s" in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}


@pytest.mark.slow
async def test_thread_of_a_timed_out_job_holds_its_slot_until_it_stops(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    # The thread looks at the cancel flag every 2 s: the job's end, and the next job's start,
    # wait for that look, not only for the handler's task.
    slow = await submit(client, params={"steps": 0, "block_s": 600, "check_every_s": 2}, timeout_s=1)
    after = await submit(client, params={"steps": 1})
    failed = await wait_terminal(client, slow["id"], timeout=20)
    done = await wait_terminal(client, after["id"], timeout=20)
    assert failed["status"] == "failed", failed
    assert failed["error"] == "timed out after 1 s"
    assert done["status"] == "completed", done
    events = await history(client, slow["id"])
    said = steps(events)
    assert (
        said.index("stopping: timed out after 1 s")
        < said.index("stopping: waiting for the handler's thread to stop")
        < said.index("blocking thread stopped: cancelled")
    ), said
    stopped = next(e for e in events if e["kind"] == "progress" and e["event"]["step"].endswith("cancelled"))
    assert at(stopped) <= at(events[-1])
    next_started = next(e for e in await history(client, after["id"]) if e["kind"] == "started")
    assert at(next_started) >= at(events[-1])


@pytest.mark.slow
async def test_cancel_frees_the_slot_only_once_the_thread_stopped(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    slow = await submit(client, params={"steps": 0, "block_s": 600, "check_every_s": 3})
    async with asyncio.timeout(10):
        while (await client.get(f"/api/v1/jobs/{slow['id']}")).json()["status"] != "running":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # into the thread's first 3 s without a look at the flag
    after = await submit(client, params={"steps": 1})
    assert (await client.post(f"/api/v1/jobs/{slow['id']}/cancel")).status_code == 200
    cancelled = await wait_terminal(client, slow["id"], timeout=20)
    done = await wait_terminal(client, after["id"], timeout=20)
    assert (cancelled["status"], done["status"]) == ("cancelled", "completed")
    events = await history(client, slow["id"])
    stopped = next(e for e in events if e["kind"] == "progress" and e["event"]["step"].endswith("cancelled"))
    assert "stopping: waiting for the handler's thread to stop" in steps(events)
    assert at(stopped) <= at(events[-1])
    next_started = next(e for e in await history(client, after["id"]) if e["kind"] == "started")
    assert at(next_started) >= at(stopped)


@pytest.mark.slow
async def test_heartbeat_stops_renewing_a_job_that_will_not_stop(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    # A handler deaf to cancellation keeps its worker's slot; past its deadline plus the grace,
    # its message is no longer renewed, so JetStream hands it to another worker.
    release = asyncio.Event()

    async def deaf(ctx: JobContext) -> dict[str, Any]:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        return {}

    stuck_settings = replace(
        worker_settings, name="stuck", ack_wait_s=1.0, stop_wait_s=0.5, publish_retry_s=1.0
    )
    stuck = WorkerRunner(stuck_settings)
    stuck.worker = Worker(stuck_settings, handlers={"noop": deaf})
    await stuck.start()
    try:
        job = await submit(client, params={"steps": 0}, timeout_s=1)
        async with asyncio.timeout(10):
            while (await client.get(f"/api/v1/jobs/{job['id']}")).json()["status"] != "running":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        healthy = WorkerRunner(replace(worker_settings, name="healthy", ack_wait_s=1.0))
        await healthy.start()
        try:
            done = await wait_terminal(client, job["id"], timeout=30)
        finally:
            await healthy.stop()
        assert (done["status"], done["worker"], done["attempt"]) == ("completed", "healthy", 2), done
    finally:
        release.set()
        await stuck.stop()
