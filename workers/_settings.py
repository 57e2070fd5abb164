"""Worker settings, read from the environment once."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from streams import (
    DEFAULT_LLM_BASE_URL,
    MAX_INLINE_TEXT_BYTES,
    AddressPolicy,
    LlmEndpoints,
    cache_max_bytes,
    env_float,
    env_int,
    llm_allowlist,
    nats_servers,
    stream_replicas,
)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker process connects and paces itself."""

    pool: str = "cpu"
    """The pool whose jobs this worker takes (gpu, cpu, llm)."""
    nats_url: str = field(default_factory=lambda: os.environ.get("JOBCAST_NATS_URL", "nats://127.0.0.1:4222"))
    """JOBCAST_NATS_URL: the NATS server, or a cluster's nodes comma-separated; the worker fails over
    between them."""
    concurrency: int = 0
    """Jobs run at once; 0 means the pool's default (1 for gpu/cpu, MAX_LLM_CONCURRENCY for llm)."""
    ack_wait_s: float = field(default_factory=lambda: env_float("JOBCAST_ACK_WAIT_S", 30.0))
    """JOBCAST_ACK_WAIT_S: how long a dead worker's job waits before it is redelivered."""
    grace_s: float = field(default_factory=lambda: env_float("JOBCAST_WORKER_GRACE_S", 30.0))
    """JOBCAST_WORKER_GRACE_S: on SIGTERM, how long running jobs may finish before they are requeued."""
    cancel_grace_s: float = 1.0
    """After a cancel request or the run-time limit, how long a handler may take to notice before
    its task is cancelled."""
    stop_wait_s: float = field(default_factory=lambda: env_float("JOBCAST_STOP_WAIT_S", 30.0))
    """JOBCAST_STOP_WAIT_S: how long a stopped job's thread (whisper, PyAV) may take to reach its
    next cancel check before the job's end is published anyway; its slot stays taken until then."""
    publish_retry_s: float = field(default_factory=lambda: env_float("JOBCAST_PUBLISH_RETRY_S", 60.0))
    """JOBCAST_PUBLISH_RETRY_S: how long publishing an event rides out transient errors (a broker
    restart) before the attempt is given up and its message left to JetStream to redeliver."""
    llm_concurrency: int = field(
        default_factory=lambda: env_int("MAX_LLM_CONCURRENCY", env_int("JOBCAST_LLM_CONCURRENCY", 4))
    )
    """MAX_LLM_CONCURRENCY (or JOBCAST_LLM_CONCURRENCY): HTTP requests to the LLM in flight at once
    per worker process, across all its jobs; a request waiting out a retry's backoff holds none.
    Also the llm pool's default number of jobs at once (`slots`), and each job's chunks under way
    at once, so that concurrent jobs take the requests in turn rather than one job queueing all."""
    retry_base_s: float = field(default_factory=lambda: env_float("JOBCAST_RETRY_BASE_S", 2.0))
    """JOBCAST_RETRY_BASE_S: first backoff step for transient failures (doubles, with jitter)."""
    retry_max_s: float = 300.0
    """Longest backoff between two attempts."""
    llm_base_url: str = field(
        default_factory=lambda: os.environ.get("JOBCAST_LLM_BASE_URL", DEFAULT_LLM_BASE_URL)
    )
    """JOBCAST_LLM_BASE_URL: the OpenAI-compatible endpoint of fix_srt; trusted as configured, so it
    may be on this machine or the private network (a local vLLM or ollama)."""
    llm_allowed_base_urls: tuple[str, ...] = field(
        default_factory=lambda: llm_allowlist(os.environ.get("JOBCAST_LLM_ALLOWED_BASE_URLS", ""))
    )
    """JOBCAST_LLM_ALLOWED_BASE_URLS (comma-separated): the other endpoints a job may name as
    `base_url`; each is resolved before every request and refused on a non-public address unless
    allowed below."""
    llm_allow_loopback: bool = field(
        default_factory=lambda: os.environ.get("JOBCAST_LLM_ALLOW_LOOPBACK") == "1"
    )
    """JOBCAST_LLM_ALLOW_LOOPBACK=1: a job's listed endpoint may be on this machine."""
    llm_allow_private: bool = field(
        default_factory=lambda: os.environ.get("JOBCAST_LLM_ALLOW_PRIVATE") == "1"
    )
    """JOBCAST_LLM_ALLOW_PRIVATE=1: a job's listed endpoint may be on a private network address."""
    llm_api_key: str = field(
        default_factory=lambda: os.environ.get("JOBCAST_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
    )
    """JOBCAST_LLM_API_KEY (or OPENAI_API_KEY)."""
    llm_model: str = field(default_factory=lambda: os.environ.get("JOBCAST_LLM_MODEL", "gpt-4o-mini"))
    """JOBCAST_LLM_MODEL: the chat model of fix_srt."""
    inline_text_bytes: int = MAX_INLINE_TEXT_BYTES
    """How much of a transcript's text its result carries inline (JSON bytes, at most
    MAX_INLINE_TEXT_BYTES); the rest is in its .txt output."""
    cache_max_bytes: int = field(default_factory=cache_max_bytes)
    """JOBCAST_CACHE_MAX_BYTES: the bound of the stage cache's bytes in NATS (its KV bucket and
    object store), past which a worker storing an entry evicts the least recently used down to 90%
    of it (default 2 GiB; 0: no lookups, no stores).
    Every worker of a deployment should agree."""
    idle_poll_s: float = 0.5
    """With nothing to do, how often to look for redeliveries and retries (which ring no bell)."""
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    """Shown in `started` events as the worker that took the job."""

    def __post_init__(self) -> None:
        nats_servers(self.nats_url)  # a malformed setting stops the start with one line (ValueError)
        stream_replicas()

    @property
    def llm_endpoints(self) -> LlmEndpoints:
        """The LLM endpoints a job may name."""
        return LlmEndpoints(configured=self.llm_base_url, listed=self.llm_allowed_base_urls)

    @property
    def llm_address_policy(self) -> AddressPolicy:
        """Where a job's (listed, not configured) LLM endpoint may resolve to."""
        return AddressPolicy(allow_loopback=self.llm_allow_loopback, allow_private=self.llm_allow_private)

    @property
    def slots(self) -> int:
        """How many jobs run at once."""
        if self.concurrency > 0:
            return self.concurrency
        return self.llm_concurrency if self.pool == "llm" else 1
