"""Every figure of Compileo's /queue/stats is measured for the whole deployment: the API process and
every live worker process (a real `jobcast worker` subprocess holding tiny.en), read back from
/proc by the test; health per pool; limits as configured."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from app import Settings
from streams import (
    Cgroups,
    NatsServer,
    ProcessUsage,
    WorkerInfo,
    cpu_count,
    machine_id,
    workers_bucket,
)
from streams._buckets import WORKERS_BUCKET
from tests.conftest import MEDIA, ApiServer, WorkerRunner, spawned, submit, wait_terminal, worker_process
from workers import WorkerSettings
from workers.whisper import MODEL_CACHE

TTL_S = 6.0
"""The heartbeat TTL of these tests: beats, and CPU windows, every 2 s (a beat held up by a loaded
machine for less than 6 s does not make a worker look dead)."""
WINDOW_S = TTL_S / 3


@pytest.fixture(autouse=True)
def short_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the API starts: every process of the test measures CPU over 2 s windows."""
    monkeypatch.setenv("JOBCAST_WORKER_TTL_S", str(TTL_S))


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/v1/jobs/queue/stats")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_stats(client: httpx.AsyncClient, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    """Poll the stats until `predicate(stats)` holds; returns them."""
    async with asyncio.timeout(timeout):
        while not predicate(body := await stats(client)):  # noqa: ASYNC110 - polling over HTTP
            await asyncio.sleep(0.1)
    return body


def proc_rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process as /proc reports it."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, as /proc reports them."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def upload(client: httpx.AsyncClient, name: str) -> str:
    """Upload one of the shared media files; returns its file id."""
    data = (MEDIA / name).read_bytes()  # small files: reading them blocks the loop for microseconds
    response = await client.post("/api/v1/files", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id


@pytest.fixture
async def gpu_worker_process(nats_server: NatsServer) -> AsyncIterator[asyncio.subprocess.Process]:
    """A `jobcast worker --pool gpu` child process (whisper on the CPU)."""
    argv, env = worker_process(nats_server.url, "gpu", JOBCAST_ACK_WAIT_S="10")
    async with spawned(argv, env) as proc:  # type: ignore[arg-type]
        yield proc


@pytest.mark.slow
async def test_stats_count_a_worker_process_its_cpu_memory_and_model(
    client: httpx.AsyncClient, gpu_worker_process: asyncio.subprocess.Process, worker_settings: WorkerSettings
) -> None:
    """A gpu worker in its own process transcribes with tiny.en: its CPU shows while it works, its
    memory and its loaded model afterwards."""
    pid = gpu_worker_process.pid
    before = await wait_stats(client, lambda s: s["active_workers"] == 1)
    assert before["cache_size"] == 0
    assert before["queue_health"]["total_slots"] == 1
    # the API and the worker run in one container of one machine: its CPUs count once
    assert before["queue_health"]["cpu_cores"] == pytest.approx(ProcessUsage().cpus(), abs=0.01)

    speech = await upload(client, "jfk.flac")

    async def transcribe() -> dict[str, Any]:
        # Not from the stage cache: the worker must stay busy transcribing the same file.
        return await submit(client, type="transcribe", file_id=speech, params={"beam_size": 1}, cache=False)

    jobs = [await transcribe()]
    await wait_stats(client, lambda s: s["running_jobs"] == 1)
    cpu_start, started = proc_cpu_s(pid), time.monotonic()
    # Keep the worker transcribing (two jobs queued behind the running one) until the windows of
    # its work have reached the stats (a window, then a heartbeat: up to two windows) for a while.
    readings: list[tuple[float, dict[str, Any]]] = []  # (seconds since the first job started, stats)
    while sum(at >= 2 * WINDOW_S for at, _ in readings) < 6:
        body = await stats(client)
        readings.append((time.monotonic() - started, body))
        for _ in range(2 - body["pending_jobs"]):
            jobs.append(await transcribe())
        await asyncio.sleep(0.25)
    worker_cpu = 100 * (proc_cpu_s(pid) - cpu_start) / (time.monotonic() - started)
    assert [(await wait_terminal(client, job["id"]))["status"] for job in jobs] == ["completed"] * len(jobs)

    # CPU: a typical reading is a good part of the worker's average (the API's own comes on top),
    # in percent of one core, and in percent of the deployment's CPUs
    assert worker_cpu > 20, f"the worker used {worker_cpu:.0f} % of a core: too little to measure"
    steady = [body for at, body in readings if at >= 2 * WINDOW_S]
    cores = statistics.median(body["queue_health"]["cpu_core_percent"] for body in steady)
    assert cores >= 0.4 * worker_cpu, ([body["queue_health"] for body in steady], worker_cpu)
    share = statistics.median(body["cpu_usage_percent"] for body in steady)
    assert 0.4 * worker_cpu / before["queue_health"]["cpu_cores"] <= share <= 100, (share, worker_cpu)
    # no slot left (but for a moment between two jobs): no capacity left
    busy = [body for _, body in readings if body["queue_health"]["busy_slots"] == 1]
    assert len(busy) >= 0.6 * len(readings), [body["queue_health"] for _, body in readings]
    assert all(body["queue_health"]["resource_utilization"] == "high" for body in busy)

    # the model stays loaded in the worker's cache; its memory is in the sum
    after = await wait_stats(client, lambda s: s["cache_size"] == 1 and s["queue_health"]["busy_slots"] == 0)
    measured = proc_rss_mb() + proc_rss_mb(pid)
    assert 0.95 * measured <= after["memory_usage_mb"] <= 1.3 * measured, (after["memory_usage_mb"], measured)
    assert proc_rss_mb(pid) > 100, "tiny.en loaded takes more than 100 MB"
    assert after["active_workers"] == 1
    await wait_stats(client, lambda s: s["queue_health"]["resource_utilization"] == "optimal")

    # a worker in the API's own process is one more worker, but not one more process
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        both = await wait_stats(client, lambda s: s["active_workers"] == 2)
        measured = proc_rss_mb() + proc_rss_mb(pid)
        assert 0.95 * measured <= both["memory_usage_mb"] <= 1.3 * measured, (
            both["memory_usage_mb"],
            measured,
        )
        assert both["cache_size"] == 1 + len(MODEL_CACHE)  # what this process's worker holds too
        assert both["queue_health"]["total_slots"] == 2
    finally:
        await runner.stop()


async def test_two_readings_in_a_row_agree(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU figure covers the last full window: a caller cannot shorten it by reading."""
    monkeypatch.setenv("JOBCAST_WORKER_TTL_S", "600")  # windows of 200 s: none ends during the test
    api = ApiServer(settings)
    await api.start()
    try:
        assert api.app is not None
        usage: ProcessUsage = api.app.state.stats.usage
        usage.sample()  # the window ends now
        burn_until = time.process_time() + 0.3
        while time.process_time() < burn_until:  # CPU in the API's process, after the window
            pass
        async with httpx.AsyncClient(base_url=api.url) as client:
            first, second = await stats(client), await stats(client)
        assert first["queue_health"]["cpu_core_percent"] == usage.cpu_percent()
        assert first["queue_health"] == second["queue_health"]
        assert first["cpu_usage_percent"] == second["cpu_usage_percent"]
    finally:
        await api.stop()


@pytest.mark.slow
async def test_busy_slots_make_utilization_high(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    """One cpu worker of one slot: while it runs a job that sleeps, no capacity is left."""
    idle = await wait_stats(client, lambda s: s["active_workers"] == 1)
    assert idle["queue_health"]["resource_utilization"] == "optimal"
    job = await submit(client, params={"steps": 2, "duration_s": 3})
    busy = await wait_stats(client, lambda s: s["running_jobs"] == 1 and s["queue_health"]["busy_slots"] == 1)
    assert busy["queue_health"]["total_slots"] == 1
    assert busy["queue_health"]["resource_utilization"] == "high"
    await wait_terminal(client, job["id"])
    done = await wait_stats(client, lambda s: s["queue_health"]["busy_slots"] == 0)
    assert done["queue_health"]["resource_utilization"] == "optimal"


async def test_a_pool_with_work_and_no_worker_is_degraded(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    """A cpu worker is up; a transcription waits for a gpu worker that is not."""
    healthy = await wait_stats(client, lambda s: s["active_workers"] == 1)
    assert healthy["queue_health"]["status"] == "healthy"
    assert healthy["queue_health"]["pools"] == {"cpu": "healthy", "gpu": "healthy", "llm": "healthy"}
    job = await submit(client, type="transcribe", file_id=await upload(client, "jfk.flac"))
    body = await stats(client)
    assert body["pending_jobs"] == 1
    assert body["queue_health"]["status"] == "degraded"
    assert body["queue_health"]["pools"] == {"cpu": "healthy", "gpu": "degraded", "llm": "healthy"}
    cancelled = await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = await stats(client)
    assert body["cancelled_jobs"] == 1
    assert body["queue_health"]["status"] == "healthy"


@pytest.mark.slow
async def test_nothing_able_to_run_is_unhealthy(client: httpx.AsyncClient, nats_server: NatsServer) -> None:
    """No worker anywhere with work waiting, or no NATS: nothing can run."""
    idle = await stats(client)
    assert (idle["active_workers"], idle["queue_health"]["status"]) == (0, "healthy")  # nothing waits
    await submit(client, params={"steps": 1})
    body = await stats(client)
    assert body["pending_jobs"] == 1
    assert body["queue_health"]["status"] == "unhealthy"
    assert body["queue_health"]["pools"]["cpu"] == "degraded"

    await nats_server.stop()
    started = time.monotonic()
    body = await stats(client)
    assert time.monotonic() - started < 10  # the heartbeats are given 2 s
    assert body["pending_jobs"] == 1  # SQLite still answers
    assert body["active_workers"] == 0
    assert body["queue_health"]["status"] == "unhealthy"


@pytest.mark.parametrize(
    ("rate_limit", "max_streams", "enforcement"),
    [(6000, 200, "active"), (0, 200, "partial"), (6000, 0, "partial"), (0, 0, "disabled")],
)
async def test_limit_enforcement_follows_the_limits_configured(
    settings: Settings, rate_limit: int, max_streams: int, enforcement: str
) -> None:
    """`limit_enforcement` says which per-key limits are on; 0 turns one off, and it is off."""
    api = ApiServer(replace(settings, rate_limit_per_minute=rate_limit, max_streams_per_owner=max_streams))
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            body = await stats(client)
            assert body["queue_health"]["limit_enforcement"] == enforcement
            job = await submit(client, params={"steps": 1})
            async with client.stream("GET", f"/api/v1/jobs/status/{job['id']}/stream") as stream:
                assert stream.status_code == 200  # a quota of 0 is no quota, not "no streams"
            headers = (await client.get("/api/v1/jobs/queue/stats")).headers
            assert ("ratelimit-limit" in headers) == (rate_limit > 0)
    finally:
        await api.stop()


def beat(host: str, machine: str, **figures: Any) -> WorkerInfo:
    """A heartbeat as a worker in container `host` of `machine` puts it."""
    now = time.time()
    return WorkerInfo(
        name=host, pool="cpu", slots=1, running=[], host=host, pid=1, started_at=now, last_seen=now,
        machine=machine, **figures,
    )  # fmt: skip


async def put_beats(url: str, beats: list[WorkerInfo]) -> None:
    """Put heartbeats into the workers bucket, as workers that the test does not run would."""
    nc = await nats.connect(url)
    try:
        kv = await workers_bucket(nc.jetstream())
        await asyncio.gather(*(kv.put(f"{b.pool}.{b.name}", msgspec.json.encode(b)) for b in beats))
    finally:
        await nc.close()


async def test_containers_of_one_machine_count_its_cpus_once(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    """Docker Compose gives the API and each worker a container, with a hostname of its own, on one
    kernel: its boot id tells the machine. Each container adds the CPUs it may use, up to the
    machine's; a worker older than the machine field stands for its own host."""
    here, cpus, machine_cpus = machine_id(), ProcessUsage().cpus(), os.cpu_count() or 0
    beats = [
        beat(f"worker-{n}", here, cpu_count=cpu_count(), machine_cpus=machine_cpus, cpu_percent=30.0)
        for n in range(2)
    ]
    # another machine of 8 CPUs, whose two worker containers may use half a CPU each
    beats += [
        beat(f"limited-{n}", "another-boot-id", cpu_count=8, cpu_quota=0.5, machine_cpus=8, cpu_percent=40.0)
        for n in range(2)
    ]
    beats.append(beat("old-worker", "", cpu_count=3, cpu_percent=10.0))
    await put_beats(nats_server.url, beats)
    body = await wait_stats(client, lambda s: s["active_workers"] == len(beats))
    health = body["queue_health"]
    assert health["cpu_cores"] == pytest.approx(min(3 * cpus, machine_cpus) + 2 * 0.5 + 3, abs=0.01)
    assert health["cpu_core_percent"] >= 2 * 30 + 2 * 40 + 10  # and the API's own
    # in percent of the deployment's CPUs: what the machines' CPUs are
    assert body["cpu_usage_percent"] == pytest.approx(
        health["cpu_core_percent"] / health["cpu_cores"], abs=0.1
    )


async def test_cpu_use_near_the_cpus_allowed_makes_utilization_high(api: ApiServer, tmp_path: Path) -> None:
    """No worker, so no slot is busy: the API's own CPU use, measured, against the CPUs its cgroup's
    quota allows (a container of `cpus: 0.05`, which a busy thread fills on any machine)."""
    assert api.app is not None
    usage: ProcessUsage = api.app.state.stats.usage
    (tmp_path / "jobcast").mkdir()
    (tmp_path / "jobcast/cpu.max").write_text("max 100000\n")
    (tmp_path / "self-cgroup").write_text("0::/jobcast\n")  # this process, as the kernel shows it
    usage.cgroups = Cgroups(root=tmp_path, membership=tmp_path / "self-cgroup")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        # idle (once the API's start is behind it), this process uses less than 90 % of its CPUs
        idle = await wait_stats(client, lambda s: s["queue_health"]["resource_utilization"] == "optimal")
        assert idle["queue_health"]["cpu_cores"] == usage.cpus()

        (tmp_path / "jobcast/cpu.max").write_text("5000 100000\n")  # docker update --cpus 0.05
        done = threading.Event()
        burner = threading.Thread(target=burn_until, args=(done,))
        burner.start()
        try:
            high = await wait_stats(client, lambda s: s["queue_health"]["resource_utilization"] == "high")
        finally:
            done.set()
            burner.join()
    health = high["queue_health"]
    assert (health["busy_slots"], health["total_slots"], health["cpu_cores"]) == (0, 0, 0.05)
    assert health["cpu_core_percent"] >= 0.9 * 100 * 0.05  # measured: more than 4.5 % of one core
    assert 90 <= high["cpu_usage_percent"] <= 100  # of the CPUs allowed, never more than all


def burn_until(done: threading.Event) -> None:
    """Use CPU until `done` is set."""
    while not done.is_set():
        sum(range(10_000))


class JetStreamRequests:
    """The JetStream API requests about the workers bucket, as a second connection sees them go by."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    @contextlib.asynccontextmanager
    async def watching(self, url: str) -> AsyncIterator[JetStreamRequests]:
        """Record them while the block runs."""
        nc = await nats.connect(url)

        async def record(msg: nats.aio.msg.Msg) -> None:
            if f"KV_{WORKERS_BUCKET}" in msg.subject:
                self.subjects.append(msg.subject)

        try:
            await nc.subscribe("$JS.API.>", cb=record)
            await nc.flush()
            yield self
            await nc.flush()
        finally:
            await nc.close()


async def test_many_workers_are_read_in_a_few_requests(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    """The heartbeats are read in one watch, not one request per worker: 300 live workers take as
    few requests as one, and the stats and the queue page (which shows them twice more) read them once."""
    here = machine_id()
    beats = [beat(f"worker-{n}", here, cpu_count=1, machine_cpus=1) for n in range(300)]
    await put_beats(nats_server.url, beats)
    async with JetStreamRequests().watching(nats_server.url) as requests:
        body = await stats(client)
    assert body["active_workers"] == len(beats)
    assert body["queue_health"]["status"] == "healthy"
    assert len(requests.subjects) <= 5, requests.subjects  # the bucket, its watch, the watch's info

    async with JetStreamRequests().watching(nats_server.url) as requests:
        page = await client.get("/ui/queue")  # local mode is admin: the workers table too
    assert page.status_code == 200, page.text
    assert page.text.count("<tr><td>worker-") == len(beats)  # a row each
    watches = [s for s in requests.subjects if s.startswith("$JS.API.CONSUMER.CREATE.")]
    assert len(watches) == 1, requests.subjects
