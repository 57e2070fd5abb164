"""Pipelines: stages in order, each on its pool, each taking the stage before's main output; the
chain checked at submit; cancel, failure, retry from the failed stage, and an API restart between
stages. Real NATS, API, workers and whisper; the LLM is the local stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from app import Settings
from app._exceptions import queue_unavailable
from app._pipelines import stage_id
from app._publisher import Publisher
from streams import (
    KIND_HEADER,
    STREAM,
    Event,
    NatsServer,
    Submitted,
    connect,
    events_subject,
    pool_submissions,
)
from tests.conftest import MEDIA, ApiServer, WorkerRunner, wait_terminal
from tests.llm_server import FakeLLM
from tests.test_live import ws_collect, ws_url
from tests.test_media_ops import download, events, llm_settings, lowercase_srt, running, upload
from workers import WorkerSettings
from workers.whisper import MODEL_CACHE

SUBTITLES_THEN_FIX = [{"type": "generate_srt"}, {"type": "fix_srt"}]


async def submit_pipeline(
    client: httpx.AsyncClient, file_id: str, stages: list[dict[str, Any]]
) -> dict[str, Any]:
    """POST a pipeline and check the 202 and its parent's shape."""
    response = await client.post(
        "/api/v1/pipelines", json={"file_id": file_id, "stages": stages, "title": "talk"}
    )
    assert response.status_code == 202, response.text
    pipeline: dict[str, Any] = response.json()
    assert (pipeline["type"], pipeline["pool"], pipeline["file_id"]) == ("pipeline", "pipeline", file_id)
    assert pipeline["params"]["stages"][0]["type"] == stages[0]["type"]
    return pipeline


async def children(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/jobs/{job_id}/children")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


async def until_children(
    client: httpx.AsyncClient, job_id: str, *statuses: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Poll the stages until their statuses are `statuses`, in order."""
    async with asyncio.timeout(timeout):
        while True:
            stages = await children(client, job_id)
            if tuple(s["status"] for s in stages) == statuses:
                return stages
            await asyncio.sleep(0.05)


async def jfk(client: httpx.AsyncClient) -> dict[str, Any]:
    return await upload(client, "jfk.flac", (MEDIA / "jfk.flac").read_bytes(), "audio/flac")


def gpu_settings(nats_server: NatsServer) -> WorkerSettings:
    return WorkerSettings(pool="gpu", nats_url=nats_server.url, ack_wait_s=5, grace_s=2, name="gpu")


def output_ids(job: dict[str, Any]) -> list[str]:
    return [o["file_id"] for o in job["result"]["outputs"]]


async def pool_submissions_of(nats_server: NatsServer, pool: str, job_id: str) -> int:
    """How many submissions of `job_id` the stream holds on `pool`'s subjects."""
    nc = await connect(nats_server.url, name="test")
    try:
        info = await nc.jetstream().stream_info(STREAM, subjects_filter=pool_submissions(pool))
        return sum(n for subject, n in (info.state.subjects or {}).items() if subject.endswith(job_id))
    finally:
        await nc.close()


async def test_subtitles_then_fix_completes_in_order_on_the_stage_before_output(
    client: httpx.AsyncClient, nats_server: NatsServer, gpu: WorkerRunner
) -> None:
    media = await jfk(client)
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
            seen = asyncio.create_task(collect(client, pipeline["id"]))
            first, second = await children(client, pipeline["id"])
            # Every stage is listed from the start; the second waits, with no input yet, in no queue.
            assert (first["type"], first["pool"], first["file_id"]) == ("generate_srt", "gpu", media["id"])
            assert (second["type"], second["pool"], second["status"]) == ("fix_srt", "llm", "scheduled")
            assert (second["file_id"], second["current_step"]) == (None, "waiting for the stage before")
            done = await wait_terminal(client, pipeline["id"], timeout=90)
            kinds = await asyncio.wait_for(seen, 30)
    assert done["status"] == "completed", done
    first, second = await children(client, pipeline["id"])
    assert [(s["type"], s["status"], s["attempt"]) for s in (first, second)] == [
        ("generate_srt", "completed", 1),
        ("fix_srt", "completed", 1),
    ]
    srt = first["result"]["outputs"][0]
    assert srt["name"] == "jfk.srt"
    assert (second["file_id"], second["file_name"]) == (srt["file_id"], "jfk.srt")
    assert [o["name"] for o in second["result"]["outputs"]] == ["jfk.fixed.srt"]
    assert "ask not" in fake.requests[0].user.lower()  # the model got the first stage's subtitles
    stages = done["result"]["stages"]
    assert [(s["job_id"], s["type"], s["status"]) for s in stages] == [
        (first["id"], "generate_srt", "completed"),
        (second["id"], "fix_srt", "completed"),
    ]
    assert [[o["file_id"] for o in s["outputs"]] for s in stages] == [output_ids(first), output_ids(second)]
    assert (done["progress"], done["current_step"]) == (100.0, "2 of 2 stages done")
    assert kinds[-1] == "completed"  # the parent's SSE stream ended with its own end
    assert await pool_submissions_of(nats_server, "llm", second["id"]) == 1


async def collect(client: httpx.AsyncClient, job_id: str) -> list[str]:
    """The kinds of a job's SSE events until its stream ends."""
    return [kind async for kind, envelope in events(client, job_id) if envelope["job_id"] == job_id]


async def test_subtitles_fixed_then_translated_in_two_languages(
    client: httpx.AsyncClient, nats_server: NatsServer, gpu: WorkerRunner
) -> None:
    media = await jfk(client)
    stages = [*SUBTITLES_THEN_FIX, {"type": "translate_srt", "params": {"languages": ["de", "fr"]}}]
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, media["id"], stages)
            done = await wait_terminal(client, pipeline["id"], timeout=90)
    assert done["status"] == "completed", done
    subtitled, fixed, translated = await children(client, pipeline["id"])
    assert (fixed["file_name"], translated["file_name"]) == ("jfk.srt", "jfk.fixed.srt")
    assert translated["file_id"] == output_ids(fixed)[0]
    names = [o["name"] for o in translated["result"]["outputs"]]
    assert names == ["jfk.fixed.de.srt", "jfk.fixed.de.vtt", "jfk.fixed.fr.srt", "jfk.fixed.fr.vtt"]
    german = await download(client, output_ids(translated)[0])
    assert "[de] " in german.text
    assert [[o["name"] for o in s["outputs"]] for s in done["result"]["stages"]] == [
        [o["name"] for o in subtitled["result"]["outputs"]],
        ["jfk.fixed.srt"],
        names,
    ]


async def test_a_cached_first_stage_runs_only_the_later_stages(
    client: httpx.AsyncClient, nats_server: NatsServer, gpu: WorkerRunner
) -> None:
    media = await jfk(client)
    alone = await client.post("/api/v1/jobs", json={"type": "generate_srt", "file_id": media["id"]})
    assert (await wait_terminal(client, alone.json()["id"], timeout=60))["result"]["cached"] is False
    MODEL_CACHE.clear()  # a stage that ran whisper again would load the model again
    loads = MODEL_CACHE.loads
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            cached = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
            done = await wait_terminal(client, cached["id"], timeout=60)
            assert (MODEL_CACHE.loads, len(fake.requests)) == (loads, 1)
            response = await client.post(
                "/api/v1/pipelines",
                json={"file_id": media["id"], "stages": SUBTITLES_THEN_FIX, "cache": False},
            )
            assert response.status_code == 202, response.text
            anew = await wait_terminal(client, response.json()["id"], timeout=60)
    assert (done["status"], anew["status"]) == ("completed", "completed")
    first, second = await children(client, cached["id"])
    assert (first["result"]["cached"], second["status"], second["file_id"]) == (
        True,
        "completed",
        output_ids(first)[0],
    )
    assert (await children(client, anew["id"]))[0]["result"]["cached"] is False
    assert MODEL_CACHE.loads == loads + 1  # `cache: false` ran whisper


async def test_a_stage_that_cannot_take_the_output_before_is_refused_naming_it(
    client: httpx.AsyncClient,
) -> None:
    media = await jfk(client)
    cases = [
        (
            [{"type": "fix_srt"}, {"type": "generate_srt"}],
            "stages[0]: fix_srt takes .srt, but the input file 'jfk.flac' is audio or video - at `$.stages[0].type`",
        ),
        (
            [{"type": "generate_srt"}, {"type": "convert"}],
            "stages[1]: convert takes audio or video, but stages[0] (generate_srt) gives .srt - at `$.stages[1].type`",
        ),
        (
            [{"type": "transcribe"}, {"type": "fix_srt"}],
            "stages[1]: fix_srt takes .srt, but stages[0] (transcribe) gives .json - at `$.stages[1].type`",
        ),
        (
            [{"type": "detect_language"}, {"type": "generate_srt"}],
            "stages[0]: detect_language gives no output a next stage can take, so it can only be the last"
            " stage - at `$.stages[0].type`",
        ),
        (
            [{"type": "generate_srt"}, {"type": "fix_srt", "params": {"chunk_size": 0}}],
            "Expected `int` >= 1 - at `$.stages[1].params.chunk_size`",
        ),
        ([{"type": "nope"}], "stages[0]: unknown operation 'nope'"),
    ]
    for stages, detail in cases:
        response = await client.post("/api/v1/pipelines", json={"file_id": media["id"], "stages": stages})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(detail), response.json()
    response = await client.post("/api/v1/pipelines", json={"file_id": media["id"], "stages": []})
    assert response.status_code == 400, response.text
    assert response.json()["extra"] == [
        {"message": "Expected `array` of length >= 1", "key": "stages", "source": "body"}
    ]
    missing = await client.post("/api/v1/pipelines", json={"file_id": "nope", "stages": SUBTITLES_THEN_FIX})
    assert missing.status_code == 404, missing.text
    assert "nope" in missing.json()["detail"]
    listed = await client.get("/api/v1/jobs", params={"include_children": True})
    assert listed.json()["total"] == 0  # nothing was recorded


async def test_cancelling_a_queued_pipeline_cancels_every_stage(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    media = await jfk(client)  # no gpu worker: the first stage waits in its queue
    pipeline = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
    first, second = await until_children(client, pipeline["id"], "pending", "scheduled")
    # The waiting stage is in no pool's queue: nothing a worker could take, no slot held.
    assert await pool_submissions_of(nats_server, "gpu", first["id"]) == 1
    assert await pool_submissions_of(nats_server, "llm", second["id"]) == 0
    assert second["queue_position"] is None
    ready = (await client.get("/ready")).json()
    assert ready["tasks"]["pipelines"]["state"] == "running"  # the stage starter, supervised
    response = await client.post(f"/api/v1/jobs/{pipeline['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    stages = await until_children(client, pipeline["id"], "cancelled", "cancelled")
    assert [s["attempt"] for s in stages] == [1, 1]
    assert stages[1]["file_id"] is None  # the second stage never got an input
    again = await client.post(f"/api/v1/jobs/{pipeline['id']}/cancel")
    assert again.status_code == 409, again.text


@asynccontextmanager
async def first_stage_running(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> AsyncIterator[tuple[dict[str, Any], FakeLLM]]:
    """A pipeline of two fix_srt stages whose first runs, slowly: 40 chunks of 0.2 s each."""
    source = await upload(client, "talk.srt", lowercase_srt(40).encode())
    with FakeLLM(delay=0.2) as fake:
        async with running(llm_settings(nats_server, fake)):
            stages = [{"type": "fix_srt", "params": {"chunk_size": 1}}, {"type": "fix_srt"}]
            pipeline = await submit_pipeline(client, source["id"], stages)
            await until_children(client, pipeline["id"], "running", "scheduled")
            yield pipeline, fake


async def test_cancelling_a_running_pipeline_stops_its_stage_and_ends_the_next(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    async with first_stage_running(client, nats_server) as (pipeline, fake):
        response = await client.post(f"/api/v1/jobs/{pipeline['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        first, second = await until_children(client, pipeline["id"], "cancelled", "cancelled")
    assert first["worker"] is not None  # its worker stopped it
    assert len(fake.requests) < 40  # between chunks, long before the last
    assert second["file_id"] is None
    assert await pool_submissions_of(nats_server, "llm", second["id"]) == 0
    done = (await client.get(f"/api/v1/jobs/{pipeline['id']}")).json()
    assert (done["status"], done["result"]["counts"]) == ("cancelled", {"cancelled": 2})


async def test_a_failed_stage_keeps_the_outputs_before_and_retry_reruns_from_it(
    client: httpx.AsyncClient, nats_server: NatsServer, gpu: WorkerRunner
) -> None:
    media = await jfk(client)
    with FakeLLM(fail_first=[400]) as fake:  # the first request is refused for good, later ones answered
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
            failed = await wait_terminal(client, pipeline["id"], timeout=90)
            assert failed["status"] == "failed", failed
            assert failed["error"].startswith("stage 2 of 2 (fix_srt) failed: "), failed["error"]
            assert "400" in failed["error"]
            first, second = await children(client, pipeline["id"])
            assert (first["status"], second["status"]) == ("completed", "failed")
            kept = output_ids(first)
            assert [[o["file_id"] for o in s["outputs"]] for s in failed["result"]["stages"]] == [kept, []]

            srt = await download(client, kept[0])
            assert srt.text.startswith("1\n00:00:00")  # stage 1's subtitles are still there

            alone = await client.post(f"/api/v1/jobs/{second['id']}/retry")
            assert alone.status_code == 409, alone.text
            assert f"a stage of pipeline {pipeline['id']}: retry the pipeline" in alone.json()["detail"]
            response = await client.post(f"/api/v1/jobs/{pipeline['id']}/retry")
            assert response.status_code == 200, response.text
            assert response.json()["status"] in ("pending", "running")
            done = await wait_terminal(client, pipeline["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["attempt"] == 2
    first, second = await children(client, pipeline["id"])
    assert (first["status"], first["attempt"], output_ids(first)) == ("completed", 1, kept)  # not rerun
    assert (second["status"], second["attempt"]) == ("completed", 2)
    assert second["file_id"] == kept[0]
    assert len(fake.requests) == 2  # one refused, one on retry
    assert [[o["file_id"] for o in s["outputs"]] for s in done["result"]["stages"]] == [
        kept,
        output_ids(second),
    ]


async def test_a_pipeline_that_fails_ends_its_waiting_stages_and_retries_them_all(
    api: ApiServer, client: httpx.AsyncClient, nats_server: NatsServer, settings: Settings
) -> None:
    source = await upload(client, "talk.srt", lowercase_srt(3).encode())
    with FakeLLM(fail_first=[400]) as fake:
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, source["id"], [{"type": "fix_srt"}] * 3)
            failed = await wait_terminal(client, pipeline["id"])
            assert failed["status"] == "failed", failed
            # The stages after the failed one can never run now: they end too, so nothing stays active.
            stages = await until_children(client, pipeline["id"], "failed", "cancelled", "cancelled")
            reason = "the pipeline failed: stage 1 of 3 (fix_srt) failed: "
            assert all(s["error"].startswith(reason) for s in stages[1:]), stages
            response = await client.post(f"/api/v1/jobs/{pipeline['id']}/retry")
            assert response.status_code == 200, response.text
            done = await wait_terminal(client, pipeline["id"])
    assert done["status"] == "completed", done
    stages = await children(client, pipeline["id"])
    assert [(s["status"], s["attempt"]) for s in stages] == [("completed", 2)] * 3
    assert [s["file_name"] for s in stages] == ["talk.srt", "talk.fixed.srt", "talk.fixed.fixed.srt"]
    assert len(fake.requests) == 4
    submissions = [await pool_submissions_of(nats_server, "llm", s["id"]) for s in stages]
    assert submissions == [2, 1, 1]  # the later stages reached their pool only when their turn came

    # The same rows from the stream alone: the derived stage ends and the rerun included.
    before = [done, *stages]
    await api.stop()
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    await until_children(client, pipeline["id"], "completed", "completed", "completed")
    after = [(await client.get(f"/api/v1/jobs/{job['id']}")).json() for job in before]
    assert after == before
    assert [await pool_submissions_of(nats_server, "llm", s["id"]) for s in stages] == submissions

    deleted = await client.delete(f"/api/v1/jobs/{pipeline['id']}")
    assert deleted.status_code == 204, deleted.text
    for job in (pipeline, *stages):
        assert (await client.get(f"/api/v1/jobs/{job['id']}")).status_code == 404


async def test_a_pipeline_survives_an_api_restart_between_stages(
    api: ApiServer, client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    media = await jfk(client)
    pipeline = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
    first, _ = await until_children(client, pipeline["id"], "pending", "scheduled")
    # The API goes away before the first stage ends: no process is left that saw it end, so the
    # next stage can only be started from the stream by the API that comes back.
    await api.stop()
    async with running(gpu_settings(nats_server)):
        nc = await connect(nats_server.url, name="test")
        try:
            async with asyncio.timeout(90):
                while await last_kind(nc.jetstream(), first["id"]) != "completed":  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()
    await api.start()
    stages = await until_children(client, pipeline["id"], "completed", "pending", timeout=30)
    assert stages[1]["file_id"] == output_ids(stages[0])[0]
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            done = await wait_terminal(client, pipeline["id"], timeout=60)
    assert done["status"] == "completed", done
    assert [s["status"] for s in done["result"]["stages"]] == ["completed", "completed"]
    assert await pool_submissions_of(nats_server, "llm", stages[1]["id"]) == 1


async def test_two_api_instances_start_each_stage_once_and_both_follow_it_live(
    client: httpx.AsyncClient, settings: Settings, nats_server: NatsServer, gpu: WorkerRunner, tmp_path: Path
) -> None:
    # Both instances' projections see every stage end, and both publish the next stage's
    # submission: JetStream keeps one (same message id), so each stage runs once.
    other = ApiServer(replace(settings, data_dir=tmp_path / "other"))
    await other.start()
    try:
        media = await jfk(client)
        with FakeLLM() as fake:
            async with (
                running(llm_settings(nats_server, fake)),
                httpx.AsyncClient(base_url=other.url) as there,
            ):
                pipeline = await submit_pipeline(client, media["id"], SUBTITLES_THEN_FIX)
                async with asyncio.timeout(10):
                    while (await there.get(f"/api/v1/jobs/{pipeline['id']}")).status_code == 404:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                followed = asyncio.create_task(ws_collect(ws_url(other, f"/api/v1/jobs/{pipeline['id']}/ws")))
                done = await wait_terminal(client, pipeline["id"], timeout=60)
                messages, code = await asyncio.wait_for(followed, 30)
                seen_there = (await there.get(f"/api/v1/jobs/{pipeline['id']}")).json()
        assert done["status"] == "completed", done
        assert (messages[-1]["kind"], messages[-1]["job_id"], code) == ("completed", pipeline["id"], 1000)
        assert (seen_there["status"], seen_there["result"]) == ("completed", done["result"])
        for stage, pool in zip(await children(client, pipeline["id"]), ("gpu", "llm"), strict=True):
            assert stage["attempt"] == 1
            assert await pool_submissions_of(nats_server, pool, stage["id"]) == 1
        assert len(fake.requests) == 1
    finally:
        await other.stop()


async def last_kind(js: JetStreamContext, job_id: str) -> str:
    """The kind of the job's latest event in the stream."""
    last = await js.get_last_msg(STREAM, events_subject(job_id))
    return (last.headers or {}).get(KIND_HEADER, "")


class CutShort:
    """The API's publisher refusing every stage record (a waiting stage's submission) but the first
    `keep` of each pipeline, as a crash or a lost NATS between two publishes leaves them; `armed`
    False lets everything through again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, keep: int = 0) -> None:
        self.armed = True
        self.refused = 0
        real = Publisher.publish

        async def publish(
            publisher: Publisher, event: Event, msg_id: str | None = None, fresh: bool = False
        ) -> Any:
            kept = {stage_id(event.parent_id, index) for index in range(keep)} if event.parent_id else set()
            if self.armed and isinstance(event, Submitted) and event.waiting and event.job_id not in kept:
                self.refused += 1
                raise queue_unavailable(TimeoutError())
            return await real(publisher, event, msg_id, fresh)

        monkeypatch.setattr(Publisher, "publish", publish)


async def only_pipeline(client: httpx.AsyncClient) -> dict[str, Any]:
    """The one pipeline the API lists, once its projection has it."""
    async with asyncio.timeout(10):
        while not (listed := (await client.get("/api/v1/jobs")).json())["items"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert [job["type"] for job in listed["items"]] == ["pipeline"], listed
    found: dict[str, Any] = listed["items"][0]
    return found


@pytest.mark.parametrize("keep", [0, 1])
async def test_a_submit_cut_short_after_the_parent_runs_every_stage_once_the_api_is_back(
    api: ApiServer,
    client: httpx.AsyncClient,
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
    keep: int,
) -> None:
    source = await upload(client, "talk.srt", lowercase_srt(3).encode())
    cut = CutShort(monkeypatch, keep)
    response = await client.post(
        "/api/v1/pipelines", json={"file_id": source["id"], "stages": [{"type": "fix_srt"}] * 3}
    )
    assert response.status_code == 503, response.text
    assert "the job queue is unavailable" in response.json()["detail"]
    pipeline = await only_pipeline(client)  # the parent was recorded, with its stages' list
    assert len(pipeline["params"]["stages"]) == 3
    async with asyncio.timeout(10):
        while len(await children(client, pipeline["id"])) != keep:  # noqa: ASYNC110 - the ones published
            await asyncio.sleep(0.05)
    # The API goes away with the rest unpublished; the one that comes back finds the pipeline.
    await api.stop()
    cut.armed = False
    await api.start()
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            done = await wait_terminal(client, pipeline["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["current_step"] == "3 of 3 stages done"
    stages = await children(client, pipeline["id"])
    assert [s["id"] for s in stages] == [stage_id(pipeline["id"], index) for index in range(3)]
    assert [(s["status"], s["attempt"]) for s in stages] == [("completed", 1)] * 3
    assert [s["file_name"] for s in stages] == ["talk.srt", "talk.fixed.srt", "talk.fixed.fixed.srt"]
    assert len(fake.requests) == 3
    assert [await pool_submissions_of(nats_server, "llm", s["id"]) for s in stages] == [1, 1, 1]


async def test_a_retry_cut_short_after_the_parent_reruns_its_stages_once_the_api_is_back(
    api: ApiServer, client: httpx.AsyncClient, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await upload(client, "talk.srt", lowercase_srt(3).encode())
    with FakeLLM(fail_first=[400]) as fake:
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, source["id"], [{"type": "fix_srt"}] * 2)
            assert (await wait_terminal(client, pipeline["id"]))["status"] == "failed"
            cut = CutShort(monkeypatch)
            response = await client.post(f"/api/v1/jobs/{pipeline['id']}/retry")
            assert response.status_code == 503, response.text
            # The parent was resubmitted, its stages not: they still show how the last run ended.
            async with asyncio.timeout(10):
                while (await client.get(f"/api/v1/jobs/{pipeline['id']}")).json()["attempt"] != 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            again = (await client.get(f"/api/v1/jobs/{pipeline['id']}")).json()
            assert again["status"] == "pending", again
            assert [s["status"] for s in await children(client, pipeline["id"])] == ["failed", "cancelled"]
            await api.stop()
            cut.armed = False
            await api.start()
            done = await wait_terminal(client, pipeline["id"], timeout=60)
    assert cut.refused >= 1
    assert (done["status"], done["attempt"]) == ("completed", 2), done
    stages = await children(client, pipeline["id"])
    assert [(s["status"], s["attempt"]) for s in stages] == [("completed", 2)] * 2
    assert len(fake.requests) == 3


async def test_a_stage_cannot_be_deleted_alone_but_goes_with_its_pipeline(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    source = await upload(client, "talk.srt", lowercase_srt(3).encode())
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            pipeline = await submit_pipeline(client, source["id"], [{"type": "fix_srt"}] * 2)
            assert (await wait_terminal(client, pipeline["id"]))["status"] == "completed"
    first, second = await children(client, pipeline["id"])
    for stage in (first, second):
        response = await client.delete(f"/api/v1/jobs/{stage['id']}")
        assert response.status_code == 409, response.text
        assert response.json()["detail"] == (
            f"job {stage['id']} is a stage of pipeline {pipeline['id']}: delete the pipeline"
            f" (DELETE /api/v1/jobs/{pipeline['id']}), which deletes its stages with it"
        )
    assert [s["id"] for s in await children(client, pipeline["id"])] == [first["id"], second["id"]]
    deleted = await client.delete(f"/api/v1/jobs/{pipeline['id']}")
    assert deleted.status_code == 204, deleted.text
    for job in (pipeline, first, second):
        assert (await client.get(f"/api/v1/jobs/{job['id']}")).status_code == 404


async def test_force_completing_a_pipeline_stops_its_running_stage(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    async with first_stage_running(client, nats_server) as (pipeline, fake):
        forced = await client.post(
            f"/api/v1/jobs/admin/{pipeline['id']}/force-complete", json={"result": {"by": "admin"}}
        )
        assert forced.status_code == 200, forced.text
        assert forced.json()["status"] == "completed", forced.json()
        first, _ = await until_children(client, pipeline["id"], "cancelled", "cancelled", timeout=20)
    assert first["worker"] is not None  # its worker stopped it
    assert len(fake.requests) < 40  # between chunks, long before the last
    assert "force-completed by an admin" in (first["error"] or "")
    done = (await client.get(f"/api/v1/jobs/{pipeline['id']}")).json()
    assert (done["status"], done["result"]["counts"]) == ("completed", {"cancelled": 2})


@pytest.mark.slow  # about 1 s, but the llm worker's stop right after a job can take 4 s more
async def test_a_long_poll_returns_as_the_pipeline_moves(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    source = await upload(client, "talk.srt", lowercase_srt(3).encode())
    pipeline = await submit_pipeline(client, source["id"], [{"type": "fix_srt"}] * 2)  # no worker yet
    url = f"/api/v1/jobs/{pipeline['id']}/poll"
    polled = asyncio.create_task(client.get(url, params={"current_status": "pending", "timeout": 20}))
    await asyncio.sleep(0.3)
    assert not polled.done()  # nothing moved: it waits
    with FakeLLM(delay=0.3) as fake:
        async with running(llm_settings(nats_server, fake)):
            moved = await asyncio.wait_for(polled, 20)
            assert moved.status_code == 200, moved.text
            assert (moved.json()["id"], moved.json()["status"]) == (pipeline["id"], "running")
            assert moved.json()["current_step"].startswith("stage ")
            ended = await client.get(url, params={"current_status": "running", "timeout": 20})
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "completed", ended.json()
    assert [s["status"] for s in ended.json()["result"]["stages"]] == ["completed", "completed"]
    assert len(fake.requests) == 2
