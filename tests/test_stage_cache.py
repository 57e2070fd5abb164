"""The stage cache: the same job on the same bytes is answered from NATS, without the model."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from streams import (
    MAX_INLINE_TEXT_BYTES,
    NatsServer,
    Submitted,
    cache_bucket,
    cache_files_store,
    cache_key,
    close_quietly,
    connect,
    decode_entry,
)
from tests.conftest import MEDIA, WorkerRunner, replace, submit, wait_terminal
from workers import WorkerSettings
from workers._cache import Keyed, StageCache
from workers._context import JobContext, Reporter
from workers._registry import CACHE_IDENTITY
from workers.whisper import MODEL_CACHE

JFK = MEDIA / "jfk.flac"
FAST = {"beam_size": 1}
"""Greedy decoding keeps whisper quick on a small CPU."""


async def upload(client: httpx.AsyncClient, name: str) -> str:
    response = await client.post("/api/v1/files", files={"file": (name, JFK.read_bytes(), "audio/flac")})
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id


async def run(client: httpx.AsyncClient, file_id: str, **body: Any) -> dict[str, Any]:
    job = await submit(client, type="generate_srt", file_id=file_id, **body)
    done = await wait_terminal(client, job["id"], timeout=60)
    assert done["status"] == "completed", done["error"]
    return done


def run_time(job: dict[str, Any]) -> float:
    started, ended = datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["completed_at"])
    return (ended - started).total_seconds()


async def contents(client: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, bytes]:
    """Each output's name and bytes, downloaded through the API."""
    found = {}
    for output in job["result"]["outputs"]:
        response = await client.get(output["url"])
        assert response.status_code == 200, response.text
        found[output["name"]] = response.content
    return found


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await connect(nats_server.url, name="test-stage-cache")
    yield nc.jetstream()
    await close_quietly(nc)


async def entries(js: JetStreamContext) -> dict[str, Any]:
    """The cache's manifests by key."""
    kv = await cache_bucket(js)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    return {key: decode_entry((await kv.get(key)).value or b"") for key in keys}


async def copies(js: JetStreamContext) -> set[str]:
    """The names of the output copies in the cache's object store."""
    try:
        return {info.name for info in await (await cache_files_store(js)).list(ignore_deletes=True)}
    except NotFoundError:
        return set()


async def bucket_bytes(js: JetStreamContext) -> int:
    """What the cache's bound counts: the bytes of its KV bucket and object store."""
    manifests, store = await cache_bucket(js), await cache_files_store(js)
    return int((await manifests.status()).stream_info.state.bytes + (await store.status()).size)


def counter(metrics: str, name: str, operation: str) -> float:
    match = re.search(rf'^{name}{{operation="{operation}"}} (\S+)$', metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_the_same_generate_srt_again_is_served_from_the_cache(
    client: httpx.AsyncClient, gpu: WorkerRunner
) -> None:
    first = await run(client, await upload(client, "jfk.flac"), params=FAST)
    assert first["result"]["cached"] is False
    MODEL_CACHE.clear()  # a second run that loaded the model would show in the cache
    loads = MODEL_CACHE.loads
    # The same bytes under another name: the outputs are named after this job's input.
    second = await run(client, await upload(client, "talk.flac"), params=FAST)
    assert second["result"]["cached"] is True
    print(f"generate_srt on jfk.flac: run {run_time(first):.3f} s, from the cache {run_time(second):.3f} s")
    assert run_time(second) < 1.0, run_time(second)
    assert (MODEL_CACHE.loads, len(MODEL_CACHE)) == (loads, 0)
    assert second["progress"] == 100
    same = {k: v for k, v in first["result"].items() if k not in ("outputs", "cached")}
    assert {k: v for k, v in second["result"].items() if k not in ("outputs", "cached")} == same
    first_files, second_files = await contents(client, first), await contents(client, second)
    assert sorted(first_files) == ["jfk.srt", "jfk.vtt"]
    assert second_files == {"talk.srt": first_files["jfk.srt"], "talk.vtt": first_files["jfk.vtt"]}
    # The outputs are the job's own files: new ids, listed as its, kept when the first job and its
    # files are deleted.
    first_ids = {o["file_id"] for o in first["result"]["outputs"]}
    second_ids = {o["file_id"] for o in second["result"]["outputs"]}
    assert not first_ids & second_ids
    listed = (await client.get("/api/v1/files", params={"job_id": second["id"]})).json()
    assert {f["id"] for f in listed["items"]} == second_ids
    assert all(f["job_id"] == second["id"] for f in listed["items"])
    response = await client.delete(f"/api/v1/jobs/{first['id']}", params={"files": "true"})
    assert response.status_code == 204
    assert await contents(client, second) == second_files
    metrics = (await client.get("/metrics")).text
    assert counter(metrics, "jobcast_cache_hits_total", "generate_srt") == 1
    assert counter(metrics, "jobcast_cache_misses_total", "generate_srt") == 1
    # Served again after the first job is gone: the cache keeps copies of its own.
    third = await run(client, await upload(client, "jfk.flac"), params=FAST)
    assert third["result"]["cached"] is True
    assert await contents(client, third) == first_files


async def test_a_different_beam_size_misses(
    client: httpx.AsyncClient, gpu: WorkerRunner, js: JetStreamContext
) -> None:
    file_id = await upload(client, "jfk.flac")
    assert (await run(client, file_id, params=FAST))["result"]["cached"] is False
    assert (await run(client, file_id, params={"beam_size": 2}))["result"]["cached"] is False
    assert len(await entries(js)) == 2
    assert (await run(client, file_id, params={"beam_size": 2}))["result"]["cached"] is True
    metrics = (await client.get("/metrics")).text
    assert counter(metrics, "jobcast_cache_misses_total", "generate_srt") == 2
    assert counter(metrics, "jobcast_cache_hits_total", "generate_srt") == 1


async def test_cache_false_runs_anew_and_stores_nothing(
    client: httpx.AsyncClient, gpu: WorkerRunner, js: JetStreamContext
) -> None:
    file_id = await upload(client, "jfk.flac")
    opted_out = await run(client, file_id, params=FAST, cache=False)
    assert opted_out["result"]["cached"] is False
    assert (await entries(js), await copies(js)) == ({}, set())
    assert (await run(client, file_id, params=FAST))["result"]["cached"] is False  # stored now
    held = await entries(js), await copies(js)
    assert len(held[0]) == 1
    again = await run(client, file_id, params=FAST, cache=False)
    assert again["result"]["cached"] is False  # ran, though the cache holds it
    assert (await entries(js), await copies(js)) == held
    assert (await client.get(f"/api/v1/jobs/{again['id']}")).json()["status"] == "completed"


@pytest.mark.slow
async def test_a_new_worker_serves_the_cache_and_evicts_the_least_recently_used(
    client: httpx.AsyncClient, worker_settings: WorkerSettings, js: JetStreamContext
) -> None:
    gpu_settings = replace(worker_settings, pool="gpu", ack_wait_s=5, name="gpu")
    file_id = await upload(client, "jfk.flac")
    first = WorkerRunner(gpu_settings)
    await first.start()
    a_params = FAST | {"max_line_length": 42}
    await run(client, file_id, params=a_params)
    await first.stop()
    [a_key] = await entries(js)
    # A new worker process's cache is empty; the stage cache lives in NATS. Its bound (the
    # buckets' bytes) holds two entries of this size, not three.
    one_entry = await bucket_bytes(js)
    MODEL_CACHE.clear()
    second = WorkerRunner(replace(gpu_settings, cache_max_bytes=one_entry * 5 // 2))
    await second.start()
    try:
        assert (await run(client, file_id, params=a_params))["result"]["cached"] is True
        assert len(MODEL_CACHE) == 0
        await run(client, file_id, params=FAST | {"max_line_length": 40})  # B
        assert (await run(client, file_id, params=a_params))["result"]["cached"] is True  # A used last
        await run(client, file_id, params=FAST | {"max_line_length": 38})  # C: B is evicted
    finally:
        await second.stop()
    held = await entries(js)
    assert len(held) == 2
    assert a_key in held
    assert await bucket_bytes(js) <= one_entry * 5 // 2
    # No copy of B is left behind: the store holds exactly what the manifests name.
    assert await copies(js) == {o.object_name for entry in held.values() for o in entry.outputs}


def test_the_key_covers_params_and_identity_but_not_their_order() -> None:
    base = cache_key("generate_srt", "ab" * 32, {"beam_size": 1, "model": "tiny.en"}, identity={"v": 1})
    assert base == cache_key(
        "generate_srt", "ab" * 32, {"model": "tiny.en", "beam_size": 1}, identity={"v": 1}
    )
    others = {
        cache_key("generate_srt", "ab" * 32, {"beam_size": 2, "model": "tiny.en"}, identity={"v": 1}),
        cache_key("transcribe", "ab" * 32, {"beam_size": 1, "model": "tiny.en"}, identity={"v": 1}),
        cache_key("generate_srt", "cd" * 32, {"beam_size": 1, "model": "tiny.en"}, identity={"v": 1}),
        cache_key("generate_srt", "ab" * 32, {"beam_size": 1, "model": "tiny.en"}, identity={"v": 2}),
        cache_key(
            "generate_srt",
            "ab" * 32,
            {"beam_size": 1, "model": "tiny.en"},
            identity={"v": 1},
            input_suffix=".mp3",
        ),
    }
    assert base not in others
    assert len(others) == 5
    excluded = cache_key(
        "generate_srt", "ab" * 32, {"beam_size": 1, "model": "tiny.en", "x": 3}, identity={"v": 1},
        excluded=frozenset({"x"}),
    )  # fmt: skip
    assert excluded == base


async def test_an_entry_missing_a_copy_is_stored_afresh_by_the_next_run(
    client: httpx.AsyncClient, gpu: WorkerRunner, js: JetStreamContext
) -> None:
    file_id = await upload(client, "jfk.flac")
    assert (await run(client, file_id, params=FAST))["result"]["cached"] is False
    [entry] = (await entries(js)).values()
    # What an eviction racing a hit leaves: a manifest naming a copy that is gone.
    await (await cache_files_store(js)).delete(entry.outputs[0].object_name)
    assert (await run(client, file_id, params=FAST))["result"]["cached"] is False  # a miss: it runs
    [stored] = (await entries(js)).values()
    assert stored.outputs != entry.outputs  # the broken manifest was replaced, not kept
    assert await copies(js) == {o.object_name for o in stored.outputs}
    # Nothing of the broken entry is left, not even its deleted copy's record.
    assert (await (await cache_files_store(js)).status()).stream_info.state.messages == 2 * len(
        stored.outputs
    )
    assert (await run(client, file_id, params=FAST))["result"]["cached"] is True


async def store_one(cache: StageCache, workdir: Path, index: int) -> None:
    """What a worker stores after a run: one small output and its manifest, under key `index`."""
    loop = asyncio.get_running_loop()

    async def publish(percent: float, step: str) -> None:
        return None

    job = Submitted(job_id=f"job-{index}", type="convert", pool="cpu", owner="test", file_id="input")
    ctx = JobContext(job, 1, 1, Reporter(publish, loop), workdir=workdir)
    path = workdir / f"out-{index}.m4a"
    data = f"output {index} ".encode() * 10
    path.write_bytes(data)
    ctx.saved.append((path, {
        "file_id": f"file-{index}", "name": path.name, "content_type": "audio/mp4", "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }))  # fmt: skip
    await cache._store(ctx, Keyed(key=f"key{index}", input_sha256="ab" * 32, input_stem="in"), {"n": index})


async def test_eviction_scans_rarely_and_leaves_no_markers(js: JetStreamContext, tmp_path: Path) -> None:
    manifests, store = await cache_bucket(js), await cache_files_store(js)
    bound, inserts = 40_000, 120
    cache = StageCache(js, manifests, store, bound, {})
    for index in range(inserts):
        await store_one(cache, tmp_path, index)
    held = await entries(js)
    print(f"{inserts} stores under a {bound}-byte bound: {cache.scans} scans, {len(held)} entries kept")
    assert 0 < cache.scans < inserts // 4  # each scan frees room for several stores
    assert f"key{inserts - 1}" in held
    assert "key0" not in held  # the least recently used went
    kv_state = (await manifests.status()).stream_info.state
    copies_state = (await store.status()).stream_info.state
    assert kv_state.messages == len(held)  # no delete markers
    assert copies_state.messages == 2 * len(held)  # a record and one chunk per copy, none deleted
    assert await bucket_bytes(js) <= bound
    assert await copies(js) == {o.object_name for entry in held.values() for o in entry.outputs}


def test_the_inline_text_cut_is_part_of_a_transcript_key() -> None:
    params = {"model": "tiny.en", "beam_size": 1}
    wide, narrow = WorkerSettings(), WorkerSettings(inline_text_bytes=100)
    assert wide.inline_text_bytes == MAX_INLINE_TEXT_BYTES
    for operation in ("transcribe", "generate_srt"):
        identities = [CACHE_IDENTITY[operation](params, settings) for settings in (wide, narrow)]
        keys = {cache_key(operation, "ab" * 32, params, identity=identity) for identity in identities}
        assert len(keys) == 2, operation
    # A setting past the bound cuts at the bound: the same text, the same key.
    wider = WorkerSettings(inline_text_bytes=2 * MAX_INLINE_TEXT_BYTES)
    assert CACHE_IDENTITY["transcribe"](params, wider) == CACHE_IDENTITY["transcribe"](params, wide)
