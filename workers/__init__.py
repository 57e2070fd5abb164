"""Workers: take jobs of a pool from JetStream, run their operations, publish events."""

from workers._context import Handler, JobContext, Reporter
from workers._errors import JobCancelledError, PermanentError, Retry, WorkerError
from workers._registry import HANDLERS, handlers_for_pool
from workers._runtime import Worker
from workers._settings import WorkerSettings

__all__ = [
    "HANDLERS",
    "Handler",
    "JobCancelledError",
    "JobContext",
    "PermanentError",
    "Reporter",
    "Retry",
    "Worker",
    "WorkerError",
    "WorkerSettings",
    "handlers_for_pool",
]
