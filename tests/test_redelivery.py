"""A job redelivered while it still runs (its runner's renewals were lost for AckWait) runs once.

The renewals are lost as in a JetStream leader election: the runner is frozen with SIGSTOP (it
sends nothing, answers nothing), or it renews less often than the consumer's AckWait (1 s
here). JetStream then gives the job's message out again; whoever gets it, the job runs once,
ends once and calls its webhook once, and a runner that dies meanwhile leaves no job stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js import JetStreamContext

from app import Settings
from streams import STREAM, Completed, NatsServer, Started, WorkerConsumer, events_subject
from tests.chaos._procs import WorkerProcess, sse_history
from tests.conftest import WorkerRunner, submit, wait_terminal
from tests.test_admin import Receiver, wait_for
from tests.test_retention import publish
from workers import WorkerSettings

pytestmark = pytest.mark.slow

ACK_WAIT_S = 1.0
FREEZE_S = 4.0
"""Long past AckWait: the server has surely put the message up for redelivery by then."""
DURABLE = WorkerConsumer(pool="cpu").durable
SLOW = {"steps": 10, "duration_s": 5.0}
"""A job that runs 5 s, several AckWaits."""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """conftest's API, sending webhooks to this machine."""
    return replace(settings, webhook_allow_loopback=True, webhook_backoff_s=0.05)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A plain connection to look at the consumer."""
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


@contextlib.asynccontextmanager
async def running_job(
    client: httpx.AsyncClient, url: str, log: Path, concurrency: int, **body: object
) -> AsyncIterator[tuple[str, dict[str, Any], int]]:
    """A job running on a `jobcast worker` process with a 1 s AckWait: (its name, the job, its pid)."""
    proc = WorkerProcess(url, log, concurrency, JOBCAST_ACK_WAIT_S=str(ACK_WAIT_S))
    try:
        await proc.start()
        job = await submit(client, **body)
        assert proc.proc is not None
        await running_on(client, job["id"], name_of(proc))
        yield name_of(proc), job, proc.proc.pid
    finally:
        if proc.alive:
            assert proc.proc is not None
            os.kill(proc.proc.pid, signal.SIGCONT)
        await proc.close()


@contextlib.asynccontextmanager
async def second_worker(settings: WorkerSettings) -> AsyncIterator[WorkerRunner]:
    """An idle in-process worker named `second`, with a 1 s AckWait."""
    runner = WorkerRunner(replace(settings, name="second", ack_wait_s=ACK_WAIT_S, idle_poll_s=0.1))
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()


def name_of(proc: WorkerProcess) -> str:
    """The worker name a `jobcast worker` process gives itself."""
    assert proc.proc is not None
    return f"{socket.gethostname()}:{proc.proc.pid}"


async def running_on(client: httpx.AsyncClient, job_id: str, worker: str) -> None:
    """Return once the job runs on `worker`."""

    async def check() -> bool:
        job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        return bool(job["status"] == "running" and job["worker"] == worker)

    await wait_for(check, timeout=30)  # the worker process starts meanwhile


async def redelivered(js: JetStreamContext) -> bool:
    """Whether the consumer has given a message out again that is not acked yet."""
    return bool((await js.consumer_info(STREAM, DURABLE)).num_redelivered)


async def decided(runner: WorkerRunner) -> None:
    """Return once `runner`, idle so far, got the job's redelivery and is done with it."""

    async def busy() -> bool:
        return bool(runner.worker._tasks)

    async def idle() -> bool:
        return not runner.worker._tasks

    await wait_for(busy, timeout=15)
    await wait_for(idle, timeout=15)


async def acked(js: JetStreamContext) -> bool:
    """Whether nothing the consumer handed out waits for an ack any more."""
    return (await js.consumer_info(STREAM, DURABLE)).num_ack_pending == 0


async def ran_once(client: httpx.AsyncClient, hook: Receiver, job_id: str, worker: str) -> None:
    """The job completed once, on `worker`, with one webhook, one `started` and one `completed`."""
    done = await wait_terminal(client, job_id, timeout=30)
    assert (done["status"], done["worker"], done["attempt"]) == ("completed", worker, 1), done

    async def called() -> bool:
        return (await client.get(f"/api/v1/jobs/{job_id}")).json()["callback_status"] == "delivered"

    await wait_for(called)
    await asyncio.sleep(0.3)  # a second delivery would have come by now
    assert [json.loads(body)["status"] for _, body in hook.requests] == ["completed"]
    # Read once the webhook's own event is in: a follower that connects as it lands can miss the
    # end of the stream (the history and the job are not read in one snapshot).
    events = [envelope for _, _, envelope in await sse_history(client, job_id)]
    assert [(e["event"]["worker"], e["event"]["delivery"]) for e in events if e["kind"] == "started"] == [
        (worker, 1)
    ]
    assert [(e["event"]["worker"], e["attempt"]) for e in events if e["kind"] == "completed"] == [(worker, 1)]


async def test_a_worker_given_its_running_job_again_runs_it_once(
    client: httpx.AsyncClient, js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        Receiver([200]) as hook,
        running_job(client, nats_server.url, tmp_path / "w1.log", 2, params=SLOW, callback_url=hook.url) as (
            name, job, pid,
        ),
    ):  # fmt: skip
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(FREEZE_S)  # no renewal reaches the server: the job is up again
        os.kill(pid, signal.SIGCONT)
        # Its free slot takes the redelivery: the run it has goes on, answering that delivery.
        await wait_for(lambda: redelivered(js), timeout=10)
        await ran_once(client, hook, job["id"], name)
        await wait_for(lambda: acked(js))  # the newest delivery was acked


async def test_a_job_redelivered_to_another_worker_stays_with_its_live_runner(
    client: httpx.AsyncClient, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    # The runner is up and answers, but none of its renewals reaches the consumer in time (it
    # renews every 10 s, the consumer's AckWait is 1 s), as when they are lost in a leader
    # election: every redelivery goes to the idle second worker, which leaves the job alone.
    first = WorkerRunner(replace(worker_settings, name="first", ack_wait_s=30.0))
    await first.start()
    try:
        async with Receiver([200]) as hook:
            job = await submit(client, params=SLOW, callback_url=hook.url)
            await running_on(client, job["id"], "first")
            async with second_worker(worker_settings):  # its start sets the consumer's AckWait to 1 s
                await wait_for(lambda: redelivered(js), timeout=10)
                await ran_once(client, hook, job["id"], "first")
                await wait_for(lambda: acked(js))  # the first delivery's ack was honoured
    finally:
        await first.stop()


async def test_a_job_redelivered_while_its_runner_is_frozen_stays_with_it(
    client: httpx.AsyncClient,
    js: JetStreamContext,
    nats_server: NatsServer,
    worker_settings: WorkerSettings,
    tmp_path: Path,
) -> None:
    # A frozen runner sends nothing and answers nothing, but its connection is up: the second
    # worker leaves the job to it, and once it thaws it finishes the job.
    async with (
        Receiver([200]) as hook,
        running_job(client, nats_server.url, tmp_path / "w1.log", 1, params=SLOW, callback_url=hook.url) as (
            name, job, pid,
        ),
        second_worker(worker_settings) as second,
    ):  # fmt: skip
        os.kill(pid, signal.SIGSTOP)
        await decided(second)
        os.kill(pid, signal.SIGCONT)
        await ran_once(client, hook, job["id"], name)
        await wait_for(lambda: acked(js))  # the first delivery's ack was honoured


async def test_a_job_left_to_a_runner_that_then_dies_runs_again(
    client: httpx.AsyncClient, nats_server: NatsServer, worker_settings: WorkerSettings, tmp_path: Path
) -> None:
    # The second worker leaves the job to the frozen one, which is then killed: its connection
    # closes with it, and the job's next delivery runs. Nothing is stuck.
    params = {"steps": 4, "duration_s": 1.0}
    async with (
        running_job(client, nats_server.url, tmp_path / "w1.log", 1, params=params) as (name, job, pid),
        second_worker(worker_settings) as second,
    ):
        os.kill(pid, signal.SIGSTOP)
        await decided(second)
        os.kill(pid, signal.SIGKILL)
        done = await wait_terminal(client, job["id"], timeout=30)
    assert (done["status"], done["worker"]) == ("completed", "second"), done
    events = [envelope for _, _, envelope in await sse_history(client, job["id"])]
    started = [(e["event"]["worker"], e["event"]["delivery"]) for e in events if e["kind"] == "started"]
    assert started == [(name, 1), ("second", 3)]  # delivery 2 was left to the frozen worker
    assert [e["event"]["worker"] for e in events if e["kind"] == "completed"] == ["second"]


async def test_a_run_that_began_before_the_end_was_stored_ends_nothing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    # What two workers publish when the first ran on out of reach (its connection gone, as the
    # second asked) while the second took the job: the first's end lands before the second's
    # start, then the second ends.
    async with Receiver([200]) as hook:
        job = await submit(client, params={"steps": 0}, callback_url=hook.url)  # no worker takes it
        job_id, subject = job["id"], events_subject(job["id"])
        for event in (
            Started(job_id=job_id, attempt=1, worker="cut-off", delivery=1),
            Completed(job_id=job_id, attempt=1, worker="cut-off", result={"by": "cut-off"}),
            Started(job_id=job_id, attempt=2, worker="second", delivery=2),
            Completed(job_id=job_id, attempt=2, worker="second", result={"by": "second"}),
        ):
            await publish(js, subject, event)
        await submit(client, params={"steps": 0})  # applied after every event above
        seen = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        assert (seen["status"], seen["worker"], seen["attempt"], seen["result"]) == (
            "completed", "cut-off", 1, {"by": "cut-off"},
        )  # fmt: skip

        async def called() -> bool:
            return (await client.get(f"/api/v1/jobs/{job_id}")).json()["callback_status"] == "delivered"

        await wait_for(called)
        await asyncio.sleep(0.3)  # a second delivery would have come by now
        assert [json.loads(body)["result"] for _, body in hook.requests] == [{"by": "cut-off"}]
