"""The `jobcast` client commands against a real server and worker, run as subprocesses."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobcast.client import quality_text
from streams import NatsServer
from tests.conftest import MEDIA, ApiServer, WorkerRunner, submit, wait_terminal
from tests.llm_server import FakeLLM
from tests.test_admin import wait_for
from tests.test_media_ops import llm_settings, running
from tests.test_security import put_key

pytestmark = pytest.mark.slow


async def jobcast(*args: str, server: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `jobcast ARGS --server URL`; returns exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobcast", *args, "--server", server,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_watch_and_download(api: ApiServer, gpu: WorkerRunner, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = await jobcast(
        "submit", str(MEDIA / "jfk.flac"), "--op", "transcribe", "--param", "beam_size=1", "--watch",
        "--out", str(out), server=api.url,
    )  # fmt: skip
    assert code == 0, stderr
    job_id = stdout.strip()
    assert len(job_id) == 36
    assert sorted(p.name for p in out.iterdir()) == ["jfk.json", "jfk.txt"]
    assert "ask not what your country can do for you" in (out / "jfk.txt").read_text().lower()
    assert "saved" in stderr

    code, stdout, _ = await jobcast("jobs", "--status", "completed", server=api.url)
    assert code == 0
    assert job_id in stdout
    assert "Showing 1 of 1" in stdout


async def test_batch_of_two_files(api: ApiServer, gpu: WorkerRunner, tmp_path: Path) -> None:
    second = tmp_path / "again.flac"
    second.write_bytes((MEDIA / "jfk.flac").read_bytes())
    code, stdout, stderr = await jobcast(
        "submit", str(MEDIA / "jfk.flac"), str(second), "--op", "transcribe", "--param", "beam_size=1", "--watch",
        server=api.url,
    )  # fmt: skip
    assert code == 0, stderr
    async with httpx.AsyncClient(base_url=api.url) as client:
        parent = (await client.get(f"/api/v1/jobs/{stdout.strip()}")).json()
    assert parent["type"] == "batch_transcribe"
    assert parent["status"] == "completed"


async def test_cancel_retry_rm_and_errors(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 20, "duration_s": 20})
    code, stdout, _ = await jobcast("cancel", job["id"], server=api.url)
    assert code == 0
    assert stdout.startswith(job["id"])
    assert (await wait_terminal(client, job["id"]))["status"] == "cancelled"
    code, stdout, _ = await jobcast("retry", job["id"], server=api.url)
    assert code == 0
    assert "pending" in stdout or "running" in stdout
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    await wait_terminal(client, job["id"])

    async def released() -> bool:  # a job its worker still holds cannot be deleted yet
        return (await client.get(f"/api/v1/jobs/{job['id']}")).json()["held_by"] is None

    await wait_for(released)
    code, stdout, _ = await jobcast("rm", job["id"], server=api.url)
    assert code == 0, stdout
    assert stdout.strip() == f"{job['id']} deleted"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).status_code == 404
    code, _, stderr = await jobcast("cancel", "no-such-job", server=api.url)
    assert code == 1
    assert "404: job no-such-job not found" in stderr
    # in local mode any key is served as the local owner; once a key exists, a wrong one is refused
    await put_key(api.settings.nats_url, "alice")

    async def key_seen() -> bool:
        return (await client.get("/api/v1/jobs")).status_code == 401

    await wait_for(key_seen, timeout=5)
    code, _, stderr = await jobcast("jobs", server=api.url, env={"JOBCAST_KEY": "wrong"})
    assert code == 1
    assert "401" in stderr


async def pipeline_by_cli(
    api: ApiServer, nats_server: NatsServer, *args: str
) -> tuple[str, FakeLLM, dict[str, Any], list[dict[str, Any]]]:
    """`jobcast submit jfk.flac ARGS --watch` while an llm worker serves with the stand-in LLM,
    which must succeed; its stderr, the stand-in, and the pipeline and its stages as the API has them."""
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            code, stdout, stderr = await jobcast(
                "submit", str(MEDIA / "jfk.flac"), *args, "--watch", server=api.url
            )
    assert code == 0, stderr
    async with httpx.AsyncClient(base_url=api.url) as client:
        pipeline = (await client.get(f"/api/v1/jobs/{stdout.strip()}")).json()
        stages = (await client.get(f"/api/v1/jobs/{stdout.strip()}/children")).json()
    return stderr, fake, pipeline, stages


async def test_pipeline_with_a_bar_per_stage_downloads_every_output(
    api: ApiServer, nats_server: NatsServer, gpu: WorkerRunner, tmp_path: Path
) -> None:
    out = tmp_path / "subs"
    stderr, fake, pipeline, stages = await pipeline_by_cli(
        api, nats_server, "--op", "generate_srt", "--param", "beam_size=1", "--then", "fix_srt",
        "--param", "chunk_size=20", "--out", str(out),
    )  # fmt: skip
    pipeline_id = pipeline["id"]
    assert (pipeline["type"], pipeline["status"]) == ("pipeline", "completed")
    assert [(s["type"], s["status"], s["params"]) for s in stages] == [
        ("generate_srt", "completed", {**stages[0]["params"], "beam_size": 1}),
        ("fix_srt", "completed", {**stages[1]["params"], "chunk_size": 20}),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["jfk.fixed.srt", "jfk.srt", "jfk.vtt"]
    fixed = (out / "jfk.fixed.srt").read_text()
    assert "-->" in fixed
    assert "country" in fixed.lower()
    assert "ask not" in fake.requests[0].user.lower()  # the second stage got the first's subtitles
    for stage in stages:  # one bar each, titled by its stage, ended by its status
        assert stage["title"] in stderr
    assert stderr.count("completed") >= 2
    quality = stages[0]["result"]["quality"]  # the subtitles' quality gate, said in a line
    found, fixed, left = (quality[part]["count"] for part in ("found", "fixed", "left"))
    assert f"quality gate: {found} found, {fixed} fixed, {left} left" in stderr
    for name in ("jfk.srt", "jfk.vtt", "jfk.fixed.srt"):
        assert f"saved {out / name}" in stderr.replace("\n", "")

    # `jobcast watch` on the pipeline shows its stages the same way, and downloads them all again
    again = tmp_path / "again"
    code, _, stderr = await jobcast("watch", pipeline_id, "--out", str(again), server=api.url)
    assert code == 0, stderr
    assert sorted(p.name for p in again.iterdir()) == ["jfk.fixed.srt", "jfk.srt", "jfk.vtt"]
    assert all(stage["title"] in stderr for stage in stages)


async def test_a_failed_stage_fails_the_command_and_the_stages_after_it_end(
    api: ApiServer, nats_server: NatsServer, gpu: WorkerRunner, tmp_path: Path
) -> None:
    with FakeLLM(fail_first=[400] * 50) as fake:  # a permanent refusal: fix_srt fails at once
        async with running(llm_settings(nats_server, fake)):
            code, stdout, stderr = await jobcast(
                "submit", str(MEDIA / "jfk.flac"), "--op", "generate_srt", "--param", "beam_size=1",
                "--then", "fix_srt", "--then", "fix_srt", "--watch", server=api.url,
            )  # fmt: skip
    assert code == 1, stderr
    async with httpx.AsyncClient(base_url=api.url) as client:
        stages = (await client.get(f"/api/v1/jobs/{stdout.strip()}/children")).json()
    assert [s["status"] for s in stages] == ["completed", "failed", "cancelled"]
    assert "failed:" in stderr


async def test_the_issue_pipeline_subtitles_fixed_and_translated_downloads_every_output(
    api: ApiServer, nats_server: NatsServer, gpu: WorkerRunner, tmp_path: Path
) -> None:
    out = tmp_path / "subs"
    stderr, _, pipeline, stages = await pipeline_by_cli(
        api, nats_server, "--op", "generate_srt", "--then", "fix_srt", "--then", "translate_srt",
        "--param", "languages=de,fr", "--out", str(out),
    )  # fmt: skip
    assert (pipeline["type"], pipeline["status"]) == ("pipeline", "completed")
    assert [(s["type"], s["status"]) for s in stages] == [
        ("generate_srt", "completed"),
        ("fix_srt", "completed"),
        ("translate_srt", "completed"),
    ]
    assert stages[2]["params"]["languages"] == ["de", "fr"]
    assert sorted(p.name for p in out.iterdir()) == [
        "jfk.fixed.de.srt", "jfk.fixed.de.vtt", "jfk.fixed.fr.srt", "jfk.fixed.fr.vtt",
        "jfk.fixed.srt", "jfk.srt", "jfk.vtt",
    ]  # fmt: skip
    for language in ("de", "fr"):
        translated = (out / f"jfk.fixed.{language}.srt").read_text()
        assert "-->" in translated
        assert f"[{language}] " in translated  # the stand-in's translation, of the fixed subtitles
        assert (out / f"jfk.fixed.{language}.vtt").read_text().startswith("WEBVTT")
    assert all(stage["title"] in stderr for stage in stages)  # a bar per stage


def test_the_quality_line_lists_what_the_gate_left() -> None:
    flag = {
        "check": "max_cps",
        "start": 12.25,
        "end": 12.75,
        "text": "x",
        "why": "40.0 characters per second, above 20",
    }
    section = {
        "enabled": True, "found": {"count": 3, "flags": []}, "fixed": {"count": 2, "flags": []},
        "left": {"count": 1, "flags": [flag]},
    }  # fmt: skip
    assert quality_text({"quality": section}).splitlines() == [
        "quality gate: 3 found, 2 fixed, 1 left",
        "  left 12.2-12.8 s max_cps: 40.0 characters per second, above 20",
    ]
    assert quality_text({"quality": {"enabled": False}}) == "quality gate: off"
    assert quality_text({"text": "no gate here"}) == ""
    assert quality_text(None) == ""
