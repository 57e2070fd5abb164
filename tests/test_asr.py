"""whisper-asr-webservice's API (`/asr`, `/detect-language`) through Bazarr's own calls, with a real
gpu-pool worker (tiny.en on the CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app import Settings
from streams import NatsServer
from tests.bazarr import Bazarr, pcm_s16le_16k
from tests.conftest import ApiServer, WorkerRunner, wait_terminal
from tests.test_openai_audio import put_key, stored, until_nothing_stored
from workers import WorkerSettings, subtitles

JFK = Path(__file__).resolve().parents[2] / "shared" / "media" / "jfk.flac"
QUOTE = "ask not what your country can do for you"
PCM_BYTES_PER_S = 16_000 * 2


async def jobs(http: httpx.AsyncClient, job_type: str) -> list[dict[str, Any]]:
    """The caller's jobs of this type, newest first."""
    response = await http.get("/api/v1/jobs", params={"type": job_type})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def first_job(http: httpx.AsyncClient, job_type: str) -> dict[str, Any]:
    """The newest job of this type, once there is one."""
    async with asyncio.timeout(30):
        while True:
            if found := await jobs(http, job_type):
                return found[0]
            await asyncio.sleep(0.02)


async def stored_while_queued(
    http: httpx.AsyncClient,
    worker_settings: WorkerSettings,
    job_type: str,
    call: Coroutine[Any, Any, httpx.Response],
) -> tuple[list[dict[str, Any]], httpx.Response]:
    """Make the call with no worker up and look at the caller's files while its job waits; then
    start a gpu worker and return those files and the answer."""
    request = asyncio.create_task(call)
    gpu = WorkerRunner(replace(worker_settings, pool="gpu", ack_wait_s=5, name="gpu"))
    try:
        await first_job(http, job_type)
        response = await http.get("/api/v1/files")
        assert response.status_code == 200, response.text
        await gpu.start()
        return response.json()["items"], await request
    finally:
        request.cancel()  # nothing, once it has answered
        await gpu.stop()


async def gone(http: httpx.AsyncClient, job: dict[str, Any]) -> list[int]:
    """The statuses of `GET /api/v1/files/ID` for the job's input and outputs."""
    outputs = [str(output["file_id"]) for output in (job["result"] or {}).get("outputs", [])]
    return [
        (await http.get(f"/api/v1/files/{file_id}")).status_code for file_id in [job["file_id"], *outputs]
    ]


@pytest.fixture
async def http(api: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    """The API in local mode (no key configured, bound to loopback), as Bazarr on the same box sees it."""
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        yield client


@pytest.mark.slow
async def test_bazarr_detects_the_language_and_gets_srt_subtitles(
    api: ApiServer, http: httpx.AsyncClient, gpu: WorkerRunner
) -> None:
    pcm = pcm_s16le_16k(JFK)
    video = "/media/movies/Inaugural Address (1961)/Inaugural Address.mkv"
    bazarr = Bazarr(api.url + "/", pass_video_name=True)
    try:
        detected = await asyncio.to_thread(bazarr.detect_language, pcm, video)
        assert detected.status_code == 200, detected.text
        assert detected.headers["content-type"] == "application/json"
        assert detected.json() == {"detected_language": "english", "language_code": "en", "confidence": 1.0}

        answer = await asyncio.to_thread(bazarr.download_subtitle, pcm, video, "transcribe", "en")
    finally:
        bazarr.session.close()
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["content-disposition"] == 'attachment; filename="audio_file.srt"'  # requests' name
    assert answer.headers["asr-engine"] == "faster_whisper"
    cues = subtitles.validate_srt(answer.content.decode())
    assert len(cues) >= 2
    assert QUOTE in " ".join(line for cue in cues for line in cue.lines).lower()
    assert cues[-1].end <= 11.1

    (srt_job,) = await jobs(http, "generate_srt")
    assert srt_job["status"] == "completed"
    assert answer.headers["x-jobcast-job-id"] == srt_job["id"]
    assert srt_job["params"]["language"] == "en"
    assert srt_job["params"]["task"] == "transcribe"
    assert srt_job["params"]["model"] == "tiny.en"  # JOBCAST_ASR_MODEL's default
    assert (
        srt_job["file_name"] == "Inaugural Address.wav"
    )  # the PCM behind a WAV header, named after the video
    (detect_job,) = await jobs(http, "detect_language")
    assert detect_job["status"] == "completed"
    assert detect_job["result"]["language"] == "en"
    assert detect_job["params"]["model"] == "tiny.en"
    for job in (srt_job, detect_job):  # their records stay; their input and outputs are gone
        assert await gone(http, job) == [404] * (3 if job is srt_job else 1)
    assert await stored(http, api.settings.nats_url) == ([], [])


async def test_an_answer_keeps_the_job_record_and_nothing_stored(
    api: ApiServer, http: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    pcm = pcm_s16le_16k(JFK)
    params = {"output": "srt", "encode": "false", "video_file": "/media/Film (1961)/Film.mkv"}
    call = http.post("/asr", params=params, files={"audio_file": pcm})
    files, answer = await stored_while_queued(http, worker_settings, "generate_srt", call)
    assert [(f["name"], f["size"]) for f in files] == [("Film.wav", 44 + len(pcm))]  # while it ran
    assert answer.status_code == 200, answer.text
    assert (
        QUOTE in " ".join(line for cue in subtitles.validate_srt(answer.text) for line in cue.lines).lower()
    )
    (job,) = await jobs(http, "generate_srt")
    assert job["status"] == "completed"
    assert job["file_name"] == "Film.wav"
    assert {output["name"] for output in job["result"]["outputs"]} == {"Film.srt", "Film.vtt"}
    assert await gone(http, job) == [404, 404, 404]
    assert await stored(http, api.settings.nats_url) == ([], [])


async def test_detect_language_stores_only_the_first_30_s_of_raw_pcm(
    api: ApiServer, http: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    pcm = (
        pcm_s16le_16k(JFK) * 4
    )  # 44 s (1.4 MB, past the JSON body limit), as Bazarr sends a whole film's audio
    call = http.post(
        "/detect-language", params={"encode": "false"}, files={"audio_file": ("audio_file", pcm)}
    )
    files, detected = await stored_while_queued(http, worker_settings, "detect_language", call)
    # no video name passed
    assert [(f["name"], f["size"]) for f in files] == [("audio_file.wav", 44 + 30 * PCM_BYTES_PER_S)]
    assert detected.status_code == 200, detected.text
    assert detected.json()["language_code"] == "en"
    assert await stored(http, api.settings.nats_url) == ([], [])


@pytest.mark.slow
async def test_encoded_audio_in_every_output(http: httpx.AsyncClient, gpu: WorkerRunner) -> None:
    audio = {"audio_file": ("jfk.flac", JFK.read_bytes(), "audio/flac")}
    bodies: dict[str, str] = {}
    prompt = "President Kennedy's inaugural address."
    for output in ("json", "txt", "tsv", "vtt"):
        params = {"output": output, "word_timestamps": "true", "vad_filter": "true", "initial_prompt": prompt}
        response = await http.post("/asr", params=params, files=audio)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/plain; charset=utf-8"  # upstream's, json too
        assert response.headers["content-disposition"] == f'attachment; filename="jfk.flac.{output}"'
        bodies[output] = response.text

    result = msgspec.json.decode(bodies["json"])
    assert set(result) == {"text", "segments", "language"}
    assert result["language"] == "en"
    assert QUOTE in result["text"].lower()
    assert [s["id"] for s in result["segments"]] == list(range(1, len(result["segments"]) + 1))
    for segment in result["segments"]:
        assert 0 <= segment["start"] < segment["end"] <= 11.1
        assert segment["words"]  # word_timestamps=true
    assert QUOTE in "".join(w["word"] for s in result["segments"] for w in s["words"]).lower()  # " word"s

    lines = bodies["txt"].splitlines()
    assert lines == [s["text"].strip() for s in result["segments"]]  # one segment a line, as upstream
    assert QUOTE in " ".join(lines).lower()

    header, *rows = bodies["tsv"].splitlines()
    assert header == "start\tend\ttext"
    assert [row.split("\t") for row in rows] == [
        [str(round(s["start"] * 1000)), str(round(s["end"] * 1000)), s["text"].strip()]
        for s in result["segments"]
    ]

    cues = subtitles.validate_vtt(bodies["vtt"])
    assert QUOTE in " ".join(line for cue in cues for line in cue.lines).lower()
    ran = [*await jobs(http, "transcribe"), *await jobs(http, "generate_srt")]
    assert [job["status"] for job in ran] == ["completed"] * 4
    for job in ran:  # what the caller asked for reached each job
        assert (job["params"]["vad_filter"], job["params"]["initial_prompt"]) == (True, prompt)
        assert job["params"]["word_timestamps"] is True


async def test_an_english_only_model_refuses_translation_and_other_languages(
    http: httpx.AsyncClient,
) -> None:
    audio = {"audio_file": ("jfk.flac", JFK.read_bytes(), "audio/flac")}
    for params, cannot in [
        ({"task": "translate", "language": "de"}, "translate"),
        ({"task": "translate"}, "translate"),
        ({"language": "fr", "output": "srt"}, "transcribe french (fr)"),
    ]:
        response = await http.post("/asr", params=params, files=audio)
        assert response.status_code == 400, (params, response.text)
        detail = response.json()["detail"]
        assert f"the model tiny.en knows English alone, so it cannot {cannot}" in detail
        assert "set JOBCAST_ASR_MODEL to a multilingual model" in detail
    assert await jobs(http, "transcribe") == await jobs(http, "generate_srt") == []  # refused up front
    assert (await http.get("/api/v1/files")).json()["items"] == []


async def test_the_configured_model_runs_every_job(
    settings: Settings, worker_settings: WorkerSettings, gpu: WorkerRunner
) -> None:
    # faster-whisper refuses a name it does not know before it looks anything up: no download
    server = ApiServer(replace(settings, asr_model="no-such-model"))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            pcm = pcm_s16le_16k(JFK)
            bazarr = Bazarr(server.url)
            try:  # a multilingual name: Bazarr's translation is not refused, it reaches the worker
                answer = await asyncio.to_thread(bazarr.download_subtitle, pcm, "film.mkv", "translate", "fr")
                detected = await asyncio.to_thread(bazarr.detect_language, pcm, "film.mkv")
            finally:
                bazarr.session.close()
            for response in (answer, detected):
                assert response.status_code == 400, response.text
                assert "Invalid model size 'no-such-model'" in response.json()["detail"]
            (srt_job,) = await jobs(http, "generate_srt")
            assert srt_job["status"] == "failed"
            assert {k: srt_job["params"][k] for k in ("model", "task", "language")} == {
                "model": "no-such-model", "task": "translate", "language": "fr",
            }  # fmt: skip
            (detect_job,) = await jobs(http, "detect_language")
            assert detect_job["status"] == "failed"
            assert detect_job["params"]["model"] == "no-such-model"
            assert await stored(http, settings.nats_url) == ([], [])  # failed jobs keep nothing either
    finally:
        await server.stop()


async def test_what_jobcast_cannot_do_is_a_clear_400(http: httpx.AsyncClient) -> None:
    audio = {"audio_file": ("jfk.flac", JFK.read_bytes(), "audio/flac")}
    for params, named in [
        ({"output": "docx"}, "output"),
        ({"task": "summarise"}, "task"),
        ({"language": "xx"}, "language"),
        ({"encode": "maybe"}, "encode"),
        ({"diarize": "true"}, "diarize"),
    ]:
        response = await http.post("/asr", params=params, files=audio)
        assert response.status_code == 400, (params, response.text)
        error = response.json()
        assert named in (error["detail"] + str(error.get("extra"))), error
    response = await http.post("/asr", files={"file": ("jfk.flac", JFK.read_bytes(), "audio/flac")})
    assert response.status_code == 400, response.text
    assert "audio_file" in response.json()["detail"]
    response = await http.post("/detect-language", params={"encode": "false"})
    assert response.status_code == 400, response.text
    assert "audio_file" in response.json()["detail"]
    assert await jobs(http, "transcribe") == []  # nothing was submitted, nothing stored
    assert (await http.get("/api/v1/files")).json()["items"] == []
    # refused by the job's params, once the upload is stored: it goes too
    response = await http.post("/asr", params={"initial_prompt": "x" * 4001}, files=audio)
    assert response.status_code == 422, response.text
    assert "initial_prompt" in response.json()["detail"]
    assert await jobs(http, "transcribe") == []
    assert (await http.get("/api/v1/files")).json()["items"] == []


async def test_uploads_past_the_upload_limit_are_refused(settings: Settings) -> None:
    server = ApiServer(replace(settings, max_upload_bytes=2**20))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            big = {"audio_file": pcm_s16le_16k(JFK) * 4}
            for route in ("/asr", "/detect-language"):
                response = await http.post(route, params={"encode": "false"}, files=big)
                assert response.status_code == 413, response.text
                assert "too large" in response.json()["detail"].lower()
            assert (await http.get("/api/v1/files")).json()["items"] == []
    finally:
        await server.stop()


async def test_a_failed_job_answers_its_reason(
    api: ApiServer, http: httpx.AsyncClient, gpu: WorkerRunner
) -> None:
    response = await http.post("/asr", files={"audio_file": ("notes.txt", b"not audio at all\n" * 50)})
    assert response.status_code == 400, response.text
    assert "not a media file" in response.json()["detail"]
    assert await stored(http, api.settings.nats_url) == ([], [])
    response = await http.post("/detect-language", files={"audio_file": ("notes.txt", b"not audio\n" * 50)})
    assert response.status_code == 400, response.text
    assert "not a media file" in response.json()["detail"]
    assert response.headers["x-jobcast-job-id"] == (await jobs(http, "detect_language"))[0]["id"]
    assert await stored(http, api.settings.nats_url) == ([], [])


async def test_a_client_that_goes_away_cancels_its_job(api: ApiServer, http: httpx.AsyncClient) -> None:
    request = asyncio.create_task(
        http.post("/asr", params={"output": "srt"}, files={"audio_file": JFK.read_bytes()})
    )
    try:
        queued = await first_job(http, "generate_srt")  # no worker: it stays queued
    finally:
        request.cancel()  # the client closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    done = await wait_terminal(http, queued["id"])
    assert done["status"] == "cancelled"
    assert "went away" in (done["error"] or "")
    await until_nothing_stored(http, api.settings.nats_url)


async def test_keys_are_the_rest_of_the_apis(nats_server: NatsServer, settings: Settings) -> None:
    key = await put_key(nats_server.url, "bazarr")
    server = ApiServer(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as anon:
            pcm = {"audio_file": pcm_s16le_16k(JFK)}
            refused = await anon.post("/detect-language", params={"encode": "false"}, files=pcm)
            assert refused.status_code == 401, refused.text
            refused = await anon.post("/asr", files=pcm, headers={"Authorization": "Bearer wrong"})
            assert refused.status_code == 401, refused.text
            # a right key reaches the route: its own validation answers
            accepted = await anon.post(
                "/asr", params={"output": "docx"}, files=pcm, headers={"X-API-Key": key}
            )
            assert accepted.status_code == 400, accepted.text
            assert "output" in accepted.text
    finally:
        await server.stop()


async def test_bazarr_sends_its_key_in_the_endpoint_url(
    nats_server: NatsServer, settings: Settings, gpu: WorkerRunner
) -> None:
    key = await put_key(nats_server.url, "bazarr")
    server = ApiServer(settings)
    await server.start()
    host = server.url.removeprefix("http://")
    pcm = pcm_s16le_16k(JFK)
    bazarr, wrong = Bazarr(f"http://bazarr:{key}@{host}"), Bazarr(f"http://bazarr:wrong@{host}")
    try:  # requests sends a URL's user and password as HTTP Basic, Bazarr no header of its own
        detected = await asyncio.to_thread(bazarr.detect_language, pcm, "film.mkv")
        refused = await asyncio.to_thread(wrong.detect_language, pcm, "film.mkv")
        async with httpx.AsyncClient(base_url=server.url, timeout=30, auth=("bazarr", key)) as basic:
            elsewhere = await basic.get("/api/v1/jobs")  # Basic counts on these two routes only
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"X-API-Key": key}) as http:
            (job,) = await jobs(http, "detect_language")
    finally:
        bazarr.session.close()
        wrong.session.close()
        await server.stop()
    assert detected.status_code == 200, detected.text
    assert detected.json()["detected_language"] == "english"
    assert refused.status_code == 401, refused.text
    assert elsewhere.status_code == 401, elsewhere.text
    assert job["owner"] == "bazarr"
