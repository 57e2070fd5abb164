"""`jobcast` command line. Imports the API or worker code only for the subcommand that runs it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import sys
from pathlib import Path

from jobcast.logs import configure
from jobcast.stages import add_stage_arguments


def _serve(args: argparse.Namespace) -> int:
    from jobcast.keys import CONFIGURATION_ERROR, ConfigurationError
    from jobcast.supervisor import Supervisor, default_pools

    pools = args.pools.split(",") if args.pools else default_pools()
    try:
        supervisor = Supervisor(Path(args.data_dir), args.host, args.port, args.nats_port, pools)
    except ValueError as exc:  # an unusable secret file in the data dir, or JOBCAST_STREAM_REPLICAS
        print(f"jobcast: {exc}", file=sys.stderr)
        return CONFIGURATION_ERROR
    try:
        return asyncio.run(supervisor.run())
    except ConfigurationError as exc:
        print(f"jobcast: {exc}", file=sys.stderr)
        return CONFIGURATION_ERROR


def without_pydantic() -> None:
    """Keep pydantic out of this process (the API's): Litestar then skips its pydantic plugins.

    pydantic is installed for the llm worker's openai client; the API has no use for it, but
    `Litestar()` imports it to register its pydantic plugins whenever it can be imported, and
    offers no setting to leave them out. That costs 8 MB of the API's 80 MB budget (P6, idle
    after 200 jobs: 78.6 MB without it, 86.7 MB with it). A `None` in `sys.modules` is Python's
    documented way to make an import fail with ModuleNotFoundError (the language reference, "The
    module cache"), which Litestar takes as pydantic not being installed. Call it before anything
    imports Litestar.
    """
    sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]


API_GC_THRESHOLDS = (20_000, 20, 10)
"""The API process's `gc.set_threshold` (see `_api`)."""


def _api(args: argparse.Namespace) -> int:
    without_pydantic()
    import uvicorn

    from app import Settings, create_app
    from jobcast.keys import CONFIGURATION_ERROR, ConfigurationError, check_public_bind
    from jobcast.lifeline import watch_parent

    try:
        settings = Settings()
        host = args.host or settings.host
        port = args.port or settings.port
        settings = dataclasses.replace(settings, host=host, port=port)
        settings.session_key(), settings.signing_key()  # an unusable secret file: one line, not a traceback
        # The app refuses this too, but from its lifespan, which uvicorn reports with a
        # traceback and exit status 3; asked first, the answer is one line and status 2.
        asyncio.run(check_public_bind(host, settings.nats_url))
    except (ValueError, ConfigurationError) as exc:  # ValueError: a setting Settings() rejects
        print(f"jobcast: {exc}", file=sys.stderr)
        return CONFIGURATION_ERROR
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, lifespan="on", log_level=args.log_level.lower(),
        access_log=False, timeout_keep_alive=30, ws="websockets-sansio", ws_max_size=64 * 1024, timeout_graceful_shutdown=5,
    )  # fmt: skip
    # Everything imported and built so far lives as long as the process: frozen, full collections
    # (which thousands of idle SSE/WS connections already make long) need not walk it again.
    gc.collect()
    gc.freeze()
    # A young collection every 20,000 allocations, not CPython's 700, and the older generations in
    # step: each collection walks every request and connection still in flight. At 10k SSE
    # connections the default thresholds cost 5 CPU seconds of P3's own-job run (the connects'
    # growth alone set off 14 full collections of ~300 ms, each a pause for every stream).
    # CPython still collects in full once a quarter of the long-lived objects are new since the last.
    gc.set_threshold(*API_GC_THRESHOLDS)
    server = uvicorn.Server(config)

    def parent_gone() -> None:
        server.should_exit = True  # read by uvicorn's main loop on its next tick

    watch_parent(parent_gone)
    server.run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from jobcast.keys import CONFIGURATION_ERROR
    from jobcast.lifeline import PARENT_GONE_GRACE_S, watch_parent
    from workers import Worker, WorkerSettings

    try:
        settings = WorkerSettings(pool=args.pool, concurrency=args.concurrency)
    except ValueError as exc:  # a malformed JOBCAST_NATS_URL or JOBCAST_STREAM_REPLICAS
        print(f"jobcast: {exc}", file=sys.stderr)
        return CONFIGURATION_ERROR

    async def run() -> None:
        worker = Worker(settings)
        worker.install_signal_handlers()
        loop = asyncio.get_running_loop()

        def stop_soon() -> None:
            # Nobody waits for this worker any more: its jobs get a short grace, and those
            # unfinished are redelivered to the next worker.
            worker.settings = dataclasses.replace(worker.settings, grace_s=PARENT_GONE_GRACE_S)
            worker.request_stop()

        def parent_gone() -> None:  # called from the lifeline's thread
            loop.call_soon_threadsafe(stop_soon)

        watch_parent(parent_gone)
        await worker.run()

    asyncio.run(run())
    return 0


def _keys(args: argparse.Namespace) -> int:
    from jobcast.keys import run

    return asyncio.run(
        run(args.action, getattr(args, "name", None), getattr(args, "admin", False), Path(args.data_dir))
    )


def _client_command(args: argparse.Namespace) -> int:
    from jobcast import client as c
    from jobcast.stages import resolve

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise in a terminal

    try:
        api = c.Client(*c.connection(args.server, args.key))
        match args.command:
            case "submit":
                stages = resolve(args.stages)  # before any upload: an unknown op or param is one line
                return c.submit(api, [Path(f) for f in args.files], stages, args.watch, args.out)
            case "jobs":
                return c.list_jobs(api, args.status, args.type, args.limit)
            case "watch":
                return c.follow(api, [api.call("GET", f"/api/v1/jobs/{args.id}")], args.out)
            case "cancel" | "retry":
                job = api.call("POST", f"/api/v1/jobs/{args.id}/{args.command}")
                print(f"{job['id']} {job['status']} ({job['current_step']})")
            case "rm":
                api.call("DELETE", f"/api/v1/jobs/{args.id}", params={"files": "true"} if args.files else {})
                print(f"{args.id} deleted")
        return 0
    except (c.ClientError, OSError) as exc:
        print(f"jobcast: {exc}", file=sys.stderr)
        return 1


def _events(args: argparse.Namespace) -> int:
    from jobcast.replay import replay

    return asyncio.run(replay(args.job_id, Path(args.data_dir), follow=args.follow))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jobcast", description="A self-hosted job server on NATS JetStream."
    )
    parser.add_argument("--log-level", default=os.environ.get("JOBCAST_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=os.environ.get("JOBCAST_LOG_FORMAT", "text"),
        help="json: one object a line, with job_id where a record is about a job",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run NATS, the API and one worker per pool on this machine")
    serve.add_argument("--host", default=os.environ.get("JOBCAST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("JOBCAST_PORT", "8000")))
    serve.add_argument("--data-dir", default=os.environ.get("JOBCAST_DATA_DIR", "jobcast-data"))
    serve.add_argument("--nats-port", type=int, default=0, help="embedded NATS client port (0: a free one)")
    serve.add_argument("--pools", default="", help="comma-separated pools to run workers for (default: all)")
    serve.set_defaults(func=_serve)

    api = sub.add_parser("api", help="run the HTTP API against JOBCAST_NATS_URL")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a worker of one pool against JOBCAST_NATS_URL")
    worker.add_argument("--pool", required=True, choices=["gpu", "cpu", "llm"])
    worker.add_argument("--concurrency", type=int, default=0, help="jobs at once (default: the pool's)")
    worker.set_defaults(func=_worker)
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--server", help="server URL (JOBCAST_SERVER, or `server` in the config file)")
    client.add_argument("--key", help="API key (JOBCAST_KEY, or `key` in the config file)")
    submit = sub.add_parser(
        "submit", parents=[client],
        help="upload files and submit a job (a batch for several; a pipeline per file with --then)",
    )  # fmt: skip
    submit.add_argument("files", nargs="+")
    add_stage_arguments(submit)
    submit.add_argument("--watch", action="store_true", help="show live progress until the job ends")
    submit.add_argument("--out", type=Path, help="download the outputs into this folder (with --watch)")
    jobs = sub.add_parser("jobs", parents=[client], help="list recent jobs")
    jobs.add_argument("--status", action="append", default=[])
    jobs.add_argument("--type")
    jobs.add_argument("--limit", type=int, default=20)
    watch = sub.add_parser("watch", parents=[client], help="follow a job live")
    watch.add_argument("id")
    watch.add_argument("--out", type=Path)
    for name, text in (
        ("cancel", "cancel a job"),
        ("retry", "retry a failed or cancelled job"),
        ("rm", "delete a job"),
    ):
        command = sub.add_parser(name, parents=[client], help=text)
        command.add_argument("id")
        if name == "rm":
            command.add_argument("--files", action="store_true", help="also delete the files it produced")
    for name in ("submit", "jobs", "watch", "cancel", "retry", "rm"):
        sub.choices[name].set_defaults(func=_client_command)

    keys = sub.add_parser("keys", help="manage API keys (a server must be running)")
    keys.add_argument("--data-dir", default=os.environ.get("JOBCAST_DATA_DIR", "jobcast-data"))
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="the key's name, which is also its owner")
    create.add_argument("--admin", action="store_true", help="may use the admin routes and see every owner")
    actions.add_parser("list", help="list keys (names and roles, never the keys)")
    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    keys.set_defaults(func=_keys)

    events = sub.add_parser("events", help="read a job's messages straight from JetStream")
    events.add_argument("--data-dir", default=os.environ.get("JOBCAST_DATA_DIR", "jobcast-data"))
    event_actions = events.add_subparsers(dest="action", required=True)
    replay_cmd = event_actions.add_parser(
        "replay", help="print a job's messages in stream order, one JSON a line"
    )
    replay_cmd.add_argument("job_id")
    replay_cmd.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    events.set_defaults(func=_events)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jobcast` console script."""
    args = build_parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    result: int = args.func(args)
    return result
