"""The async core of `fix_srt` and `translate_srt`: send subtitle text to an OpenAI-compatible chat
model in chunks, with an `Instruction` that says what to do with it (fix, or translate).

Only the text of each cue goes to the model, as numbered lines ("1: text"); indices and timestamps
stay here, so the cue count and every timestamp survive whatever the model answers.

Every LLM call of every operation goes through `endpoint()` and `open_client()`: the worker's key
goes only to the operator's configured endpoint or one the operator listed, and a listed one is
resolved, checked and pinned before each request (see `_CheckedTransport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import msgspec
import openai
import stamina

from streams import AddressPolicy, EgressRefusedError, HostUnresolvedError
from workers._errors import JobCancelledError
from workers._instructions import DEFAULT_SYS_MSG as DEFAULT_SYS_MSG  # where callers and tests look for it
from workers._instructions import Instruction, fixing
from workers._settings import WorkerSettings

# A cue's own line breaks would break the one-line-per-cue protocol, so they travel as a marker.
BREAK = "<br>"
_NUMBERED = re.compile(r"^\s*(\d+)\s*[:.)]\s?(.*)$")
# What the SDK retries (with 5xx and connection errors): the server is overloaded, rate
# limiting, or briefly unreachable. Past its retries, such an error is worth a later run.
_TRANSIENT_STATUS = {408, 409, 429}
NO_KEY = "none"
"""Sent when no key is configured (local servers take any); the SDK requires one."""


class Cue(msgspec.Struct, frozen=True):
    """One subtitle cue; timestamps are kept as the SRT text they came from."""

    index: int
    start: str
    end: str
    text: str


class FixResult(msgspec.Struct, kw_only=True):
    """What `rewrite_cues` did: the rewritten cues and how it went."""

    cues: list[Cue]
    changed: int
    """Cues whose text the model changed."""
    chunks: int
    warnings: list[str]
    retries: int
    """Requests sent again, after a transient error or an unusable answer."""
    kept: int = 0
    """Cues left as they were sent, because no answer for their chunk had the right lines."""


class LLMError(RuntimeError):
    """The model's API failed in a way this run cannot get past; `retryable` if a later run might."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one job's LLM calls go, with the worker's key; made by `endpoint()`."""

    base_url: str
    api_key: str = field(repr=False)
    policy: AddressPolicy | None = None
    """None for the operator's configured endpoint, trusted as configured (it may well be a local
    vLLM or ollama); for a listed one, where each request's host may resolve to."""


def endpoint(settings: WorkerSettings, base_url: str | None) -> Endpoint:
    """The endpoint for a job that names `base_url` (None: the configured one); raises LLMError,
    not retryable, unless the operator configured or listed it. Checked here as well as by the API,
    since anyone who reaches NATS can publish a job that the API never saw."""
    key = settings.llm_api_key or NO_KEY
    endpoints = settings.llm_endpoints
    if base_url is None or endpoints.is_configured(base_url):
        return Endpoint(base_url=settings.llm_base_url, api_key=key)
    permitted = endpoints.permitted(base_url)
    if permitted is None:
        raise LLMError(
            f"base_url {base_url!r} is not an LLM endpoint this worker allows (JOBCAST_LLM_BASE_URL or one"
            " of JOBCAST_LLM_ALLOWED_BASE_URLS); nothing was sent to it"
        )
    return Endpoint(base_url=permitted, api_key=key, policy=settings.llm_address_policy)


class _CheckedTransport(httpx.AsyncBaseTransport):
    """Before each request: resolve the host, refuse it unless every address passes the policy,
    and connect to an address that was checked.

    Why pin rather than check and go: a check by name followed by a connect by name resolves twice,
    and a DNS-rebinding host answers a public address to the first and 127.0.0.1 to the second.
    Sending the request to the checked IP, with the name kept in the Host header and as the TLS
    server name (httpx's public `sni_hostname` request extension, so the certificate is still
    verified against the name), closes that gap with public httpx APIs only. A custom httpcore
    network backend would see the connect itself, but httpx's transport takes none without its
    internals. Proxy settings of the environment are not used here: a proxy would connect for us.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        try:
            addresses = await self._policy.resolve(host, request.url.port)
        except HostUnresolvedError as exc:  # DNS may recover: transient, as a failed connect is
            raise httpx.ConnectError(str(exc), request=request) from exc
        *others, last = addresses
        for address in others:  # e.g. ::1 first while the server listens on 127.0.0.1 only
            with contextlib.suppress(httpx.ConnectError):
                return await self._send(request, address, host)
        return await self._send(request, last, host)

    async def _send(self, request: httpx.Request, address: str, host: str) -> httpx.Response:
        pinned = httpx.Request(
            request.method, request.url.copy_with(host=address), headers=request.headers,
            stream=request.stream, extensions={**request.extensions, "sni_hostname": host},
        )  # fmt: skip
        return await self._inner.handle_async_request(pinned)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _SlottedClient(httpx.AsyncClient):
    """An httpx client whose every request holds one of `slots` from send to received body.

    Held per HTTP request, not per job or per SDK call, so all clients sharing `slots` (all jobs
    of a worker) have at most its size in flight, and a request waiting out the SDK's retry backoff
    holds none. Waiting for a slot is not timed: the request has
    not started. (A streamed response would hold its slot only until its headers; none is asked for.)
    """

    def __init__(self, slots: asyncio.Semaphore | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots = slots

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        """Send `request` once a slot is free."""
        if self._slots is None:
            return await super().send(request, **kwargs)
        async with self._slots:
            return await super().send(request, **kwargs)


@contextlib.asynccontextmanager
async def open_client(
    target: Endpoint, timeout: float = 120.0, slots: asyncio.Semaphore | None = None, max_retries: int = 0
) -> AsyncIterator[openai.AsyncOpenAI]:
    """An OpenAI client for `target` that sends the key nowhere else (no redirects followed); each
    of its HTTP requests holds one of `slots` (the worker's MAX_LLM_CONCURRENCY) while in flight,
    and the SDK retries transient HTTP errors up to `max_retries` times."""
    async with contextlib.AsyncExitStack() as stack:
        transport = None if target.policy is None else _CheckedTransport(target.policy)
        http = await stack.enter_async_context(
            _SlottedClient(slots, transport=transport, timeout=timeout, follow_redirects=False)
        )
        # openai 3 annotates `http_client` as its httpx2 client and takes an httpx one too (what
        # openai 1 and 2 take, and this project's HTTP library).
        client = openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=max_retries, timeout=timeout,
            http_client=cast(Any, http),
        )  # fmt: skip
        async with client:
            yield client


class FixCancelled(JobCancelledError):  # noqa: N818 - the name the fix_srt operation was specified with
    """`cancelled()` said stop; subclassing JobCancelledError lets the worker runtime treat it as such."""


def to_lines(texts: list[str]) -> str:
    """Number texts one per line ("1: text"), line breaks inside a text turned into markers."""
    return "\n".join(f"{n}: {BREAK.join(t.splitlines())}" for n, t in enumerate(texts, 1))


def from_lines(answer: str, count: int) -> list[str] | None:
    """Texts from an answer in the `to_lines` form, or None unless it numbers exactly 1..count."""
    texts: list[str] = []
    for line in answer.strip().splitlines():
        if not line.strip() or line.strip().startswith("```"):
            continue  # models like to wrap answers in code fences or leave blank lines
        match = _NUMBERED.match(line)
        if match is None or int(match[1]) != len(texts) + 1:
            return None
        texts.append("\n".join(part.strip() for part in match[2].split(BREAK)).strip())
    return texts if len(texts) == count else None


class _BrokenAnswer(Exception):  # noqa: N818 - not an error of the job: the answer is asked for again
    """The model's answer did not number exactly the lines it was sent."""


def _transient(exc: Exception) -> bool:
    """Whether a later run might get past `exc`: what the SDK retries, once it gave up."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
    )


def _failure(exc: openai.APIError, label: str, max_retries: int, api_key: str) -> LLMError:
    """The LLMError for an API error the SDK raised (after its retries, for a transient one)."""
    if (refused := _refusal(exc)) is not None:  # openai 1 and 2 wrap it
        return LLMError(f"{label}: {refused}; not sent")
    if not _transient(exc):
        return LLMError(f"{label}: the model's API refused the request: {_describe(exc, api_key)}")
    return LLMError(
        f"{label}: still failing after {max_retries} retries: {_describe(exc, api_key)}", retryable=True
    )


async def fix_cues(cues: list[Cue], *, sys_msg: str | None = None, **options: Any) -> FixResult:
    """Fix the text of `cues` with the model: `rewrite_cues` with the `fixing` instruction."""
    return await rewrite_cues(cues, fixing(sys_msg), **options)


async def rewrite_cues(
    cues: list[Cue],
    instruction: Instruction,
    *,
    target: Endpoint,
    model: str,
    chunk_size: int = 20,
    max_concurrency: int = 4,
    slots: asyncio.Semaphore | None = None,
    max_retries: int = 3,
    timeout: float = 120.0,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> FixResult:
    """Rewrite the text of `cues` as `instruction` says, chunk by chunk; timestamps and cue count
    are kept, and a chunk without a usable answer is kept as it was sent, with a warning.

    Up to `max_concurrency` chunks are under way at once, and each HTTP request holds one of
    `slots` (shared by the worker's jobs; None: this call's own `max_concurrency`) while in flight.
    """
    if chunk_size < 1 or max_concurrency < 1 or max_retries < 0:
        raise ValueError("chunk_size and max_concurrency must be >= 1, max_retries >= 0")
    chunks = [cues[i : i + chunk_size] for i in range(0, len(cues), chunk_size)]
    fixed: list[list[Cue]] = [list(chunk) for chunk in chunks]
    warnings: dict[int, str] = {}  # by chunk, since chunks finish in any order
    retries = 0
    done = 0
    kept = 0
    semaphore = asyncio.Semaphore(max_concurrency)

    async def ask(client: openai.AsyncOpenAI, texts: list[str], label: str) -> list[str] | None:
        """One chunk's texts from the model, None when every answer had the wrong shape.

        HTTP errors worth retrying (429, 408, 409, 5xx, no connection) are the SDK's to retry, up to
        `max_retries` times after waiting as its server asks (Retry-After, retry-after-ms) or its
        own backoff; each try holds a slot (`_SlottedClient`), a wait holds none. An answer with
        the wrong lines is asked again here, at once, up to `max_retries` times."""
        nonlocal retries
        messages: list[Any] = [
            {"role": "system", "content": instruction.system},
            {"role": "user", "content": to_lines(texts)},
        ]

        async def once() -> list[str]:
            nonlocal retries
            try:
                raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages)
            except EgressRefusedError as exc:  # openai 3 lets what the transport raises through
                raise LLMError(f"{label}: {exc}; not sent") from None
            except openai.APIError as exc:
                raise _failure(exc, label, max_retries, target.api_key) from exc
            retries += raw.retries_taken
            response = raw.parse()
            answer = from_lines(
                (response.choices[0].message.content if response.choices else None) or "", len(texts)
            )
            if answer is None:
                raise _BrokenAnswer
            return answer

        with contextlib.suppress(_BrokenAnswer):  # raised again by the last attempt: keep the chunk
            async for attempt in stamina.retry_context(
                on=_BrokenAnswer,
                attempts=max_retries + 1,
                timeout=None,
                wait_initial=0,
                wait_max=0,
                wait_jitter=0,
            ):
                with attempt:
                    if attempt.num > 1:
                        retries += 1
                    return await once()
        return None

    async def run(client: openai.AsyncOpenAI, n: int, chunk: list[Cue]) -> None:
        nonlocal done, kept
        label = f"chunk {n + 1} of {len(chunks)} (cues {chunk[0].index}-{chunk[-1].index})"
        async with semaphore:
            # Checked once a slot is free, so a cancel stops chunks that were only queued.
            if cancelled is not None and cancelled():
                raise FixCancelled(f"{instruction.doing} subtitles was cancelled")
            answer = await ask(client, [cue.text for cue in chunk], label)
        if answer is None:
            warnings[n] = f"{label}: no answer with {len(chunk)} numbered lines; {instruction.kept}"
            kept += len(chunk)
        else:
            # An emptied cue would leave a blank subtitle on screen: keep the original text instead.
            fixed[n] = [
                msgspec.structs.replace(c, text=t or c.text) for c, t in zip(chunk, answer, strict=True)
            ]
        done += 1
        if progress is not None:
            progress(100.0 * done / len(chunks), f"{instruction.doing} chunk {done} of {len(chunks)}")

    async with open_client(
        target, timeout, slots or asyncio.Semaphore(max_concurrency), max_retries
    ) as client:
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other chunks
                for n, chunk in enumerate(chunks):
                    group.create_task(run(client, n, chunk))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
    out = [cue for chunk in fixed for cue in chunk]
    changed = sum(a.text != b.text for a, b in zip(cues, out, strict=True))
    return FixResult(
        cues=out,
        changed=changed,
        chunks=len(chunks),
        warnings=[warnings[n] for n in sorted(warnings)],
        retries=retries,
        kept=kept,
    )


def _refusal(exc: BaseException) -> EgressRefusedError | None:
    """The egress refusal behind `exc` (an APIConnectionError), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, EgressRefusedError) and not isinstance(seen, HostUnresolvedError):
            return seen
        seen = seen.__cause__
    return None


def _describe(exc: openai.APIError, api_key: str) -> str:
    """The error for a job's `error`; the server's own words with the key blotted out, since a
    server may quote the key it was sent."""
    if isinstance(exc, openai.AuthenticationError):
        return "authentication failed (HTTP 401): check the API key"
    if isinstance(exc, openai.APIStatusError):
        text = f"HTTP {exc.status_code}: {exc.message}"
    else:
        text = f"{type(exc).__name__}: {exc.message}"
    return text if api_key == NO_KEY else text.replace(api_key, "[the API key]")
