"""Retention: a deleted job leaves nothing in the stream but an expiring tombstone, a rebuild after
purges equals the database before, late events cannot bring a deleted job back, the stream's
byte limit answers 503, and the retention sweep deletes what has outlived its days."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js import JetStreamContext
from nats.js import api as js_api

from app import Settings
from streams import (
    JOB_HEADER,
    JOBS_STREAM,
    KIND_HEADER,
    STREAM,
    CallbackResult,
    Completed,
    Event,
    FileStored,
    NatsServer,
    Progress,
    Started,
    Submitted,
    encode_event,
    ensure_stream,
    events_subject,
    files_subject,
    submit_subject,
    utcnow,
)
from tests.conftest import ApiServer, WorkerRunner, submit, wait_terminal
from tests.test_recovery import wait_ready
from workers import WorkerSettings


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer) -> Settings:
    """Tombstones that expire within a test."""
    return Settings(data_dir=tmp_path / "data", nats_url=nats_server.url, sse_ping_s=0.5, tombstone_ttl_s=1)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A plain NATS connection to look at the stream directly."""
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    """Poll `check` until it holds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def stored(js: JetStreamContext, job_id: str) -> dict[str, int]:
    """Every subject of the stream that still holds a message of `job_id`, with its count."""
    found: dict[str, int] = {}
    for pattern in (f"jobs.*.{job_id}", f"jobs.submit.*.*.{job_id}"):
        info = await js.stream_info(STREAM, subjects_filter=pattern)
        found |= info.state.subjects or {}
    return found


async def ok(response: Awaitable[httpx.Response], status: int = 200) -> Any:
    answer = await response
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else None


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every meaningful row of the projection. Not an event row's autoincrement id (a rebuild
    numbers its rows afresh), nor the bookmark: after the stream's last messages expired (the
    tombstones), a rebuild stops at the last one still stored, an equivalent place to resume."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {
            "jobs": conn.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
            "job_events": conn.execute(
                "SELECT job_id, seq, kind, payload FROM job_events ORDER BY job_id, seq"
            ).fetchall(),
            "files": conn.execute("SELECT * FROM files ORDER BY id").fetchall(),
        }


async def finished_jobs(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """One job of every kind of history, ended and let go by its worker: completed, failed,
    scheduled and cancelled, scheduled, cancelled and retried, and a batch."""
    later = (utcnow() + timedelta(hours=1)).isoformat()
    jobs = {
        "completed": await submit(client, params={"steps": 2}),
        "failed": await submit(client, params={"steps": 1, "fail": True}),
        "queued": await submit(client, params={"steps": 1}, scheduled_for=later),
        "retried": await submit(client, params={"steps": 1}, scheduled_for=later),
    }
    batch = await client.post(
        "/api/v1/jobs/batch", json={"type": "noop", "items": [{}, {}], "params": {"steps": 2}}
    )
    assert batch.status_code == 202, batch.text
    jobs["batch"] = batch.json()
    for name in ("queued", "retried"):
        await ok(client.post(f"/api/v1/jobs/{jobs[name]['id']}/cancel"))
    await ok(client.post(f"/api/v1/jobs/{jobs['retried']['id']}/retry"))
    for name, job in jobs.items():
        jobs[name] = await wait_terminal(client, job["id"])
    children = await ok(client.get(f"/api/v1/jobs/{jobs['batch']['id']}/children"))
    for job in [*jobs.values(), *children]:

        async def released(job_id: str = job["id"]) -> bool:
            return (await ok(client.get(f"/api/v1/jobs/{job_id}")))["held_by"] is None

        await until(released)
    return jobs | {f"child{i}": child for i, child in enumerate(children)}


@pytest.mark.slow
async def test_delete_purges_every_message_of_the_job(
    client: httpx.AsyncClient, worker: WorkerRunner, js: JetStreamContext
) -> None:
    jobs = await finished_jobs(client)
    assert [jobs[n]["status"] for n in ("completed", "failed", "queued", "retried")] == [
        "completed", "failed", "cancelled", "completed",
    ]  # fmt: skip
    for name, subjects in (("queued", 3), ("retried", 4), ("child0", 2)):  # schedule, control, ...
        assert len(await stored(js, jobs[name]["id"])) == subjects, name
    kept = jobs.pop("completed")
    parents = [jobs[name]["id"] for name in ("failed", "queued", "retried", "batch")]
    for job_id in parents:
        assert (await client.delete(f"/api/v1/jobs/{job_id}")).status_code == 204
    upload = await ok(client.post("/api/v1/files", files={"file": ("a.txt", b"bytes")}), 201)
    assert (await client.delete(f"/api/v1/files/{upload['id']}")).status_code == 204

    # Right after: each deleted job's only message is its parent's tombstone (children have none).
    for job in jobs.values():
        expected = {f"jobs.deleted.{job['id']}": 1} if job["id"] in parents else {}
        assert await stored(js, job["id"]) == expected, job
        assert (await client.get(f"/api/v1/jobs/{job['id']}")).status_code == 404
    tombstone = await js.get_last_msg(STREAM, f"jobs.deleted.{parents[0]}")
    assert (tombstone.headers or {}).get("Nats-TTL") == "1s"
    files = await js.stream_info(STREAM, subjects_filter=f"jobs.files.{upload['id']}")
    assert files.state.subjects == {f"jobs.files.{upload['id']}": 1}  # file_deleted only

    async def all_gone() -> bool:
        left = [await stored(js, job["id"]) for job in jobs.values()]
        info = await js.stream_info(STREAM, subjects_filter=f"jobs.files.{upload['id']}")
        return not any(left) and not info.state.subjects

    await until(all_gone)  # the tombstones expired: nothing of them is left
    assert len(await stored(js, kept["id"])) == 2  # the job not deleted keeps its history
    assert (await ok(client.get(f"/api/v1/jobs/{kept['id']}")))["status"] == "completed"


@pytest.mark.slow
async def test_rebuild_after_purges_equals_the_database_before(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings, js: JetStreamContext
) -> None:
    doomed = await finished_jobs(client)
    kept = await finished_jobs(client)
    upload = await ok(client.post("/api/v1/files", files={"file": ("kept.txt", b"kept")}), 201)
    gone = await ok(client.post("/api/v1/files", files={"file": ("gone.txt", b"gone")}), 201)
    assert (await client.delete(f"/api/v1/files/{gone['id']}")).status_code == 204
    # A file a job produced under an older worker, which put `file_stored` on the job's events
    # subject: the job is deleted, the file stays (no `files=true`), and so after a rebuild.
    producer = doomed["completed"]
    legacy = FileStored(
        job_id=producer["id"], file_id=str(uuid.uuid4()), owner=producer["owner"], name="old.srt",
        content_type="application/x-subrip", size=3, sha256="0" * 64,
    )  # fmt: skip
    marker = await publish(js, events_subject(producer["id"]), legacy)
    await until(lambda: listed_file(client, legacy.file_id))
    for name in ("completed", "failed", "queued", "retried", "batch"):
        assert (await client.delete(f"/api/v1/jobs/{doomed[name]['id']}")).status_code == 204
    moved = await js.get_last_msg(STREAM, files_subject(legacy.file_id))
    assert moved.seq > marker

    async def tombstones_expired() -> bool:
        return not (await js.stream_info(STREAM, subjects_filter="jobs.deleted.>")).state.subjects

    await until(tombstones_expired)  # so the stream's last message is gone too
    db = settings.data_dir / "jobcast.db"
    before = snapshot(db)
    assert (len(before["jobs"]), len(before["files"])) == (len(kept), 2)
    assert any(row[0] == kept["batch"]["id"] and row[2] == "progress" for row in before["job_events"])
    await api.stop()
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    ready = await wait_ready(api.url, timeout=15)
    assert ready["applied_seq"] == ready["stream_seq"] == (await js.get_last_msg(STREAM, "jobs.>")).seq
    assert snapshot(db) == before
    assert (await ok(client.get(f"/api/v1/files/{upload['id']}")))["name"] == "kept.txt"
    assert (await ok(client.get(f"/api/v1/files/{legacy.file_id}")))["job_id"] == producer["id"]


async def listed_file(client: httpx.AsyncClient, file_id: str) -> bool:
    return (await client.get(f"/api/v1/files/{file_id}")).status_code == 200


async def publish(js: JetStreamContext, subject: str, event: Event) -> int:
    headers = {KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
    return (await js.publish(subject, encode_event(event), headers=headers)).seq


@pytest.mark.slow
async def test_late_events_of_a_deleted_job_do_not_bring_it_back(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings, js: JetStreamContext
) -> None:
    job = await submit(client, params={"steps": 1})
    done = await wait_terminal(client, job["id"])
    assert (await client.delete(f"/api/v1/jobs/{job['id']}")).status_code == 204
    # What a worker that had already fetched a redelivery, a webhook sender, or an API instance
    # that had not yet seen the delete (retrying the job) may still publish afterwards:
    job_id, subject = job["id"], events_subject(job["id"])
    late: list[tuple[str, Event]] = [
        (subject, Started(job_id=job_id, attempt=2, worker="late")),
        (subject, Progress(job_id=job_id, attempt=2, progress=50.0)),
        (subject, Completed(job_id=job_id, attempt=2, result={}, worker="late")),
        (subject, CallbackResult(job_id=job_id, attempt=1, delivered=True, tries=1)),
        (
            submit_subject("batch", 0, job_id),  # no worker consumes it: the projection alone sees it
            Submitted(job_id=job_id, attempt=2, type="noop", pool="cpu", owner=done["owner"]),
        ),
    ]
    seqs = [await publish(js, s, event) for s, event in late]
    marker = await submit(client, params={"steps": 0})  # applied after every late event
    assert marker["last_event_id"] > max(seqs)
    missing = await client.get(f"/api/v1/jobs/{job_id}")
    assert missing.json() == {"status_code": 404, "detail": f"job {job_id} not found"}
    listed = await ok(client.get("/api/v1/jobs"))
    assert [j["id"] for j in listed["items"]] == [marker["id"]]

    await api.stop()
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    await wait_ready(api.url)
    assert (await client.get(f"/api/v1/jobs/{job_id}")).status_code == 404


@pytest.mark.slow
async def test_full_stream_refuses_new_jobs_with_503_and_loses_none(
    nats_server: NatsServer, settings: Settings, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream made by an older jobcast (no byte limit): the API's start brings it in line.
    await js.add_stream(config=replace(JOBS_STREAM, max_bytes=-1, allow_msg_ttl=False))
    monkeypatch.setenv("JOBCAST_STREAM_MAX_BYTES", "40000")
    api = ApiServer(replace(settings, storage_check_s=0))  # a tiny stream fills within a second
    runner = WorkerRunner(WorkerSettings(pool="cpu", nats_url=nats_server.url, ack_wait_s=2, name="w"))
    await api.start()
    await runner.start()
    try:
        info = await js.stream_info(STREAM)
        assert (info.config.max_bytes, info.config.discard) == (40000, js_api.DiscardPolicy.OLD)
        assert info.config.allow_msg_ttl
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            accepted, refused = [], None
            for _ in range(200):
                response = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 1}})
                if response.status_code != 202:
                    refused = response
                    break
                accepted.append(response.json()["id"])
                await wait_terminal(client, accepted[-1])
            assert refused is not None, "the stream never filled"
            assert refused.status_code == 503
            assert refused.json()["detail"].startswith("storage full: the job log holds ")
            assert "delete finished jobs" in refused.json()["detail"]
            assert len(accepted) >= 3
            upload = await client.post("/api/v1/files", files={"file": ("a.txt", b"x")})
            assert (upload.status_code, upload.json()["detail"][:12]) == (503, "storage full")
            # Nothing accepted was dropped: every job is there, completed, its submission kept.
            for job_id in accepted:
                assert (await ok(client.get(f"/api/v1/jobs/{job_id}")))["status"] == "completed"
            assert (await js.stream_info(STREAM)).state.bytes <= 40000
            assert f"jobs.submit.cpu.p0.{accepted[0]}" in await stored(js, accepted[0])
            # Deleting jobs makes room (within the second the API's look at the size lasts).
            for job_id in accepted[: len(accepted) // 2 + 1]:
                assert (await client.delete(f"/api/v1/jobs/{job_id}")).status_code == 204

            async def accepted_again() -> bool:
                response = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 1}})
                return response.status_code == 202

            await until(accepted_again, timeout=10)
    finally:
        await runner.stop()
        await api.stop()


# idempotency keys after delete ------------------------------------------------------------------


async def cancelled_and_deleted(client: httpx.AsyncClient, js: JetStreamContext, key: str) -> dict[str, Any]:
    """A keyed job, cancelled while it ran (a cancel request for its attempt 1 in the stream), then
    deleted; returns it as it was."""
    job = await submit(client, client_request_id=key, params={"steps": 40, "duration_s": 20})

    async def running() -> bool:
        return (await ok(client.get(f"/api/v1/jobs/{job['id']}")))["status"] == "running"

    await until(running)
    await ok(client.post(f"/api/v1/jobs/{job['id']}/cancel"))

    async def released() -> bool:
        current = await ok(client.get(f"/api/v1/jobs/{job['id']}"))
        return bool(current["status"] == "cancelled" and current["held_by"] is None)

    await until(released)
    assert (await client.delete(f"/api/v1/jobs/{job['id']}")).status_code == 204
    return job


async def resubmitted(client: httpx.AsyncClient, old: dict[str, Any], key: str) -> dict[str, Any]:
    """The key submitted again after its job was deleted: a new job, which runs to its end."""
    again = await client.post(
        "/api/v1/jobs", json={"type": "noop", "client_request_id": key, "params": {"steps": 1}}
    )
    assert again.status_code == 202, again.text
    new = again.json()
    assert new["id"] != old["id"]
    assert (new["client_request_id"], new["attempt"], new["status"]) == (key, 1, "pending")
    assert (await wait_terminal(client, new["id"]))["status"] == "completed"  # not cancelled at birth
    # The old id stays gone: a client's late cancel of it cannot reach the new job.
    stale = await client.post(f"/api/v1/jobs/{old['id']}/cancel")
    assert stale.json() == {"status_code": 404, "detail": f"job {old['id']} not found"}
    # The key now names the new job.
    same = await client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": key})
    assert (same.status_code, same.json()["id"]) == (200, new["id"])
    return new


async def test_key_reused_after_delete_names_a_new_job(
    client: httpx.AsyncClient, worker: WorkerRunner, js: JetStreamContext
) -> None:
    old = await cancelled_and_deleted(client, js, "k")
    new = await resubmitted(client, old, "k")  # within the 2-minute duplicate window

    # Deleted again, the key moves on again, once however many ask at the same time.
    assert (await client.delete(f"/api/v1/jobs/{new['id']}")).status_code == 204
    responses = await asyncio.gather(
        *(client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": "k"}) for _ in range(8))
    )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202], [r.text for r in responses]
    (third,) = {r.json()["id"] for r in responses}
    assert third not in {old["id"], new["id"]}

    # A batch's key the same way; its children are new jobs too.
    body = {"type": "noop", "items": [{}, {}], "params": {"steps": 1}, "client_request_id": "kb"}
    first = await ok(client.post("/api/v1/jobs/batch", json=body), 202)
    await wait_terminal(client, first["id"])
    children = {c["id"] for c in await ok(client.get(f"/api/v1/jobs/{first['id']}/children"))}
    for child in children:

        async def released(job_id: str = child) -> bool:
            return (await ok(client.get(f"/api/v1/jobs/{job_id}")))["held_by"] is None

        await until(released)
    assert (await client.delete(f"/api/v1/jobs/{first['id']}")).status_code == 204
    second = await ok(client.post("/api/v1/jobs/batch", json=body), 202)
    assert second["id"] != first["id"]
    assert (await wait_terminal(client, second["id"]))["status"] == "completed"
    again = {c["id"] for c in await ok(client.get(f"/api/v1/jobs/{second['id']}/children"))}
    assert len(again) == 2
    assert not again & children


async def test_a_keyed_request_is_validated_before_it_names_its_job(client: httpx.AsyncClient) -> None:
    job = await submit(
        client, client_request_id="v", scheduled_for=(utcnow() + timedelta(hours=1)).isoformat()
    )
    # A number is no RFC 3339 time, even though Litestar's lax conversion would read it as one.
    number = await client.post(
        "/api/v1/jobs", json={"type": "noop", "client_request_id": "v", "scheduled_for": 0}
    )
    assert number.status_code == 400, number.text
    assert number.json()["extra"][0]["key"] == "scheduled_for"
    garbled = await client.post(
        "/api/v1/jobs", json={"type": "noop", "client_request_id": "v", "scheduled_for": "x"}
    )
    assert garbled.json() == {
        "status_code": 422, "detail": "Invalid RFC3339 encoded datetime: 'x' - at `$.scheduled_for`",
    }  # fmt: skip
    same = await client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": "v"})
    assert (same.status_code, same.json()["id"]) == (200, job["id"])


@pytest.mark.slow
async def test_key_reused_after_delete_past_the_duplicate_window(
    nats_server: NatsServer, settings: Settings, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCAST_DUPLICATE_WINDOW_S", "1")
    api = ApiServer(replace(settings, tombstone_ttl_s=600))
    runner = WorkerRunner(WorkerSettings(pool="cpu", nats_url=nats_server.url, ack_wait_s=2, name="w"))
    await api.start()
    await runner.start()
    try:
        assert (await js.stream_info(STREAM)).config.duplicate_window == 1
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            old = await cancelled_and_deleted(client, js, "late")
            await asyncio.sleep(1.5)  # the server has forgotten the submission's Nats-Msg-Id
            await resubmitted(client, old, "late")
    finally:
        await runner.stop()
        await api.stop()


# the retention sweep ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_retention_sweep_of_two_instances(
    nats_server: NatsServer,
    tmp_path: Path,
    worker: WorkerRunner,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    day = 86400.0
    ages = {"retention_days": 0.5 / day, "retention_failed_days": 6 / day, "retention_sweep_s": 0.1}
    apis = [
        ApiServer(
            Settings(data_dir=tmp_path / f"api{i}", nats_url=nats_server.url, tombstone_ttl_s=600, **ages)
        )
        for i in range(2)
    ]
    for api in apis:
        await api.start()
    try:
        async with (
            httpx.AsyncClient(base_url=apis[0].url, timeout=30) as first,
            httpx.AsyncClient(base_url=apis[1].url, timeout=30) as second,
        ):
            done = [await submit(first, params={"steps": 1}) for _ in range(3)]
            failed = await submit(second, params={"fail": True})
            batch = await ok(
                first.post(
                    "/api/v1/jobs/batch", json={"type": "noop", "items": [{}, {}], "params": {"steps": 1}}
                ),
                202,
            )
            cancelled = await submit(
                second, params={"steps": 1}, scheduled_for=(utcnow() + timedelta(hours=1)).isoformat()
            )
            await ok(second.post(f"/api/v1/jobs/{cancelled['id']}/cancel"))
            upload = await ok(first.post("/api/v1/files", files={"file": ("a.txt", b"kept")}), 201)
            children = [c["id"] for c in await ok(first.get(f"/api/v1/jobs/{batch['id']}/children"))]
            for job in (*done, failed, batch):
                await wait_terminal(first, job["id"])
            busy = await submit(first, params={"steps": 40, "duration_s": 30})  # the worker's one slot
            waiting = await submit(first, scheduled_for=(utcnow() + timedelta(hours=1)).isoformat())
            expired = [*(j["id"] for j in done), batch["id"], *children, cancelled["id"]]

            async def swept() -> bool:
                for http in (first, second):
                    for job_id in expired:
                        if (await http.get(f"/api/v1/jobs/{job_id}")).status_code != 404:
                            return False
                return True

            await until(swept)
            for http in (first, second):  # younger than its 6 s, and the one still running
                assert (await ok(http.get(f"/api/v1/jobs/{failed['id']}")))["status"] == "failed"
                assert (await ok(http.get(f"/api/v1/jobs/{busy['id']}")))["status"] == "running"
                assert (await ok(http.get(f"/api/v1/jobs/{waiting['id']}")))["status"] == "scheduled"
                assert (await ok(http.get(f"/api/v1/files/{upload['id']}")))["name"] == "a.txt"
            for job_id in expired:  # purged; a parent keeps its tombstone (TTL 600 s here)
                left = {f"jobs.deleted.{job_id}": 1} if job_id not in children else {}
                assert await stored(js, job_id) == left

            async def failed_swept() -> bool:
                answers = [await http.get(f"/api/v1/jobs/{failed['id']}") for http in (first, second)]
                return all(answer.status_code == 404 for answer in answers)

            await until(failed_swept)
            assert (await ok(first.get(f"/api/v1/jobs/{busy['id']}")))["status"] == "running"
            await ok(first.post(f"/api/v1/jobs/{busy['id']}/cancel"))
    finally:
        for api in apis:
            await api.stop()
    problems = [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("jobcast")]
    assert not problems, [r.getMessage() for r in problems]


async def test_only_the_api_moves_the_streams_limits_and_never_below_what_it_holds(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        monkeypatch.setenv("JOBCAST_STREAM_MAX_BYTES", "50000000")
        await ensure_stream(js)
        for n in range(50):
            await js.publish(events_subject(f"held-{n}"), b"x" * 1000)

        # a worker started without the API's settings leaves the limit alone
        monkeypatch.setenv("JOBCAST_STREAM_MAX_BYTES", "10000000")
        await ensure_stream(js, update=False)
        assert (await js.stream_info(STREAM)).config.max_bytes == 50_000_000

        # an API asked for less than the stream holds keeps the limit (and every message)
        monkeypatch.setenv("JOBCAST_STREAM_MAX_BYTES", "20000")
        await ensure_stream(js)
        info = await js.stream_info(STREAM)
        assert (info.config.max_bytes, info.state.messages) == (50_000_000, 50)

        monkeypatch.setenv("JOBCAST_STREAM_MAX_BYTES", "30000000")
        await ensure_stream(js)
        assert (await js.stream_info(STREAM)).config.max_bytes == 30_000_000
    finally:
        await nc.close()
