"""API exceptions, and their mapping to HTTP in one place."""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from streams import InvalidParamsError, JobcastError, UnknownOperationError


class ApiError(JobcastError):
    """Root of the API's own errors."""


class NotFoundError(ApiError):
    """No such resource for this caller (another owner's id looks exactly the same)."""


class ConflictError(ApiError):
    """The resource is in a state that does not allow the request."""


class UnavailableError(ApiError):
    """A dependency (NATS, the projection) is not keeping up; try again."""


STATUS_CODES: dict[type[Exception], int] = {
    NotFoundError: HTTP_404_NOT_FOUND,
    ConflictError: HTTP_409_CONFLICT,
    UnavailableError: HTTP_503_SERVICE_UNAVAILABLE,
    UnknownOperationError: HTTP_422_UNPROCESSABLE_ENTITY,
    InvalidParamsError: HTTP_422_UNPROCESSABLE_ENTITY,
}


def jobcast_error_to_http(_: Request[Any, Any, Any], exc: JobcastError) -> Response[dict[str, object]]:
    """Render a jobcast error as `{status_code, detail}`, like Litestar's own errors."""
    status = next(
        (code for cls, code in STATUS_CODES.items() if isinstance(exc, cls)), HTTP_500_INTERNAL_SERVER_ERROR
    )
    return Response(
        {"status_code": status, "detail": str(exc)}, status_code=status, media_type=MediaType.JSON
    )


def not_found(what: str, ident: str) -> NotFoundError:
    """The one wording of a 404."""
    return NotFoundError(f"{what} {ident} not found")


__all__ = [
    "ApiError",
    "ConflictError",
    "HTTPException",
    "NotFoundError",
    "UnavailableError",
    "jobcast_error_to_http",
    "not_found",
]
