"""API exceptions, and their mapping to HTTP in one place."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
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


class TooManyError(ApiError):
    """The caller holds too many open streams (or sends too many requests)."""


class UnavailableError(ApiError):
    """A dependency (NATS, the projection) is not keeping up; try again."""


class StorageFullError(UnavailableError):
    """The JOBS stream is at its byte limit (or the server's disk is full): nothing new is stored
    until jobs are deleted or the limit is raised; nothing already stored is dropped."""


STATUS_CODES: dict[type[Exception], int] = {
    NotFoundError: HTTP_404_NOT_FOUND,
    ConflictError: HTTP_409_CONFLICT,
    UnavailableError: HTTP_503_SERVICE_UNAVAILABLE,
    TooManyError: HTTP_429_TOO_MANY_REQUESTS,
    UnknownOperationError: HTTP_422_UNPROCESSABLE_ENTITY,
    InvalidParamsError: HTTP_422_UNPROCESSABLE_ENTITY,
}


def status_of(exc: JobcastError) -> int:
    """The HTTP status a jobcast error answers with."""
    return next(
        (code for cls, code in STATUS_CODES.items() if isinstance(exc, cls)), HTTP_500_INTERNAL_SERVER_ERROR
    )


def jobcast_error_to_http(_: Request[Any, Any, Any], exc: JobcastError) -> Response[dict[str, object]]:
    """Render a jobcast error as `{status_code, detail}`, like Litestar's own errors."""
    status = status_of(exc)
    return Response(
        {"status_code": status, "detail": str(exc)}, status_code=status, media_type=MediaType.JSON
    )


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the status code, a message naming the field or the problem, and for
    validation errors the details."""

    status_code: int
    detail: str
    extra: Any = None


ERROR_RESPONSES: dict[int, ResponseSpec] = {
    code: ResponseSpec(data_container=ErrorBody, description=text, generate_examples=False)
    for code, text in {
        400: "Invalid request: the detail names the field",
        401: "No API key, or a wrong one",
        403: "Not allowed for this key (admin routes)",
        404: "No such resource for this caller",
        409: "The resource is in a state that does not allow this",
        413: "Request body too large",
        416: "Range not satisfiable",
        422: "Unknown operation or invalid params: the detail names the field",
        429: "Too many requests or open streams for this key",
        503: "The job queue is unavailable, or its storage is full; try again",
    }.items()
}
"""Documented on every route, so clients (and schemathesis) know every answer they can get."""


def document_errors(app: Litestar) -> None:
    """Add the error answers to every HTTP route's OpenAPI responses."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if isinstance(handler, HTTPRouteHandler):
                handler.responses = {**ERROR_RESPONSES, **(handler.responses or {})}


def not_found(what: str, ident: str) -> NotFoundError:
    """The one wording of a 404."""
    return NotFoundError(f"{what} {ident} not found")


__all__ = [
    "ApiError",
    "ConflictError",
    "HTTPException",
    "NotFoundError",
    "StorageFullError",
    "TooManyError",
    "UnavailableError",
    "jobcast_error_to_http",
    "not_found",
    "status_of",
]
