"""API settings: one typed object, read from the environment once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from streams import (
    DEFAULT_LLM_BASE_URL,
    LlmEndpoints,
    admin_key_from_env,
    env_float,
    env_int,
    llm_allowlist,
    nats_servers,
    stored_secret,
    stream_replicas,
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the API process reads from its environment."""

    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("JOBCAST_DATA_DIR", "jobcast-data")))
    """JOBCAST_DATA_DIR: where the SQLite database (and, under `serve`, the NATS store) live."""
    nats_url: str = field(default_factory=lambda: os.environ.get("JOBCAST_NATS_URL", "nats://127.0.0.1:4222"))
    """JOBCAST_NATS_URL: the NATS server, or a cluster's nodes comma-separated, that the API publishes to;
    it fails over between them. JOBCAST_STREAM_REPLICAS (read by streams/) sets how many keep a copy."""
    database_url: str = field(default_factory=lambda: os.environ.get("JOBCAST_DATABASE_URL", ""))
    """JOBCAST_DATABASE_URL: a SQLite SQLAlchemy URL; empty means sqlite+aiosqlite under the data dir."""
    host: str = field(default_factory=lambda: os.environ.get("JOBCAST_HOST", "127.0.0.1"))
    """JOBCAST_HOST: address the API binds."""
    port: int = field(default_factory=lambda: env_int("JOBCAST_PORT", 8000))
    """JOBCAST_PORT: port the API binds."""
    local_owner: str = field(default_factory=lambda: os.environ.get("JOBCAST_LOCAL_OWNER", "local"))
    """JOBCAST_LOCAL_OWNER: the owner of every job while no API keys are configured."""
    asr_model: str = field(default_factory=lambda: os.environ.get("JOBCAST_ASR_MODEL") or "tiny.en")
    """JOBCAST_ASR_MODEL (whisper-asr-webservice's ASR_MODEL): the faster-whisper model name or path the
    speech routes run (`/asr`, `/detect-language`, and OpenAI's `whisper-1`); the bundled tiny.en by
    default. A model named as English-only (`english_only` in app/_speech.py) makes those routes refuse
    `translate` and other languages with a 400."""
    sse_ping_s: float = field(default_factory=lambda: env_float("JOBCAST_SSE_PING_S", 15.0))
    """JOBCAST_SSE_PING_S: keep-alive comment interval on idle SSE streams."""
    submit_timeout_s: float = field(default_factory=lambda: env_float("JOBCAST_SUBMIT_TIMEOUT_S", 10.0))
    """JOBCAST_SUBMIT_TIMEOUT_S: how long a submit waits for its own projection before 503."""
    max_request_bytes: int = field(default_factory=lambda: env_int("JOBCAST_MAX_REQUEST_KB", 1024) * 1024)
    """JOBCAST_MAX_REQUEST_KB: the largest JSON request body; 413 beyond (uploads have their own limit)."""
    max_upload_bytes: int = field(default_factory=lambda: env_int("JOBCAST_MAX_UPLOAD_MB", 2048) * 2**20)
    """JOBCAST_MAX_UPLOAD_MB: the largest request (upload) accepted; larger ones get 413."""
    rate_limit_per_minute: int = field(default_factory=lambda: env_int("JOBCAST_RATE_LIMIT_PER_MIN", 6000))
    """JOBCAST_RATE_LIMIT_PER_MIN: requests one key (or the local owner) may make per minute; 429 beyond;
    0 turns the limit off (the queue stats then say so in `limit_enforcement`)."""
    max_streams_per_owner: int = field(default_factory=lambda: env_int("JOBCAST_MAX_STREAMS", 200))
    """JOBCAST_MAX_STREAMS: SSE, WebSocket and long-poll connections one key may hold open; 429 beyond;
    0 turns the quota off."""
    webhook_secret: str = field(default_factory=lambda: os.environ.get("JOBCAST_WEBHOOK_SECRET", ""))
    """JOBCAST_WEBHOOK_SECRET: HMAC-SHA256 key of callback signatures; empty: one generated and kept
    in the data dir."""
    session_secret: str = field(
        default_factory=lambda: os.environ.get("JOBCAST_SESSION_SECRET", ""), repr=False
    )
    """JOBCAST_SESSION_SECRET: HMAC key of session cookies and `?token=` links, never used for anything
    else; empty: one generated and kept in the data dir. Changing it ends every session."""
    admin_key: str | None = field(default_factory=admin_key_from_env, repr=False)
    """JOBCAST_ADMIN_KEY or JOBCAST_ADMIN_KEY_FILE: an admin key stored (hashed) as the key named
    `admin` at start-up, so a fresh deployment has a key from its first start."""
    webhook_tries: int = field(default_factory=lambda: env_int("JOBCAST_WEBHOOK_TRIES", 5))
    """JOBCAST_WEBHOOK_TRIES: deliveries attempted before a callback counts as failed."""
    webhook_backoff_s: float = field(default_factory=lambda: env_float("JOBCAST_WEBHOOK_BACKOFF_S", 1.0))
    """JOBCAST_WEBHOOK_BACKOFF_S: wait after the first failed delivery; doubles each time."""
    webhook_timeout_s: float = field(default_factory=lambda: env_float("JOBCAST_WEBHOOK_TIMEOUT_S", 10.0))
    """JOBCAST_WEBHOOK_TIMEOUT_S: how long one delivery may take."""
    webhook_allow_loopback: bool = field(
        default_factory=lambda: os.environ.get("JOBCAST_WEBHOOK_ALLOW_LOOPBACK") == "1"
    )
    """JOBCAST_WEBHOOK_ALLOW_LOOPBACK=1: callbacks may go to this machine (always so in local mode)."""
    webhook_allow_private: bool = field(
        default_factory=lambda: os.environ.get("JOBCAST_WEBHOOK_ALLOW_PRIVATE") == "1"
    )
    """JOBCAST_WEBHOOK_ALLOW_PRIVATE=1: callbacks may go to private network addresses."""
    webhook_sweep_s: float = field(default_factory=lambda: env_float("JOBCAST_WEBHOOK_SWEEP_S", 30.0))
    """JOBCAST_WEBHOOK_SWEEP_S: how often undelivered callbacks (their sender died) are looked for."""
    retention_days: float = field(default_factory=lambda: env_float("JOBCAST_RETENTION_DAYS", 30.0))
    """JOBCAST_RETENTION_DAYS: completed and cancelled jobs are deleted (their stream subjects purged)
    this long after they ended; 0 keeps every job."""
    retention_failed_days: float = field(
        default_factory=lambda: env_float("JOBCAST_RETENTION_FAILED_DAYS", 90.0)
    )
    """JOBCAST_RETENTION_FAILED_DAYS: failed jobs are kept longer, for analysis; 0 keeps them."""
    retention_files: bool = field(
        default_factory=lambda: os.environ.get("JOBCAST_RETENTION_FILES", "1") != "0"
    )
    """JOBCAST_RETENTION_FILES=0: the retention sweep leaves the files a job produced (default: they
    go with it; uploads always stay until deleted)."""
    retention_sweep_s: float = field(default_factory=lambda: env_float("JOBCAST_RETENTION_SWEEP_S", 3600.0))
    """JOBCAST_RETENTION_SWEEP_S: how often the retention sweep runs (every API instance runs it;
    two at once are harmless)."""
    storage_check_s: float = field(default_factory=lambda: env_float("JOBCAST_STORAGE_CHECK_S", 1.0))
    """JOBCAST_STORAGE_CHECK_S: how long one look at the stream's size serves the admission check
    while the stream is below half of the share new work may fill (past it, every submission looks)."""
    tombstone_ttl_s: float = field(default_factory=lambda: env_float("JOBCAST_TOMBSTONE_TTL_S", 7 * 86400.0))
    """JOBCAST_TOMBSTONE_TTL_S: how long a deleted job's tombstone stays in the stream: API instances
    that were behind see the delete through it, and a `client_request_id` reused meanwhile gets a
    new job. An API instance stopped for longer than this must rebuild its database."""
    client_buffer_bytes: int = field(default_factory=lambda: env_int("JOBCAST_CLIENT_BUFFER_KB", 1024) * 1024)
    """JOBCAST_CLIENT_BUFFER_KB: events one SSE, WebSocket or long-poll client may still have waiting
    for its socket when the next batch of events arrives; a client further behind is cut off and
    resumes by sequence. One batch (up to 1,000 events) may come on top, so a burst alone never cuts
    off a client that keeps up."""
    slow_client_grace_s: float = field(default_factory=lambda: env_float("JOBCAST_SLOW_CLIENT_GRACE_S", 10.0))
    """JOBCAST_SLOW_CLIENT_GRACE_S: how long a cut-off client gets to take its goodbye (the end of its
    SSE stream, WebSocket close 4008) before its connection is dropped without one."""
    ws_max_jobs: int = field(default_factory=lambda: env_int("JOBCAST_WS_MAX_JOBS", 1000))
    """JOBCAST_WS_MAX_JOBS: job ids one /api/v1/ws connection may subscribe to (`all` counts as none)."""
    projection_queue: int = field(default_factory=lambda: env_int("JOBCAST_PROJECTION_QUEUE", 10_000))
    """JOBCAST_PROJECTION_QUEUE: stream messages received but not yet applied; past it the projection
    stops its consumer and, once it has applied what it holds, resumes from there."""
    projection_queue_bytes: int = field(
        default_factory=lambda: env_int("JOBCAST_PROJECTION_QUEUE_MB", 32) * 2**20
    )
    """JOBCAST_PROJECTION_QUEUE_MB: the same bound in payload bytes."""

    llm_base_url: str = field(
        default_factory=lambda: os.environ.get("JOBCAST_LLM_BASE_URL", DEFAULT_LLM_BASE_URL)
    )
    """JOBCAST_LLM_BASE_URL: the LLM workers' own endpoint, which a job may always name."""
    llm_allowed_base_urls: tuple[str, ...] = field(
        default_factory=lambda: llm_allowlist(os.environ.get("JOBCAST_LLM_ALLOWED_BASE_URLS", ""))
    )
    """JOBCAST_LLM_ALLOWED_BASE_URLS (comma-separated): the other LLM endpoints a job may name as
    `base_url`; the LLM workers get the same list. Any other gets 422."""

    def __post_init__(self) -> None:
        nats_servers(self.nats_url)  # a malformed setting stops the start with one line (ValueError)
        stream_replicas()
        if self.database_url:
            _check_sqlite(self.database_url)

    @property
    def llm_endpoints(self) -> LlmEndpoints:
        """The LLM endpoints a job may name."""
        return LlmEndpoints(configured=self.llm_base_url, listed=self.llm_allowed_base_urls)

    def signing_key(self) -> bytes:
        """The webhook secret; generated once and stored in the data dir when not configured."""
        if self.webhook_secret:
            return self.webhook_secret.encode()
        return stored_secret(self.data_dir / "webhook-secret").encode()

    def session_key(self) -> bytes:
        """The session-token secret; generated once and stored in the data dir when not configured."""
        if self.session_secret:
            return self.session_secret.encode()
        return stored_secret(self.data_dir / "session-secret").encode()

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to a file in the data dir."""
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'jobcast.db').resolve()}"


def _check_sqlite(url: str) -> None:
    """The projection is SQLite's (one writer, WAL, the lean statements' SQL): another database's
    URL stops the start with one line, not at the first batch (the URL's password left out)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("JOBCAST_DATABASE_URL: not a SQLAlchemy URL") from None
    if (parsed.get_backend_name(), parsed.get_driver_name()) != ("sqlite", "aiosqlite"):
        raise ValueError(
            f"JOBCAST_DATABASE_URL: jobcast keeps its projection in SQLite through aiosqlite "
            f"(sqlite+aiosqlite:///path/jobcast.db), not {parsed.drivername}"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
