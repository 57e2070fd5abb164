"""The contract's exceptions: one root, one class per error."""

from __future__ import annotations


class JobcastError(Exception):
    """Root of every jobcast error."""


class UnknownOperationError(JobcastError):
    """The job names an operation jobcast does not have."""

    def __init__(self, job_type: str, known: list[str]) -> None:
        super().__init__(f"type: unknown operation {job_type!r}; known operations: {', '.join(known)}")
        self.job_type = job_type


class InvalidParamsError(JobcastError):
    """The job's params do not match its operation's schema."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class NatsServerError(JobcastError):
    """The embedded nats-server could not be started."""


class ReplicasError(JobcastError):
    """JOBCAST_STREAM_REPLICAS asks for more copies than the NATS deployment can keep (one server, or
    fewer JetStream nodes than replicas)."""
