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
from app._stats import Stats

# Dependencies Litestar finds at the same depth are resolved concurrently, in an anyio task group
# with a task each, which cost more per request than the lookups themselves (P2's profile: about
# 9 % of the API's CPU, in the task group, sniffio and current_task). So each provider depends on
# the one before it in one chain (queries, owner, access, commands, live, files, stats, retention),
# and whatever a handler asks for resolves one after the other. The unused parameter is that link.


def provide_queries(state: State) -> JobQueries:
    """The process's JobQueries (built in the lifespan)."""
    queries: JobQueries = state.queries
    return queries


def provide_owner(scope: Scope, queries: Queries) -> str:
    """Whose jobs the caller sees (the authenticated key's name, or the local owner)."""
    del queries  # the chain's link (see above)
    caller: Caller = scope["user"]
    return caller.owner


def provide_access(scope: Scope, owner: Owner) -> str | None:
    """Whose jobs the caller may read and act on by id: its own, or any owner's (None) for an admin
    (seed 003's "ownership or admin access")."""
    del owner
    caller: Caller = scope["user"]
    return None if caller.admin else caller.owner


def provide_commands(state: State, access: Access) -> JobCommands:
    """The process's JobCommands."""
    del access
    commands: JobCommands = state.commands
    return commands


def provide_live(state: State, commands: Commands) -> Live:
    """The process's Live part (following jobs, stream quotas)."""
    del commands
    live: Live = state.live
    return live


def provide_files(state: State, live: LiveDep) -> FileService:
    """The process's FileService."""
    del live
    files: FileService = state.files
    return files


def provide_stats(state: State, files: FilesDep) -> Stats:
    """The process's Stats reader."""
    del files
    stats: Stats = state.stats
    return stats


def provide_retention(state: State, stats: StatsDep) -> Retention:
    """The process's Retention (deletes jobs, runs the retention sweep)."""
    del stats
    retention: Retention = state.retention
    return retention


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
