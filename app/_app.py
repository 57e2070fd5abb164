"""The Litestar application and its lifespan: SQLite, NATS, the projection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from app._auth import (
    UI_PREFIX,
    AuthMiddleware,
    Keys,
    LoginRequired,
    provision_admin_key,
)
from app._commands import JobCommands
from app._db import Database
from app._deps import DEPENDENCIES
from app._eta import EtaBoard
from app._exceptions import ERROR_HANDLERS, document_errors, log_unexpected, send_request_id
from app._files import FileService
from app._freshness import Freshness, FreshnessMiddleware
from app._hub import Hub
from app._live import Live
from app._metrics import Metrics
from app._params_doc import OperationParamsSchema
from app._projection import Projection
from app._publisher import Publisher
from app._queries import JobQueries
from app._query import QueryCheck
from app._ratelimit import RateLimit
from app._retention import Retention
from app._settings import Settings, get_settings
from app._stats import Stats
from app._templates import LazyJinjaEngine
from app._webhooks import Webhooks
from app.controllers.admin import AdminController
from app.controllers.auth import AuthController
from app.controllers.compileo import CompileoController
from app.controllers.files import FileController
from app.controllers.health import HealthController
from app.controllers.jobs import JobController
from app.controllers.live import LiveController
from app.controllers.metrics import MetricsController
from app.controllers.openai_audio import OpenAIAudioController
from app.controllers.pipelines import PipelineController
from app.controllers.queue import QueueController
from app.controllers.ui import UiController, login_redirect, to_ui
from app.controllers.whisper_asr import WhisperAsrController
from streams import TaskSupervisor, close_quietly, connect, ensure_jetstream, files_store, is_loopback

log = logging.getLogger("jobcast.api")

UI_FILES = Path(__file__).resolve().parent
UPLOAD_OPERATIONS = {"uploadFile", "createTranscription", "asr", "detectLanguage"}
"""Routes whose bodies are media files, limited by JOBCAST_MAX_UPLOAD_MB instead."""


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the API; resources are acquired in the lifespan, not at import."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.sqlalchemy_url)
        await db.create_all()
        nc = await connect(settings.nats_url, name="jobcast-api")
        # The projection, the key watch and the webhook sweep: restarted when they fail; /ready
        # answers 503 while one is down.
        app.state.tasks = tasks = TaskSupervisor()
        projection: Projection | None = None
        webhooks: Webhooks | None = None
        live: Live | None = None
        commands: JobCommands | None = None
        try:
            js = nc.jetstream()
            await ensure_jetstream(js)
            hub = Hub(settings.client_buffer_bytes)
            projection = Projection(
                db, hub, app.state.metrics, settings.projection_queue, settings.projection_queue_bytes
            )
            await projection.start(js, tasks)
            app.state.nats = nc
            app.state.projection = projection
            publisher = Publisher(settings, db, js, projection, hub)
            eta = EtaBoard(js)
            eta.start(tasks)  # task `eta-watch`: learned speeds and live slots, for estimated starts
            app.state.queries = queries = JobQueries(db, eta)
            app.state.commands = commands = JobCommands(publisher, queries)
            commands.pipelines.starter.start(tasks)  # task `pipelines`: each pipeline's next stage
            app.state.live = live = Live(settings, hub, queries)
            app.state.freshness = Freshness(db, js, projection, settings.submit_timeout_s)
            if settings.admin_key:
                await provision_admin_key(js, settings.admin_key)
            app.state.api_keys = keys = Keys(js)
            await keys.start(tasks)
            if keys.empty and not is_loopback(settings.host):
                raise RuntimeError(
                    f"refusing to serve on {settings.host} without API keys: anyone who can reach it would "
                    "have admin rights. Set JOBCAST_ADMIN_KEY (or JOBCAST_ADMIN_KEY_FILE), create a key with "
                    "`jobcast keys create --name NAME --admin`, or bind 127.0.0.1."
                )
            app.state.stats = stats = Stats(db, js, settings)
            stats.start(tasks)
            app.state.files = files = FileService(
                publisher, await files_store(js), settings.data_dir / "cache"
            )
            webhooks = Webhooks(publisher, queries)
            webhooks.local_mode = lambda: keys.empty and is_loopback(settings.host)
            await webhooks.start(tasks)
            app.state.retention = Retention(publisher, files)
            app.state.retention.start(tasks)
            yield
        finally:
            await tasks.stop()
            if webhooks is not None:
                await webhooks.stop()
            if commands is not None:
                commands.pipelines.starter.stop()
            if live is not None:
                await live.sse.close()
            if projection is not None:
                await projection.stop()
            await close_quietly(nc)
            await db.dispose()

    app = Litestar(
        route_handlers=[
            JobController,
            PipelineController,
            LiveController,
            CompileoController,
            QueueController,
            FileController,
            MetricsController,
            AuthController,
            AdminController,
            HealthController,
            OpenAIAudioController,
            WhisperAsrController,
            UiController,
            to_ui,
            create_static_files_router(
                path=f"{UI_PREFIX}/static",
                directories=[UI_FILES / "static"],
                include_in_schema=False,
                opt={"exclude_from_auth": True},
            ),
        ],
        template_config=TemplateConfig(directory=UI_FILES / "templates", engine=LazyJinjaEngine),
        lifespan=[lifespan],
        state=State({"settings": settings, "token_secret": settings.session_key(), "metrics": Metrics()}),
        middleware=[
            DefineMiddleware(  # every method, OPTIONS too: guards and handlers rely on the caller
                AuthMiddleware,
                exclude=["^/health$", "^/ready$", "^/schema", "^/api/v1/auth/login$"],
                exclude_http_methods=[],
            ),
            RateLimit(
                settings.rate_limit_per_minute,
                exclude=["^/health$", "^/ready$", "^/schema", f"^{UI_PREFIX}/static/"],
            ),
            QueryCheck(),  # after the key check: an unknown caller learns nothing about parameters
            FreshnessMiddleware(),  # read-your-writes across API instances (a valid request only)
        ],
        exception_handlers={**ERROR_HANDLERS, LoginRequired: login_redirect},
        after_exception=[log_unexpected],
        before_send=[send_request_id],
        logging_config=None,  # the process's own (JSON) logging stays; Litestar's would replace it
        dependencies=DEPENDENCIES,
        request_max_body_size=settings.max_request_bytes,
        plugins=[OperationParamsSchema()],
        openapi_config=OpenAPIConfig(
            title="jobcast", version="0.1.0", path="/schema", use_handler_docstrings=True
        ),
    )
    document_errors(app)
    for route in app.routes:  # uploads may be large; every other body is small JSON
        for handler in getattr(route, "route_handlers", []):
            if getattr(handler, "operation_id", None) in UPLOAD_OPERATIONS:
                handler.request_max_body_size = settings.max_upload_bytes
    return app
