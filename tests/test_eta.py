"""ETA: the estimator and the learned speeds (pure), and end to end with a real whisper worker:
`eta_s` on progress events and the job, `estimated_start_s` on a job waiting behind a running one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from app._db import JobRow
from app._eta import EtaBoard, estimated_start, eta_now
from app._queries import job_view
from jobcast.client import about, eta_text
from streams import (
    JOBS_STREAM,
    JobStatus,
    NatsServer,
    Speed,
    TaskSupervisor,
    WorkerInfo,
    learned,
    speed_family,
    speed_key,
    speeds_bucket,
    workers_bucket,
)
from streams._buckets import WORKERS_BUCKET
from tests.conftest import WorkerRunner, submit, wait_terminal
from tests.test_media_ops import FAST, JFK, SPEECH60, events, upload
from workers._eta import JobEta
from workers.whisper import MODEL_CACHE

MSG_CAP = 1100
"""A stream max_msg_size above jfk.flac's other events and below its transcription's result."""

# the estimator, pure -------------------------------------------------------------------


def test_no_estimate_before_any_measurement() -> None:
    eta = JobEta(started=0.0)
    assert eta.estimate(0.0, now=1.0) is None  # units unknown
    eta.units = 60.0
    assert eta.estimate(0.0, now=1.0) is None  # no learned speed, nothing done yet
    assert eta.estimate(20.0, now=4.0) is None  # one point of its own: no pace yet
    # 20 % to 60 % in 4 s: 10 s per half, from where it first moved (not from its start).
    assert eta.estimate(60.0, now=8.0) == pytest.approx(0.4 * 10.0)


def test_learned_speed_then_own_pace() -> None:
    eta = JobEta(started=100.0, speed=Speed(seconds_per_unit=0.5, job_seconds=5.0))
    eta.units = 10.0
    assert eta.estimate(0.0, now=100.0) == pytest.approx(5.0)  # 10 units at 0.5 s each
    assert eta.estimate(0.0, now=101.0) == pytest.approx(4.0)  # the time spent counts
    assert eta.estimate(25.0, now=102.0) == pytest.approx(3.0)  # its first step: no pace of its own yet
    # 25 % to 50 % in 0.5 s: its own pace leaves 1 s, the learned speed 2.5 s; half way, half each.
    assert eta.estimate(50.0, now=102.5) == pytest.approx(0.5 * 2.5 + 0.5 * 1.0, abs=0.06)  # to 0.1 s
    assert eta.estimate(100.0, now=103.0) == 0.0
    slow = JobEta(started=0.0, speed=Speed(seconds_per_unit=0.5, job_seconds=5.0))
    slow.units = 10.0
    assert slow.estimate(0.0, now=200.0) == 0.0  # past what was expected: never negative
    slow.estimate(10.0, now=200.0)
    # Slower than learned (10 % more took 100 s): its own pace (800 s left) weighs 20 %, and counts.
    assert slow.estimate(20.0, now=300.0) == pytest.approx(0.2 * 800.0)


def test_moving_average() -> None:
    first = learned(None, seconds=10.0, units=20.0, now=1.0)
    assert (first.seconds_per_unit, first.job_seconds, first.samples) == (0.5, 10.0, 1)
    second = learned(first, seconds=2.0, units=20.0, now=2.0)
    assert second.seconds_per_unit == pytest.approx(0.5 * 0.1 + 0.5 * 0.5)
    assert second.job_seconds == pytest.approx(6.0)
    assert second.samples == 2


def test_speed_keys() -> None:
    params = {"model": "tiny.en", "device": None, "compute_type": "int8", "language": "en"}
    assert speed_key("transcribe", params) == "transcribe.tiny-en.default.int8"
    assert speed_key("convert", {"crf": 23}) == "convert"
    assert speed_key("fix_srt", {"model": "gpt-4o", "chunk_size": 20}) == "fix_srt.gpt-4o"
    long = speed_key("transcribe", {"model": "/models/" + "x" * 300})
    assert len(long) <= 120
    assert long != speed_key("transcribe", {"model": "/models/" + "y" * 300})


def test_estimated_start_spreads_work_over_slots() -> None:
    assert estimated_start([], 0, []) is None  # no live slot
    assert estimated_start([], 2, []) == 0.0  # an idle slot
    assert estimated_start([30.0], 1, []) == 30.0  # behind the running job
    assert estimated_start([30.0], 1, [10.0, 10.0]) == 50.0
    assert estimated_start([30.0, 5.0], 2, [10.0]) == 15.0  # the slot free first takes the next


# end to end -----------------------------------------------------------------------------


async def run_with_events(
    client: httpx.AsyncClient, file_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Submit a transcription of the file (never from the stage cache) and its events until it ends."""
    job = await submit(client, type="transcribe", file_id=file_id, params=FAST, cache=False)
    seen = [envelope async for _, envelope in events(client, job["id"])]
    return job, seen


async def learned_speed(kv: KeyValue, key: str, samples: int) -> Speed:
    """The key's speed once it counts `samples` jobs (the worker learns after it has recorded
    the completion, so the client may see `completed` first); the last one read after 10 s."""
    speed: Speed | None = None
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(KeyNotFoundError):
                speed = msgspec.json.decode((await kv.get(key)).value or b"", type=Speed)
                if speed.samples >= samples:
                    return speed
            await asyncio.sleep(0.05)  # a KV get: no event to wait on


def progress_of(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in seen if e["kind"] == "progress"]


def at(envelope: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(envelope["event"]["ts"])


@pytest.mark.slow
async def test_third_run_predicts_its_time(
    client: httpx.AsyncClient, gpu: WorkerRunner, nats_server: NatsServer
) -> None:
    # speech60.mp3, not jfk.flac: jfk's half-second run is 5 steps of eta_s's 0.1 s, and one
    # scheduling hiccup of a loaded machine is a third of it; a 2 s run with a progress step
    # between 0 and 100 % also learns its pace apart from its start cost.
    source = await upload(client, "speech60.mp3", SPEECH60.read_bytes())
    job, seen = await run_with_events(client, source["id"])
    first = progress_of(seen)
    assert first
    assert first[0]["eta_s"] is None  # nothing measured yet
    assert first[0]["event"]["eta_s"] is None
    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed"
    assert done["eta_s"] is None  # not running: no ETA

    await run_with_events(client, source["id"])
    nc = await nats.connect(nats_server.url)
    try:
        speed = await learned_speed(await speeds_bucket(nc.jetstream()), "transcribe.tiny-en.cpu.int8", 2)
    finally:
        await nc.close()
    assert speed.samples == 2
    assert speed.seconds_per_unit > 0

    # The third run: its first estimate (right after the probe, at 0 %) against the time it then took.
    job, seen = await run_with_events(client, source["id"])
    assert job["status"] == "pending"
    assert job["estimated_start_s"] == 0.0  # the 202 says it: the worker's one slot is free
    estimates = [e for e in progress_of(seen) if e["eta_s"] is not None]
    assert estimates, seen
    end = next(e for e in seen if e["kind"] == "completed")
    took = (at(end) - at(estimates[0])).total_seconds()
    assert 0.5 * took <= estimates[0]["eta_s"] <= 1.5 * took, (estimates[0]["eta_s"], took)
    assert end["eta_s"] is None


@pytest.mark.slow
async def test_a_job_waiting_behind_a_running_one_has_an_estimated_start(
    client: httpx.AsyncClient, gpu: WorkerRunner
) -> None:
    source = await upload(client, "jfk.flac", JFK.read_bytes())
    longer = await upload(client, "speech60.mp3", SPEECH60.read_bytes())  # a few seconds to look at
    await run_with_events(client, longer["id"])  # one measurement (a pace of its own: taught cold)
    running = await submit(client, type="transcribe", file_id=longer["id"], params=FAST, cache=False)
    waiting = await submit(client, type="transcribe", file_id=source["id"], params=FAST, cache=False)
    assert waiting["status"] == "pending"
    found: list[tuple[float, float]] = []
    pages: list[str] = []
    async with asyncio.timeout(30):
        while True:
            ahead = (await client.get(f"/api/v1/jobs/{running['id']}")).json()
            job = (await client.get(f"/api/v1/jobs/{waiting['id']}")).json()
            if job["status"] != "pending":
                break
            if job["estimated_start_s"] is not None and ahead["eta_s"] is not None:
                found.append((job["estimated_start_s"], ahead["eta_s"]))
                listed = (await client.get("/api/v1/jobs", params={"status": "pending"})).json()
                assert [j["estimated_start_s"] for j in listed["items"] if j["id"] == waiting["id"]] != [None]
                pages.append((await client.get(f"/ui/jobs/{waiting['id']}")).text)
                pages.append((await client.get("/ui/jobs")).text)
            await asyncio.sleep(0.05)
    assert found, "no estimated start seen while the job waited"
    for start, left in found:  # one slot: it starts when the running one ends
        assert start == pytest.approx(left, abs=1.0)
    assert job["estimated_start_s"] is None  # running now
    # The UI says it too: the waiting job's page, and the recent-jobs list (both jobs' rows).
    assert "starts in about" in pages[0]
    assert "starts in about" in pages[1]
    assert " left</span>" in pages[1]
    await wait_terminal(client, waiting["id"])


def test_cli_bars_say_the_eta() -> None:
    assert eta_text("running", 170.0) == "about 3 min left"
    assert eta_text("running", 12.0) == "about 10 s left"
    assert eta_text("pending", None, 65.0) == "starts in about 1 min"
    assert eta_text("running", None) == ""  # nothing measured: nothing said
    assert eta_text("completed", 3.0) == ""
    assert about(2 * 3600.0) == "about 2.0 h"
    # Half-way rounds up, as the UI's Math.round does (Python's round would say 20 s and 2 min).
    assert about(22.5) == "about 25 s"
    assert about(150.0) == "about 3 min"


# review fixes ---------------------------------------------------------------------------


def test_the_pace_is_learned_apart_from_the_start_cost() -> None:
    # 10 s of model load and download, then 100 units at 0.1 s each (its first progress, 10 %, at
    # 11 s): the per-unit speed is its pace, the 10 s a cost of its own.
    eta = JobEta(started=0.0)
    eta.units = 100.0
    eta.estimate(0.0, now=0.5)
    eta.estimate(10.0, now=11.0)
    assert eta.start_cost(now=20.0) == pytest.approx(10.0)
    speed = learned(None, seconds=20.0, units=100.0, now=1.0, start_s=eta.start_cost(now=20.0))
    assert (speed.start_s, speed.seconds_per_unit, speed.job_seconds) == pytest.approx((10.0, 0.1, 20.0))
    # The next job, its model loaded already, starts in 1 s: the start cost is the newest job's.
    warm = learned(speed, seconds=11.0, units=100.0, now=2.0, start_s=1.0)
    assert (warm.start_s, warm.seconds_per_unit) == pytest.approx((1.0, 0.1))
    # A job of 300 units then expects 10 s + 30 s, not 3 x 20 s.
    longer = JobEta(started=0.0, speed=speed)
    longer.units = 300.0
    assert longer.estimate(0.0, now=0.0) == pytest.approx(40.0)
    # No progress between 0 and 100 %: no pace of its own, all its time is taken as its pace.
    burst = JobEta(started=0.0)
    burst.units = 11.0
    burst.estimate(0.0, now=0.1)
    burst.estimate(100.0, now=2.0)
    assert burst.start_cost(now=2.0) == 0.0


def test_pending_jobs_read_the_newest_speed_of_their_model_over_devices() -> None:
    board = EtaBoard(js=None)  # type: ignore[arg-type]  # no watch: the speeds are set by hand
    whisper = {"model": "tiny.en", "device": None, "compute_type": None}
    family = speed_family("transcribe", whisper)
    assert family == "transcribe.tiny-en"
    board.speeds["transcribe.tiny-en.cpu.int8"] = Speed(
        seconds_per_unit=0.2, job_seconds=12.0, updated_at=1.0, family=family
    )
    board.speeds["transcribe.tiny-en.cuda.float16"] = Speed(
        seconds_per_unit=0.01, job_seconds=1.0, updated_at=2.0, family=family
    )
    assert board.job_seconds("transcribe", whisper) == 1.0  # the newest
    named = whisper | {"device": "cpu", "compute_type": "int8"}
    assert board.job_seconds("transcribe", named) == 12.0  # its own key
    assert board.job_seconds("transcribe", whisper | {"model": "base"}) is None
    assert board.job_seconds("noop", {}) is None


def test_a_running_jobs_eta_counts_down_between_progress_events() -> None:
    said = datetime.now(UTC) - timedelta(seconds=10)
    row = JobRow(id="j", status=JobStatus.RUNNING, eta_s=30.0, updated_at=said, progress=50.0)
    assert job_view(row).eta_s == pytest.approx(20.0, abs=1.0)
    row.eta_s = 4.0
    assert job_view(row).eta_s == 0.0  # late: never negative
    row.status = JobStatus.COMPLETED
    assert job_view(row).eta_s is None
    assert eta_now(30.0, said, said + timedelta(seconds=12)) == 18.0


async def test_a_job_recorded_as_failed_teaches_no_speed(
    client: httpx.AsyncClient, gpu: WorkerRunner, nats_server: NatsServer
) -> None:
    # The stream refuses the `completed` event (its result is over the operator's max_msg_size):
    # the job is recorded as failed, and its run must not count as a measurement.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().update_stream(config=replace(JOBS_STREAM, max_msg_size=MSG_CAP))
        source = await upload(client, "jfk.flac", JFK.read_bytes())
        job = await submit(client, type="transcribe", file_id=source["id"], params=FAST, cache=False)
        done = await wait_terminal(client, job["id"])
        assert done["status"] == "failed", done
        assert "could not be stored" in done["error"]
        kv = await speeds_bucket(nc.jetstream())
        with pytest.raises(NoKeysError):  # no key learned anything
            await kv.keys()
    finally:
        await nc.close()


def heartbeat(name: str, slots: int = 1) -> bytes:
    """A live worker's heartbeat in the gpu pool."""
    now = time.time()
    info = WorkerInfo(
        name=name, pool="gpu", slots=slots, running=[], host="h", pid=1, started_at=now, last_seen=now
    )
    return msgspec.json.encode(info)


async def test_the_board_follows_a_heartbeat_bucket_made_again(nats_server: NatsServer) -> None:
    # A memory-storage heartbeat bucket made again (after a NATS restart) numbers its messages
    # from 1 again: an ordered consumer that was past them skips them, and the board would never
    # see a worker again. Its watch notices it is behind and starts again.
    nc = await nats.connect(nats_server.url)
    tasks = TaskSupervisor(backoff_s=0.05, max_backoff_s=0.1)
    board = EtaBoard(nc.jetstream())
    try:
        kv = await workers_bucket(nc.jetstream())
        for n in range(5):
            await kv.put(f"old-{n}", heartbeat(f"old-{n}"))
        board.start(tasks)
        async with asyncio.timeout(10):
            while board.slots("gpu") < 5:  # noqa: ASYNC110 - polling the watch's dict
                await asyncio.sleep(0.05)
        await nc.jetstream().delete_key_value(WORKERS_BUCKET)
        kv = await workers_bucket(nc.jetstream())
        await kv.put("new", heartbeat("new", slots=3))
        async with asyncio.timeout(15):
            while "new" not in board.workers:  # noqa: ASYNC110 - polling the watch's dict
                await asyncio.sleep(0.05)
        assert board.slots("gpu") == 3  # the bucket's heartbeats alone: the gone ones are dropped
    finally:
        await tasks.stop()
        await nc.close()


async def test_a_cold_runs_model_load_stays_out_of_the_speed(
    client: httpx.AsyncClient, gpu: WorkerRunner, nats_server: NatsServer
) -> None:
    # The run that loads the model: with a progress step between 0 and 100 %, the load falls in
    # its start cost (the newest job's alone), not in the per-unit speed; without one (jfk.flac
    # often goes from 0 to 100 % in one step) nothing sets the load apart, and the run teaches
    # nothing. Which of the two happens is whisper's choice: each is checked as it comes.
    MODEL_CACHE.clear()
    source = await upload(client, "jfk.flac", JFK.read_bytes())
    nc = await nats.connect(nats_server.url)
    try:
        _, seen = await run_with_events(client, source["id"])
        paced = any(0.0 < e["progress"] < 100.0 for e in progress_of(seen))
        kv = await speeds_bucket(nc.jetstream())
        if paced:
            speed = await learned_speed(kv, "transcribe.tiny-en.cpu.int8", 1)
            assert speed.start_s > 0.0, speed
        else:
            with pytest.raises(NoKeysError):
                await kv.keys()
        await run_with_events(client, source["id"])  # warm: it teaches
        speed = await learned_speed(kv, "transcribe.tiny-en.cpu.int8", 2 if paced else 1)
        assert speed.samples == (2 if paced else 1)
    finally:
        await nc.close()
