"""The operator's LLM key goes only to the operator's endpoints: checked by the API (422) and again
by the worker, for jobs that bypass the API too; the key is in no event, error, result or log."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import httpx
import nats
import pytest

from app import Settings
from streams import JOB_HEADER, KIND_HEADER, NatsServer, Pool, Submitted, encode_event, submit_subject
from tests.conftest import ApiServer, replace, submit, wait_terminal
from tests.llm_server import FakeLLM
from tests.test_media_ops import events, lowercase_srt, pool_settings, running, upload

KEY = "sk-operator-secret-0123456789"


def operator_worker(nats_server: NatsServer, operator: FakeLLM, **kwargs: Any) -> Any:
    """An llm worker whose configured endpoint is `operator`, with the operator's key."""
    return pool_settings(
        nats_server, "llm", llm_base_url=operator.base_url, llm_api_key=KEY, llm_model="test",
        **kwargs,
    )  # fmt: skip


async def srt_file(client: httpx.AsyncClient) -> str:
    """An uploaded SRT's file id."""
    info = await upload(client, "talk.srt", lowercase_srt(3).encode())
    file_id: str = info["id"]
    return file_id


async def assert_key_nowhere(client: httpx.AsyncClient, job: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Neither the job, its result, error and events, nor any log line holds the key."""
    history = [envelope async for _, envelope in events(client, job["id"])]
    assert history, "the job has events"
    assert KEY not in json.dumps(job)
    assert KEY not in json.dumps(history)
    assert KEY not in caplog.text


@pytest.mark.slow
async def test_unlisted_base_url_is_422_and_nothing_reaches_it(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    file_id = await srt_file(client)
    with FakeLLM(api_key=KEY) as operator, FakeLLM() as recorder:
        async with running(operator_worker(nats_server, operator)):
            single = await client.post(
                "/api/v1/jobs", json={"type": "fix_srt", "file_id": file_id, "params": {"base_url": recorder.base_url}}
            )  # fmt: skip
            shared = await client.post(
                "/api/v1/jobs/batch",
                json={"type": "fix_srt", "file_ids": [file_id], "params": {"base_url": recorder.base_url}},
            )
            per_item = await client.post(
                "/api/v1/jobs/batch",
                json={"type": "fix_srt", "items": [{"file_id": file_id}, {"file_id": file_id, "params": {"base_url": recorder.base_url + "/"}}]},
            )  # fmt: skip
            for response, where in (
                (single, "$.params"),
                (shared, "$.params"),
                (per_item, "$.items[1].params"),
            ):
                assert response.status_code == 422, response.text
                body = response.json()
                assert body["status_code"] == 422
                assert "is not an LLM endpoint this server allows" in body["detail"]
                assert body["detail"].endswith(f"- at `{where}.base_url`")
            # A job without base_url still runs, on the configured endpoint, after everything above.
            fine = await submit(client, type="fix_srt", file_id=file_id)
            done = await wait_terminal(client, fine["id"])
        assert done["status"] == "completed", done["error"]
        assert recorder.requests == []
        assert operator.requests
        assert {r.authorization for r in operator.requests} == {f"Bearer {KEY}"}
    listed = await client.get("/api/v1/jobs", params={"include_children": True})
    assert [job["id"] for job in listed.json()["items"]] == [fine["id"]]


@pytest.mark.slow
async def test_listed_base_url_is_called_with_the_key(settings: Settings, nats_server: NatsServer) -> None:
    with FakeLLM(api_key=KEY) as operator, FakeLLM(api_key=KEY) as other:
        api = ApiServer(replace(settings, llm_allowed_base_urls=(other.base_url,)))
        await api.start()
        worker = operator_worker(nats_server, operator, llm_allowed_base_urls=(other.base_url,), llm_allow_loopback=True)  # fmt: skip
        try:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client, running(worker):
                file_id = await srt_file(client)
                # Compared normalized: a trailing slash and an explicit default port name the same URL.
                job = await submit(
                    client, type="fix_srt", file_id=file_id, params={"base_url": other.base_url + "/"}
                )
                done = await wait_terminal(client, job["id"])
        finally:
            await api.stop()
    assert done["status"] == "completed", done["error"]
    assert done["result"]["cues"] == 3
    assert operator.requests == []
    assert [r.authorization for r in other.requests] == [f"Bearer {KEY}"]


async def publish_job(nats_url: str, file_id: str, params: dict[str, Any]) -> str:
    """A fix_srt job published straight to NATS, as anyone who reaches the NATS port can."""
    job_id = str(uuid.uuid4())
    event = Submitted(
        job_id=job_id, type="fix_srt", pool=Pool.LLM, owner="local", params=params, file_id=file_id
    )
    headers = {KIND_HEADER: event.kind, JOB_HEADER: job_id, "Nats-Msg-Id": f"{job_id}:1"}
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            submit_subject(Pool.LLM, 0, job_id), encode_event(event), headers=headers
        )
    finally:
        await nc.close()
    return job_id


async def visible(client: httpx.AsyncClient, job_id: str) -> None:
    """Once the API's projection has applied a job published behind its back."""
    async with asyncio.timeout(30):
        while (await client.get(f"/api/v1/jobs/{job_id}")).status_code == 404:  # noqa: ASYNC110 - over HTTP
            await asyncio.sleep(0.05)


async def test_job_published_straight_to_nats_fails_without_sending_the_key(
    client: httpx.AsyncClient, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    file_id = await srt_file(client)
    with FakeLLM(api_key=KEY) as operator, FakeLLM() as recorder:
        async with running(operator_worker(nats_server, operator)):
            job_id = await publish_job(nats_server.url, file_id, {"base_url": recorder.base_url})
            await visible(client, job_id)
            done = await wait_terminal(client, job_id)
            # A retry goes through the API's check (the allowlist may have changed meanwhile).
            retry = await client.post(f"/api/v1/jobs/{job_id}/retry")
        assert recorder.requests == []
        assert operator.requests == []
    assert done["status"] == "failed"
    assert (done["attempt"], done["exhausted"]) == (1, False)  # permanent: not retried
    assert f"base_url {recorder.base_url!r} is not an LLM endpoint this worker allows" in done["error"]
    assert (retry.status_code, retry.json()["status_code"]) == (422, 422)
    assert retry.json()["detail"].endswith("- at `$.params.base_url`")
    await assert_key_nowhere(client, done, caplog)


@pytest.mark.slow
async def test_listed_base_url_on_loopback_fails_the_job_without_the_key(
    settings: Settings, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeLLM(api_key=KEY) as operator, FakeLLM() as recorder:
        api = ApiServer(replace(settings, llm_allowed_base_urls=(recorder.base_url,)))
        await api.start()
        worker = operator_worker(nats_server, operator, llm_allowed_base_urls=(recorder.base_url,))
        try:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client, running(worker):
                file_id = await srt_file(client)
                job = await submit(
                    client, type="fix_srt", file_id=file_id, params={"base_url": recorder.base_url}
                )
                done = await wait_terminal(client, job["id"])
                assert done["status"] == "failed"
                assert done["attempt"] == 1
                assert "refused: 127.0.0.1 resolves to the non-public address 127.0.0.1" in done["error"]
                await assert_key_nowhere(client, done, caplog)
        finally:
            await api.stop()
        assert recorder.requests == []
        assert operator.requests == []
