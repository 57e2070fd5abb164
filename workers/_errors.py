"""The worker's protocol exceptions: how a handler tells the runtime what happened."""

from __future__ import annotations


class WorkerError(Exception):
    """Root of the worker's exceptions."""


class Retry(WorkerError):  # noqa: N818 - arq's name for the retry protocol
    """Raise to run the job again later; `defer` seconds, or exponential backoff when None."""

    def __init__(self, reason: str = "retry requested", defer: float | None = None) -> None:
        super().__init__(reason)
        self.defer = defer


class PermanentError(WorkerError):
    """Raise when retrying cannot help (bad input): the job fails at once."""


class JobCancelledError(WorkerError):
    """Raised inside a handler once its job has been cancelled."""


class EventRejectedError(PermanentError):
    """An event that no retry can publish: too big for the server, or refused by the stream."""


class PublishGaveUpError(WorkerError):
    """Publishing an event kept failing transiently (the broker away) for `publish_retry_s`."""
