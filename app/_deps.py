"""Dependencies shared by the controllers."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.types import Scope

from app._auth import Caller
from app._files import FileService
from app._jobs import JobService
from app._retention import Retention
from app._settings import Settings
from app._stats import Stats


def provide_service(state: State) -> JobService:
    """The process's JobService (built in the lifespan)."""
    service: JobService = state.service
    return service


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


def provide_owner(scope: Scope, service: Service) -> str:
    """Whose jobs the caller sees (the authenticated key's name, or the local owner)."""
    # `service` is unused: depending on it makes Litestar resolve the two one after the other.
    # Several dependencies at the same level are resolved in an anyio task group, a task each,
    # which costs more per request than these two lookups.
    del service
    caller: Caller = scope["user"]
    return caller.owner


def provide_access(scope: Scope, service: Service) -> str | None:
    """Whose jobs the caller may read and act on by id: its own, or any owner's (None) for an admin
    (seed 003's "ownership or admin access")."""
    del service  # as in provide_owner: resolved one after the other
    caller: Caller = scope["user"]
    return None if caller.admin else caller.owner


Service = NamedDependency[JobService]
"""A handler parameter receiving the JobService."""

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
    "service": Provide(provide_service, sync_to_thread=False),
    "files": Provide(provide_files, sync_to_thread=False),
    "stats": Provide(provide_stats, sync_to_thread=False),
    "retention": Provide(provide_retention, sync_to_thread=False),
    "owner": Provide(provide_owner, sync_to_thread=False),
    "access": Provide(provide_access, sync_to_thread=False),
}
"""Every handler's dependencies, registered once on the app."""
