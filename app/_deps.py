"""Dependencies shared by the controllers."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.types import Scope

from app._auth import Caller
from app._commands import JobCommands
from app._files import FileService
from app._live import Live
from app._queries import JobQueries
from app._retention import Retention
from app._settings import Settings
from app._stats import Stats


def provide_queries(state: State) -> JobQueries:
    """The process's JobQueries (built in the lifespan)."""
    queries: JobQueries = state.queries
    return queries


def provide_commands(state: State, queries: Queries) -> JobCommands:
    """The process's JobCommands."""
    del queries  # as in provide_owner: resolved after it, in the same batch as owner and access
    commands: JobCommands = state.commands
    return commands


def provide_live(state: State, queries: Queries) -> Live:
    """The process's Live part (following jobs, stream quotas)."""
    del queries  # as in provide_commands
    live: Live = state.live
    return live


def provide_settings(state: State) -> Settings:
    """The process's settings."""
    settings: Settings = state.settings
    return settings


def provide_stats(state: State) -> Stats:
    """The process's Stats reader."""
    stats: Stats = state.stats
    return stats


def provide_files(state: State) -> FileService:
    """The process's FileService."""
    files: FileService = state.files
    return files


def provide_retention(state: State) -> Retention:
    """The process's Retention (deletes jobs, runs the retention sweep)."""
    retention: Retention = state.retention
    return retention


def provide_owner(scope: Scope, queries: Queries) -> str:
    """Whose jobs the caller sees (the authenticated key's name, or the local owner)."""
    # `queries` is unused: depending on it makes Litestar resolve the two one after the other.
    # Several dependencies at the same level are resolved in an anyio task group, a task each,
    # which costs more per request than these lookups.
    del queries
    caller: Caller = scope["user"]
    return caller.owner


def provide_access(scope: Scope, queries: Queries) -> str | None:
    """Whose jobs the caller may read and act on by id: its own, or any owner's (None) for an admin
    (seed 003's "ownership or admin access")."""
    del queries  # as in provide_owner: resolved one after the other
    caller: Caller = scope["user"]
    return None if caller.admin else caller.owner


Queries = NamedDependency[JobQueries]
"""A handler parameter receiving the JobQueries (reads)."""

Commands = NamedDependency[JobCommands]
"""A handler parameter receiving the JobCommands (submit, cancel, retry...)."""

LiveDep = NamedDependency[Live]
"""A handler parameter receiving the Live part (follow, long-poll, SSE, stream quotas)."""

StatsDep = NamedDependency[Stats]
"""A handler parameter receiving the Stats reader."""

FilesDep = NamedDependency[FileService]
"""A handler parameter receiving the FileService."""

RetentionDep = NamedDependency[Retention]
"""A handler parameter receiving the Retention."""

Owner = NamedDependency[str]
"""A handler parameter receiving the caller's owner id."""

Access = NamedDependency[str | None]
"""A handler parameter receiving whose jobs the caller may act on by id (None: any, for admins)."""


DEPENDENCIES = {
    "queries": Provide(provide_queries, sync_to_thread=False),
    "commands": Provide(provide_commands, sync_to_thread=False),
    "live": Provide(provide_live, sync_to_thread=False),
    "files": Provide(provide_files, sync_to_thread=False),
    "stats": Provide(provide_stats, sync_to_thread=False),
    "retention": Provide(provide_retention, sync_to_thread=False),
    "owner": Provide(provide_owner, sync_to_thread=False),
    "access": Provide(provide_access, sync_to_thread=False),
}
"""Every handler's dependencies, registered once on the app."""
