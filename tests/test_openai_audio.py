"""POST /v1/audio/transcriptions through the official `openai` client, with a real gpu-pool worker."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import faster_whisper
import httpx
import msgspec
import numpy as np
import openai
import pytest
from nats.js.errors import NotFoundError

from app import Settings
from streams import ApiKeyRecord, NatsServer, close_quietly, files_store, key_hash, keys_bucket
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


async def stored(http: httpx.AsyncClient, nats_url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """What is kept: the caller's files (`GET /api/v1/files`), and the objects of the files bucket
    (deleted ones left out), any owner's."""
    response = await http.get("/api/v1/files")
    assert response.status_code == 200, response.text
    nc = await nats_connect(nats_url, "t")
    try:
        bucket = await files_store(nc.jetstream())
        try:
            objects = [info.name for info in await bucket.list(ignore_deletes=True)]
        except NotFoundError:  # nats-py's answer for a bucket holding nothing
            objects = []
    finally:
        await close_quietly(nc)
    return response.json()["items"], objects


async def until_nothing_stored(http: httpx.AsyncClient, nats_url: str, timeout: float = 30) -> None:
    """Wait until nothing is kept: a request whose client went away cleans up after its job ended."""
    async with asyncio.timeout(timeout):
        while True:
            if await stored(http, nats_url) == ([], []):
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(settings: Settings, key: str) -> AsyncIterator[Caller]:
    """The API with these settings, and a caller with this key."""
    server = ApiServer(settings)
    await server.start()
    who = Caller(server, key)
    try:
        yield who
    finally:
        await who.openai.close()
        await who.http.aclose()
        await server.stop()


@pytest.fixture
async def caller(nats_server: NatsServer, settings: Settings) -> AsyncIterator[Caller]:
    async with serving(settings, await put_key(nats_server.url, "alice")) as who:
        yield who


@pytest.mark.slow
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
    for job in jobs:  # the record stays, its upload and outputs are gone
        assert job["status"] == "completed"
        assert job["owner"] == "alice"
        assert job["params"]["model"] == "tiny.en"
        assert job["file_name"] == "jfk.flac"
        outputs = [output["file_id"] for output in job["result"]["outputs"]]
        assert len(outputs) >= 2
        for file_id in [job["file_id"], *outputs]:
            assert (await caller.http.get(f"/api/v1/files/{file_id}")).status_code == 404
    assert await stored(caller.http, caller.api.settings.nats_url) == ([], [])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
async def test_other_model_names_are_passed_through(caller: Caller, gpu: WorkerRunner) -> None:
    with JFK.open("rb") as audio:
        answer = await caller.openai.audio.transcriptions.create(model="tiny.en", file=audio)
    assert QUOTE in answer.text.lower()
    with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as failed:
        await caller.openai.audio.transcriptions.create(model="/no/such/model", file=audio)
    assert failed.value.status_code == 400
    assert failed.value.message  # the worker's reason
    assert await stored(caller.http, caller.api.settings.nats_url) == ([], [])  # a failed job's too
    with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as failed:
        await caller.openai.audio.transcriptions.create(model="tiny.en", file=audio, language="fr")
    assert "tiny.en knows English alone, so it cannot transcribe french (fr)" in failed.value.message
    assert "name a multilingual model" in failed.value.message
    assert len(await caller.jobs("transcribe")) == 2  # refused before any job


async def test_whisper_1_means_the_configured_model(
    nats_server: NatsServer, settings: Settings, gpu: WorkerRunner
) -> None:
    key = await put_key(nats_server.url, "alice")
    # faster-whisper refuses a name it does not know before it looks anything up: no download
    async with serving(replace(settings, asr_model="no-such-model"), key) as who:
        with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as failed:
            await who.openai.audio.transcriptions.create(model="whisper-1", file=audio, language="fr")
        assert "Invalid model size 'no-such-model'" in failed.value.message
        (job,) = await who.jobs("transcribe")
        assert job["status"] == "failed"
        assert job["params"]["model"] == "no-such-model"
        assert job["params"]["language"] == "fr"  # a multilingual name: French is not refused
    async with serving(replace(settings, asr_model="Systran/faster-whisper-small.en"), key) as who:
        with JFK.open("rb") as audio, pytest.raises(openai.BadRequestError) as failed:
            await who.openai.audio.transcriptions.create(model="whisper-1", file=audio, language="de")
        assert "Systran/faster-whisper-small.en knows English alone" in failed.value.message
        assert "JOBCAST_ASR_MODEL (what whisper-1 means)" in failed.value.message
        assert len(await who.jobs("transcribe")) == 1  # refused before any job
        assert await stored(who.http, settings.nats_url) == ([], [])


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
    assert await stored(caller.http, caller.api.settings.nats_url) == ([], [])


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
        ("language", "fr"),  # tiny.en knows English alone
        ("prompt", "x" * 4001),  # refused by the job's params, once the upload is stored
    ]:
        response = await caller.http.post("/v1/audio/transcriptions", data={field: value}, files=audio)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    assert await caller.jobs("transcribe") == []  # nothing was submitted
    assert await stored(caller.http, caller.api.settings.nats_url) == ([], [])  # nor kept

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
    await until_nothing_stored(caller.http, caller.api.settings.nats_url)


def long_speech(path: Path, times: int, rate: int = 8000) -> Path:
    """speech60.mp3 `times` over in one mono WAV (8 kHz: half the bytes whisper's 16 kHz takes)."""
    samples = np.tile(faster_whisper.decode_audio(str(SPEECH60), sampling_rate=rate), times)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


@pytest.mark.slow
async def test_client_timeout_cancels_a_running_job(
    caller: Caller, gpu: WorkerRunner, tmp_path: Path
) -> None:
    # 20 minutes of speech (19 MB) outlast a 1 s timeout on any machine, a GPU's too (60 s did
    # not on a fast one); no retry, whose second try would find the model warm.
    quick = caller.openai.with_options(timeout=1.0, max_retries=0)
    with (
        long_speech(tmp_path / "speech20m.wav", 20).open("rb") as audio,
        pytest.raises(openai.APITimeoutError),
    ):
        await quick.audio.transcriptions.create(model="whisper-1", file=audio)
    job = await caller.first_job("transcribe")
    done = await wait_terminal(caller.http, job["id"])
    assert done["status"] == "cancelled", done
    await until_nothing_stored(caller.http, caller.api.settings.nats_url)


@pytest.mark.slow
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
