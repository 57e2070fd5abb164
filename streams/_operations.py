"""Operation specs: each job type's pool, params schema and retry default.

The API validates params against these before publishing, so it needs no worker code;
workers map the same type names to handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec

from streams._config import Pool
from streams._errors import InvalidParamsError, UnknownOperationError

P = TypeVar("P", bound=msgspec.Struct)


class NoopParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A diagnostic job for health checks, tests and benchmarks."""

    duration_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0
    """Total time the job takes, spread over its steps."""
    steps: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 10
    """How many progress updates it makes."""
    fail: bool = False
    """Fail permanently with `error` once the steps are done."""
    error: Annotated[str, msgspec.Meta(max_length=2000)] = "noop failed on request"
    """The failure message for `fail` and `fail_times`."""
    fail_times: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    """Fail transiently on the first N deliveries (for retry tests)."""


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """What the API needs to know about an operation."""

    name: str
    pool: Pool
    params: type[msgspec.Struct]
    description: str
    max_attempts: int = 3
    """Default number of runs before a transiently failing job is failed for good."""


OPERATIONS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        OperationSpec(
            name="noop",
            pool=Pool.CPU,
            params=NoopParams,
            description="Sleeps through `steps` progress updates; can fail on request.",
        ),
    )
}


def operation(job_type: str) -> OperationSpec:
    """The spec of `job_type`; raises UnknownOperationError."""
    try:
        return OPERATIONS[job_type]
    except KeyError:
        raise UnknownOperationError(job_type, sorted(OPERATIONS)) from None


def validate_params(spec: OperationSpec, params: dict[str, Any] | None) -> dict[str, Any]:
    """Params checked against the spec, with defaults filled in; raises InvalidParamsError."""
    try:
        parsed: msgspec.Struct = msgspec.convert(params or {}, spec.params)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(_located(exc)) from None
    result: dict[str, Any] = msgspec.to_builtins(parsed)
    return result


def parse_params(params: dict[str, Any], params_type: type[P]) -> P:
    """Typed params for a handler; raises InvalidParamsError."""
    try:
        return msgspec.convert(params, params_type)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(_located(exc)) from None


def _located(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with its path rooted at `params` (errors at the root name none)."""
    message = str(exc)
    if " - at `$" not in message:
        return f"{message} - at `$.params`"
    return message.replace(" - at `$", " - at `$.params", 1)
