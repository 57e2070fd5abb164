"""fix_cues against a local OpenAI-compatible server: chunking, concurrency, retries, errors, cancel,
where the key may go, and MAX_LLM_CONCURRENCY across all the jobs of one worker."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from streams import AddressPolicy, NatsServer
from tests.conftest import submit, wait_terminal
from tests.llm_server import ChatRequest, FakeLLM, drop_last_line, numbered, tidy
from tests.test_media_ops import download, llm_settings, running, upload
from workers import WorkerSettings, subtitles
from workers.llm import DEFAULT_SYS_MSG, Cue, Endpoint, FixCancelled, LLMError, endpoint, fix_cues

KEY = "sk-test"


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    """A fresh fake model server per test."""
    with FakeLLM(api_key=KEY) as fake:
        yield fake


def stamp(seconds: int, millis: int) -> str:
    """An SRT timestamp."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d},{millis:03d}"


def make_cues(*texts: str) -> list[Cue]:
    """Cues two seconds apart, each shown for 1.5 s, with the given texts."""
    return [
        Cue(index=i, start=stamp(2 * (i - 1), 0), end=stamp(2 * i - 1, 500), text=text)
        for i, text in enumerate(texts, 1)
    ]


async def fix(server: FakeLLM, cues: list[Cue], **kwargs: Any) -> Any:
    """fix_cues against `server`."""
    target = kwargs.pop("target", Endpoint(base_url=server.base_url, api_key=KEY))
    return await fix_cues(cues, target=target, model="test-model", **kwargs)


async def test_fixes_text_and_counts_changes(server: FakeLLM) -> None:
    cues = make_cues("hello world", "Already fine.", "two\nlines", "")
    result = await fix(server, cues)
    assert [c.text for c in result.cues] == ["Hello world.", "Already fine.", "Two\nlines.", ""]
    assert result.changed == 2
    assert (result.chunks, result.warnings, result.retries) == (1, [], 0)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request.body["model"] == "test-model"
    assert request.authorization == f"Bearer {KEY}"
    assert request.user == "1: hello world\n2: Already fine.\n3: two<br>lines\n4: "
    assert request.system == DEFAULT_SYS_MSG


async def test_timestamps_and_count_preserved(server: FakeLLM) -> None:
    cues = make_cues(*(f"line {i}" for i in range(1, 46)))
    result = await fix(server, cues, chunk_size=20)
    assert result.chunks == 3
    assert len(result.cues) == 45
    assert [(c.index, c.start, c.end) for c in result.cues] == [(c.index, c.start, c.end) for c in cues]
    assert result.cues[44] == Cue(index=45, start="00:01:28,000", end="00:01:29,500", text="Line 45.")
    assert result.changed == 45
    # Only text went out: no timestamp appears in any request.
    assert all("-->" not in r.user and ",000" not in r.user for r in server.requests)
    assert sorted(len(numbered(r.user)) for r in server.requests) == [5, 20, 20]


async def test_concurrency_is_bounded(server: FakeLLM) -> None:
    server.delay = 0.2
    steps: list[tuple[float, str]] = []
    result = await fix(
        server,
        make_cues(*(f"cue {i}" for i in range(10))),
        chunk_size=2,
        max_concurrency=2,
        progress=lambda pct, step: steps.append((pct, step)),
    )
    assert result.chunks == 5
    assert len(server.requests) == 5
    assert server.max_in_flight == 2
    assert steps == [(20.0 * n, f"fixing chunk {n} of 5") for n in range(1, 6)]


@pytest.mark.slow
async def test_rate_limit_then_server_error_are_retried(server: FakeLLM) -> None:
    server.fail_first = [429, 500]
    result = await fix(server, make_cues("a", "b"), max_retries=3)
    assert [c.text for c in result.cues] == ["A.", "B."]
    assert (result.retries, result.warnings, result.changed) == (2, [], 2)
    assert len(server.requests) == 3


@pytest.mark.slow
async def test_transient_errors_past_max_retries_fail_retryable(server: FakeLLM) -> None:
    server.fail_first = [503, 503, 503]
    with pytest.raises(LLMError, match=r"still failing after 2 retries: HTTP 503") as info:
        await fix(server, make_cues("a"), max_retries=2)
    assert info.value.retryable is True
    assert len(server.requests) == 3


@pytest.mark.slow
async def test_retry_after_is_waited_out_before_the_next_try(server: FakeLLM) -> None:
    """A 429's Retry-After (1 s) sets the wait, not the SDK's own first backoff (0.5 s at most)."""
    server.fail_first, server.retry_after = [429, 503], "1"
    result = await fix(server, make_cues("a"), max_retries=2)
    assert ([c.text for c in result.cues], result.retries) == (["A."], 2)
    first, second, third = (r.at for r in server.requests)
    assert second - first >= 0.95
    assert third - second >= 0.95


async def test_wrong_line_count_is_retried_then_accepted(server: FakeLLM) -> None:
    def broken_once(request: ChatRequest) -> str:
        return drop_last_line(request) if request.number == 1 else tidy(request)

    server.reply = broken_once
    result = await fix(server, make_cues("one", "two", "three"))
    assert [c.text for c in result.cues] == ["One.", "Two.", "Three."]
    assert (result.retries, result.warnings, result.changed) == (1, [], 3)
    assert len(server.requests) == 2


async def test_always_broken_chunk_is_kept_with_warning(server: FakeLLM) -> None:
    def break_second_chunk(request: ChatRequest) -> str:
        return drop_last_line(request) if "c3" in request.user else tidy(request)

    server.reply = break_second_chunk
    cues = make_cues("c1", "c2", "c3", "c4", "c5")
    result = await fix(server, cues, chunk_size=2, max_retries=2)
    assert [c.text for c in result.cues] == ["C1.", "C2.", "c3", "c4", "C5."]
    assert result.cues[2:4] == cues[2:4]
    assert result.warnings == ["chunk 2 of 3 (cues 3-4): no answer with 2 numbered lines; kept unchanged"]
    assert (result.retries, result.changed) == (2, 3)
    assert len(server.requests) == 5  # chunks 1 and 3 once, chunk 2 three times


async def test_unauthorized_fails_at_once() -> None:
    with FakeLLM(api_key="sk-other") as server:
        started = time.monotonic()
        with pytest.raises(LLMError, match=r"authentication failed \(HTTP 401\): check the API key") as info:
            await fix(server, make_cues("a", "b", "c"), chunk_size=1, max_concurrency=1)
        assert time.monotonic() - started < 2.0
        assert info.value.retryable is False
        assert len(server.requests) == 1


async def test_bad_request_fails_at_once(server: FakeLLM) -> None:
    server.fail_first = [400]
    with pytest.raises(LLMError, match=r"refused the request: HTTP 400") as info:
        await fix(server, make_cues("a"))
    assert info.value.retryable is False
    assert len(server.requests) == 1


async def test_cancelled_before_start_sends_nothing(server: FakeLLM) -> None:
    with pytest.raises(FixCancelled, match="cancelled"):
        await fix(server, make_cues("a", "b"), cancelled=lambda: True)
    assert server.requests == []


async def test_cancelled_between_chunks(server: FakeLLM) -> None:
    steps: list[str] = []
    with pytest.raises(FixCancelled):
        await fix(
            server,
            make_cues("a", "b", "c", "d"),
            chunk_size=1,
            max_concurrency=1,
            progress=lambda pct, step: steps.append(step),
            cancelled=lambda: len(steps) >= 2,
        )
    assert len(server.requests) == 2
    assert steps == ["fixing chunk 1 of 4", "fixing chunk 2 of 4"]


async def test_sys_msg_is_the_system_message(server: FakeLLM) -> None:
    result = await fix(server, make_cues("a"), sys_msg="Fix German subtitles.")
    assert result.cues[0].text == "A."
    messages = server.requests[0].body["messages"]
    assert messages == [
        {"role": "system", "content": "Fix German subtitles."},
        {"role": "user", "content": "1: a"},
    ]


# where the key may go --------------------------------------------------------------------------

OPERATOR_URL = "https://llm.operator.example/v1"
"""The configured endpoint in these tests; never called (nothing here resolves it)."""


def llm_worker(**kwargs: Any) -> WorkerSettings:
    """Worker settings with the operator's endpoint and key."""
    return WorkerSettings(pool="llm", llm_base_url=OPERATOR_URL, llm_api_key=KEY, **kwargs)


def test_address_policy() -> None:
    def allowed(address: str, **kwargs: bool) -> bool:
        return AddressPolicy(**kwargs).allows(ipaddress.ip_address(address))

    for public in ("93.184.216.34", "2606:4700::1111"):
        assert allowed(public)
    for internal in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.1", "192.168.1.1", "fd00::1", "0.0.0.0"):
        assert not allowed(internal), internal
    assert allowed("127.0.0.1", allow_loopback=True)
    assert allowed("::ffff:127.0.0.1", allow_loopback=True)
    assert not allowed("127.0.0.1", allow_private=True)  # private does not imply loopback
    assert allowed("10.0.0.1", allow_private=True)
    assert allowed("fd00::1", allow_private=True)
    # Never, whatever the settings: metadata services, "this network", multicast.
    for never in ("169.254.169.254", "fe80::1", "fd00:ec2::254", "0.0.0.0", "0.1.2.3", "224.0.0.1"):
        assert not allowed(never, allow_loopback=True, allow_private=True), never


async def test_unlisted_base_url_is_refused_before_anything_is_sent() -> None:
    with FakeLLM() as recorder:
        with pytest.raises(LLMError, match="is not an LLM endpoint this worker allows") as info:
            endpoint(llm_worker(), recorder.base_url)
        assert info.value.retryable is False
        assert KEY not in str(info.value)
        assert recorder.requests == []


def test_configured_and_listed_endpoints_compare_normalized() -> None:
    settings = llm_worker(llm_allowed_base_urls=("HTTPS://Other.Example:443/v1/",))
    configured = endpoint(settings, None)
    assert (configured.base_url, configured.api_key, configured.policy) == (OPERATOR_URL, KEY, None)
    assert endpoint(settings, "https://llm.operator.example:443/v1/").policy is None  # configured: trusted
    listed = endpoint(settings, "https://other.example/v1")
    assert (listed.base_url, listed.policy) == ("https://other.example:443/v1", AddressPolicy())
    assert KEY not in repr(listed)
    for other in ("http://other.example/v1", "https://other.example:8443/v1", "https://other.example/v2"):
        with pytest.raises(LLMError):
            endpoint(settings, other)


async def test_listed_endpoint_on_loopback_is_refused_unless_allowed(server: FakeLLM) -> None:
    listed = llm_worker(llm_allowed_base_urls=(server.base_url,))
    with pytest.raises(LLMError, match=r"resolves to the non-public address 127\.0\.0\.1; not sent"):
        await fix(server, make_cues("a"), target=endpoint(listed, server.base_url))
    assert server.requests == []

    # By name too: localhost is loopback whichever address it resolves to first.
    by_name = server.base_url.replace("127.0.0.1", "localhost")
    listed = llm_worker(llm_allowed_base_urls=(by_name,))
    with pytest.raises(LLMError, match="localhost resolves to the non-public address"):
        await fix(server, make_cues("a"), target=endpoint(listed, by_name))
    assert server.requests == []

    allowed = llm_worker(llm_allowed_base_urls=(by_name,), llm_allow_loopback=True)
    result = await fix(server, make_cues("a"), target=endpoint(allowed, by_name))
    assert [c.text for c in result.cues] == ["A."]
    assert [r.authorization for r in server.requests] == [f"Bearer {KEY}"]


@dataclass(frozen=True)
class ScriptedDns(AddressPolicy):
    """The policy with DNS answers given in turn: the DNS-rebinding host of the test below."""

    answers: list[list[str]] = field(default_factory=list)

    async def lookup(self, host: str, port: int | None) -> list[str]:
        return self.answers.pop(0)


async def test_every_request_is_resolved_checked_and_sent_to_the_checked_address(server: FakeLLM) -> None:
    port = server.base_url.split(":")[2].split("/")[0]
    # `llm.invalid` resolves nowhere: the first request can only reach the server through the
    # address the check saw. The second lookup rebinds the name to a private address.
    policy = ScriptedDns(allow_loopback=True, answers=[["127.0.0.1"], ["10.1.2.3"]])
    target = Endpoint(base_url=f"http://llm.invalid:{port}/v1", api_key=KEY, policy=policy)
    with pytest.raises(
        LLMError, match=r"cues 2-2\): refused: llm.invalid resolves to the non-public address 10\.1\.2\.3"
    ):
        await fix(server, make_cues("a", "b"), target=target, chunk_size=1, max_concurrency=1)
    assert len(server.requests) == 1
    assert policy.answers == []


async def test_a_server_quoting_the_key_does_not_put_it_in_the_error() -> None:
    with (
        FakeLLM(fail_first=[400], quote_authorization=True) as server,
        pytest.raises(
            LLMError, match=r"HTTP 400: .*scripted failure 400 for Bearer \[the API key\]$"
        ) as info,
    ):
        await fix(server, make_cues("a"))
    assert KEY not in str(info.value)


# one worker, many jobs: MAX_LLM_CONCURRENCY -----------------------------------------------------


async def test_calls_sharing_slots_have_that_many_requests_in_flight(server: FakeLLM) -> None:
    server.delay = 0.2
    slots = asyncio.Semaphore(2)
    results = await asyncio.gather(
        *(fix(server, make_cues(*(f"call {n} cue {i}" for i in range(6))), chunk_size=2, slots=slots) for n in range(3))
    )  # fmt: skip
    for n, result in enumerate(results):
        assert [c.text for c in result.cues] == [f"Call {n} cue {i}." for i in range(6)]
    assert len(server.requests) == 9
    assert server.max_in_flight == 2


async def test_a_request_waiting_out_its_backoff_holds_no_slot(server: FakeLLM) -> None:
    server.fail_first, server.retry_after = [429], "1"
    slots = asyncio.Semaphore(1)
    first, second = await asyncio.gather(
        fix(server, make_cues("first"), slots=slots), fix(server, make_cues("second"), slots=slots)
    )
    assert ([c.text for c in first.cues], [c.text for c in second.cues]) == (["First."], ["Second."])
    refused, other, retried = (r.user for r in server.requests)
    # The 429's sender waits 1 s, as Retry-After says; the other call gets the only slot meanwhile.
    assert retried == refused != other
    assert server.max_in_flight == 1


def jobs_srt(job: int, count: int) -> str:
    """`count` untidy one-line cues naming `job`, so each job's output can be told apart."""
    cues = [
        subtitles.Cue(index=n, start=2.0 * n, end=2.0 * n + 1.5, lines=[f"job {job} says line {n}"])
        for n in range(1, count + 1)
    ]
    return subtitles.to_srt(cues)


@pytest.mark.slow
async def test_max_llm_concurrency_bounds_requests_across_all_jobs_of_a_worker(
    client: httpx.AsyncClient, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_LLM_CONCURRENCY", "2")
    jobs, cues, chunk_size = 3, 20, 4  # 5 chunks a job: 15 requests, no more than 2 at once
    sources = [await upload(client, f"talk{j}.srt", jobs_srt(j, cues).encode()) for j in range(jobs)]
    with FakeLLM(delay=0.2) as fake:
        settings = llm_settings(nats_server, fake)
        assert (settings.llm_concurrency, settings.slots) == (2, 2)
        async with running(settings):
            submitted = await asyncio.gather(
                *(submit(client, type="fix_srt", file_id=s["id"], params={"chunk_size": chunk_size}) for s in sources)
            )  # fmt: skip
            done = await asyncio.gather(*(wait_terminal(client, job["id"], timeout=60) for job in submitted))
        assert fake.max_in_flight == 2
        assert len(fake.requests) == jobs * cues // chunk_size
    for j, job in enumerate(done):
        assert job["status"] == "completed", job["error"]
        assert (job["result"]["cues"], job["result"]["changed"], job["result"]["chunks"]) == (cues, cues, 5)
        [output] = job["result"]["outputs"]
        fixed = subtitles.validate_srt((await download(client, output["file_id"])).text)
        assert [c.lines for c in fixed] == [[f"Job {j} says line {n}."] for n in range(1, cues + 1)]
        assert [(c.start, c.end) for c in fixed] == [(2.0 * n, 2.0 * n + 1.5) for n in range(1, cues + 1)]


async def test_configured_endpoint_redirecting_elsewhere_is_not_followed(server: FakeLLM) -> None:
    """A redirect from the configured endpoint is an error: the subtitles and the key stay put."""

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)
            self.send_header("Location", f"{server.base_url}/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=redirector.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        target = Endpoint(base_url=f"http://127.0.0.1:{redirector.server_address[1]}/v1", api_key=KEY)
        with pytest.raises(LLMError, match="307"):
            await fix(server, make_cues("hello"), target=target, max_retries=0)
    finally:
        redirector.shutdown()
        redirector.server_close()
        thread.join()
    assert server.requests == []
