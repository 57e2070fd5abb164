"""POST /v1/audio/transcriptions through the official `openai` client, with a real gpu-pool worker."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from app import Settings
from app._auth import key_hash
from streams import ApiKeyRecord, NatsServer, close_quietly, keys_bucket
from streams import connect as nats_connect
from tests.conftest import ApiServer, WorkerRunner, replace, wait_terminal
from workers import WorkerSettings, subtitles

JFK = Path(__file__).resolve().parents[2] / "shared" / "media" / "jfk.flac"
SPEECH60 = JFK.with_name("speech60.mp3")
QUOTE = "ask not what your country can do for you"


class Caller:
    """The API with one user key, an `openai` client and a plain HTTP client for it."""

    def __init__(self, api: ApiServer, key: str) -> None:
        self.api = api
        self.key = key
        self.openai = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0, timeout=60)
        self.http = httpx.AsyncClient(
            base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )

    async def jobs(self, job_type: str) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/jobs", params={"type": job_type})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def first_job(self, job_type: str, statuses: set[str] | None = None) -> dict[str, Any]:
        """The newest job of this type once there is one (in one of `statuses`, when given)."""
        async with asyncio.timeout(30):
            while True:
                jobs = await self.jobs(job_type)
                if jobs and (statuses is None or jobs[0]["status"] in statuses):
                    return jobs[0]
                await asyncio.sleep(0.02)


async def put_key(nats_url: str, name: str) -> str:
    """Store a fresh user key for `name`, as `jobcast keys create` does; returns it."""
    key = secrets.token_urlsafe(24)
    nc = await nats_connect(nats_url, "t")
    try:
        kv = await keys_bucket(nc.jetstream())
        await kv.put(name, msgspec.json.encode(ApiKeyRecord(name=name, sha256=key_hash(key), admin=False)))
    finally:
        await close_quietly(nc)
    return key


@pytest.fixture
async def caller(nats_server: NatsServer, settings: Settings) -> AsyncIterator[Caller]:
    key = await put_key(nats_server.url, "alice")
    server = ApiServer(settings)
    await server.start()
    who = Caller(server, key)
    try:
        yield who
    finally:
        await who.openai.close()
        await who.http.aclose()
        await server.stop()


async def test_json_and_text(caller: Caller, gpu: WorkerRunner) -> None:
    with JFK.open("rb") as audio:
        answer = await caller.openai.audio.transcriptions.create(model="whisper-1", file=audio)
    assert QUOTE in answer.text.lower()
    with JFK.open("rb") as audio:
        text = await caller.openai.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="text"
        )
    assert isinstance(text, str)
    assert QUOTE in text.lower()
    assert text.strip() == answer.text

    jobs = await caller.jobs("transcribe")
    assert len(jobs) == 2
    for job in jobs:
        assert job["status"] == "completed"
        assert job["owner"] == "alice"
        assert job["params"]["model"] == "tiny.en"
    uploads = (await caller.http.get("/api/v1/files", params={"limit": 500})).json()["items"]
    assert {f["id"] for f in uploads} >= {job["file_id"] for job in jobs}  # the caller's own files


async def test_json_and_text_answer_the_whole_text_when_the_result_cuts_it(
    caller: Caller, worker_settings: WorkerSettings
) -> None:
    short = WorkerRunner(replace(worker_settings, pool="gpu", ack_wait_s=5, name="gpu", inline_text_bytes=30))
    await short.start()
    try:
        with JFK.open("rb") as audio:
            answer = await caller.openai.audio.transcriptions.create(model="whisper-1", file=audio)
        with JFK.open("rb") as audio:
            text = await caller.openai.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format="text"
            )
    finally:
        await short.stop()
    assert QUOTE in answer.text.lower()
    assert text.strip() == answer.text
    for job in await caller.jobs("transcribe"):
        assert job["result"]["text_truncated"] is True
        assert len(job["result"]["text"]) < len(answer.text)
        assert answer.text.startswith(job["result"]["text"])


async def test_srt_and_vtt(caller: Caller, gpu: WorkerRunner) -> None:
    with JFK.open("rb") as audio:
        srt = await caller.openai.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="srt"
        )
    with JFK.open("rb") as audio:
        vtt = await caller.openai.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="vtt"
        )
    assert isinstance(srt, str)
    assert isinstance(vtt, str)
    srt_cues = subtitles.validate_srt(srt)
    vtt_cues = subtitles.validate_vtt(vtt)
    assert len(srt_cues) == len(vtt_cues) >= 2
    assert QUOTE in " ".join(line for cue in srt_cues for line in cue.lines).lower()
    assert srt_cues[-1].end <= 11.1
    assert [job["status"] for job in await caller.jobs("generate_srt")] == ["completed", "completed"]


async def test_verbose_json_with_words_and_segments(caller: Caller, gpu: WorkerRunner) -> None:
    with JFK.open("rb") as audio:
        answer = await caller.openai.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="verbose_json", language="en",
            prompt="President Kennedy's inaugural address.", temperature=0.2,
            timestamp_granularities=["word", "segment"],
        )  # fmt: skip
    assert answer.task == "transcribe"  # type: ignore[attr-defined]
    assert answer.language == "en"
    assert answer.duration == pytest.approx(11.0, abs=0.1)
    assert QUOTE in answer.text.lower()
    assert answer.segments
    assert [s.id for s in answer.segments] == list(range(len(answer.segments)))
    for segment in answer.segments:
        assert 0 <= segment.start < segment.end <= 11.1
        assert segment.text
    assert answer.words
    assert QUOTE in " ".join(w.word for w in answer.words).lower()
    for word in answer.words:
        assert word.word == word.word.strip()
        assert 0 <= word.start <= word.end <= 11.1
    (job,) = await caller.jobs("transcribe")
    assert job["params"]["word_timestamps"] is True
    assert job["params"]["language"] == "en"
    assert job["params"]["initial_prompt"] == "President Kennedy's inaugural address."


async def test_other_model_names_are_passed_through(caller: Caller, gpu: WorkerRunner) -> None:
    with JFK.open("rb") as audio:
        answer = await caller.openai.audio.transcriptions.create(model="tiny.en", file=audio)
    assert QUOTE in answer.text.lower()
    with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as failed:
        await caller.openai.audio.transcriptions.create(model="/no/such/model", file=audio)
    assert failed.value.status_code == 400
    assert failed.value.message  # the worker's reason


async def test_a_text_file_is_a_bad_request(caller: Caller, gpu: WorkerRunner) -> None:
    with pytest.raises(openai.BadRequestError) as failed:
        await caller.openai.audio.transcriptions.create(
            model="whisper-1", file=("notes.txt", b"this is not audio\n" * 50, "text/plain")
        )
    body = failed.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}  # the client unwraps {"error": ...}
    assert body["type"] == "invalid_request_error"
    assert body["message"]
    assert "not a media file" in body["message"].lower() or "text" in body["message"].lower()
    (job,) = await caller.jobs("transcribe")
    assert job["status"] == "failed"


async def test_errors_in_openai_shape(caller: Caller) -> None:
    response = await caller.http.post(
        "/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"x": b""}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "file" in error["message"]
    assert error["param"] == "file"
    assert error["code"] is None

    response = await caller.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert response.status_code == 400, response.text
    assert "file" in response.json()["error"]["message"]

    audio = {"file": ("jfk.flac", JFK.read_bytes(), "audio/flac")}
    for field, value in [
        ("response_format", "docx"),
        ("timestamp_granularities[]", "char"),
        ("language", "EN!"),
    ]:
        response = await caller.http.post("/v1/audio/transcriptions", data={field: value}, files=audio)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    assert await caller.jobs("transcribe") == []  # nothing was submitted

    anon = await caller.http.post(
        "/v1/audio/transcriptions", files=audio, headers={"Authorization": "Bearer wrong"}
    )
    assert anon.status_code == 401


async def _disconnect_cancels(caller: Caller, started: str) -> dict[str, Any]:
    """Send a transcription, give up once the job is `started`, and return the job once it ended."""
    request = asyncio.create_task(
        caller.openai.audio.transcriptions.create(model="whisper-1", file=JFK.read_bytes())
    )
    try:
        job = await caller.first_job("transcribe", {started})
    finally:
        request.cancel()  # the client closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    done = await wait_terminal(caller.http, job["id"])
    return done


async def test_disconnect_cancels_a_queued_job(caller: Caller) -> None:
    done = await _disconnect_cancels(caller, "pending")  # no worker: it stays queued
    assert done["status"] == "cancelled"
    assert "went away" in (done["error"] or "")


async def test_client_timeout_cancels_a_running_job(caller: Caller, gpu: WorkerRunner) -> None:
    quick = caller.openai.with_options(timeout=1.0)
    with SPEECH60.open("rb") as audio, pytest.raises(openai.APITimeoutError):
        await quick.audio.transcriptions.create(model="whisper-1", file=audio)
    job = await caller.first_job("transcribe")
    done = await wait_terminal(caller.http, job["id"])
    assert done["status"] == "cancelled", done


async def test_text_answers_name_their_charset_once(caller: Caller, gpu: WorkerRunner) -> None:
    """`text/plain; charset=utf-8`, not the doubled charset a hand-written media type gave."""
    for response_format in ("text", "srt"):
        response = await caller.http.post(
            "/v1/audio/transcriptions",
            data={"model": "whisper-1", "response_format": response_format},
            files={"file": ("jfk.flac", JFK.read_bytes(), "audio/flac")},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert "ask not what" in response.text.lower()
