"""API exceptions, and their mapping to HTTP in one place."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap, Message, Scope

from streams import InvalidParamsError, JobcastError, UnknownOperationError

log = logging.getLogger("jobcast.api")

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_KEY = "jobcast.request_id"
"""Where a request's id is kept in its connection state."""
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
"""An incoming X-Request-ID is kept only when it cannot forge or break a log line."""


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
    """The JOBS stream is near its byte limit (or the server's disk is full): no new work is taken
    until jobs are deleted or the limit is raised; nothing already accepted is dropped."""


class TooSlowError(ApiError):
    """A live client fell further behind than its buffer allows and was cut off; it resumes after
    `resume_after` (every event up to that sequence was sent to it)."""

    def __init__(self, resume_after: int) -> None:
        super().__init__(f"too slow; resume after event {resume_after}")
        self.resume_after = resume_after


class StatusError(ApiError):
    """An error answered with the status its raiser chose (400 unless given)."""

    def __init__(self, message: str, status_code: int = HTTP_400_BAD_REQUEST) -> None:
        super().__init__(message)
        self.status_code = status_code


STATUS_CODES: dict[type[Exception], int] = {
    NotFoundError: HTTP_404_NOT_FOUND,
    ConflictError: HTTP_409_CONFLICT,
    UnavailableError: HTTP_503_SERVICE_UNAVAILABLE,
    TooSlowError: HTTP_503_SERVICE_UNAVAILABLE,
    TooManyError: HTTP_429_TOO_MANY_REQUESTS,
    UnknownOperationError: HTTP_422_UNPROCESSABLE_ENTITY,
    InvalidParamsError: HTTP_422_UNPROCESSABLE_ENTITY,
}


def status_of(exc: Exception) -> int:
    """The HTTP status an exception answers with: jobcast's by class, Litestar's its own, anything else 500."""
    if isinstance(exc, HTTPException | StatusError):
        return exc.status_code
    return next(
        (code for cls, code in STATUS_CODES.items() if isinstance(exc, cls)), HTTP_500_INTERNAL_SERVER_ERROR
    )


def request_id(scope: Scope) -> str:
    """The request's id: its own sane `X-Request-ID`, else a new one; the same for the whole request."""
    state = scope["state"]  # Litestar sets it up for every connection before routing
    rid: str | None = state.get(REQUEST_ID_KEY)
    if rid is None:
        incoming = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b"")
        rid = incoming.decode() if SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        state[REQUEST_ID_KEY] = rid
    return rid


async def send_request_id(message: Message, scope: Scope) -> None:
    """`before_send` hook: every HTTP response and WebSocket handshake names its request id (bodies and
    frames pass untouched)."""
    if message["type"] in ("http.response.start", "websocket.accept"):
        message.setdefault("headers", [])
        MutableScopeHeaders(message)[REQUEST_ID_HEADER.decode()] = request_id(scope)


async def log_unexpected(exc: Exception, scope: Scope) -> None:
    """`after_exception` hook: an error that answers 500 is logged with its traceback, method, path
    and request id (HTTP and WebSocket alike); expected errors (4xx, 503) are not."""
    if status_of(exc) != HTTP_500_INTERNAL_SERVER_ERROR:
        return
    rid, method, path = request_id(scope), scope.get("method", "WEBSOCKET"), scope["path"]
    log.error(
        "unexpected error on %s %r (request id %s)", method, path, rid, exc_info=exc,
        extra={"request_id": rid, "method": method, "path": path},
    )  # fmt: skip


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every error answer: the status code, a message naming the field or the problem, for
    validation errors the details, and for unexpected errors the id the server log names them by."""

    status_code: int
    detail: str
    extra: Any = None
    request_id: str | None = None


def error_body(request: ASGIConnection[Any, Any, Any, Any], exc: Exception) -> ErrorBody:
    """What the client is told about an error: the one mapping of exceptions to HTTP.

    An unexpected error says nothing about itself (that is in the log), only the request id.
    """
    status = status_of(exc)
    if status == HTTP_500_INTERNAL_SERVER_ERROR:
        rid = request_id(request.scope)
        return ErrorBody(status_code=status, detail=f"internal error; request id {rid}", request_id=rid)
    if isinstance(exc, HTTPException):
        return ErrorBody(status_code=status, detail=exc.detail, extra=exc.extra)
    return ErrorBody(status_code=status, detail=str(exc))


def error_to_http(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """Render any error as JSON `{status_code, detail[, extra][, request_id]}`, whatever the route's
    own media type (Litestar would use the route's, so a text route's errors were mislabelled)."""
    body = error_body(request, exc)
    headers = exc.headers if isinstance(exc, HTTPException) and body.request_id is None else None
    if body.status_code == HTTP_503_SERVICE_UNAVAILABLE:  # a NATS leader election, a lagging instance
        wait = STORAGE_FULL_RETRY_S if isinstance(exc, StorageFullError) else RETRY_AFTER_S
        headers = {**(headers or {}), "Retry-After": str(wait)}
    return Response(body, status_code=body.status_code, headers=headers, media_type=MediaType.JSON)


RETRY_AFTER_S = 1
"""Retry-After of a 503: NATS or the projection is away for moments (a JetStream cluster elects a new
leader in a few seconds), and a retried submission with the same client_request_id is harmless."""
STORAGE_FULL_RETRY_S = 60
"""Retry-After of a 503 "storage full": room comes back only as jobs are deleted."""


ERROR_HANDLERS: ExceptionHandlersMap = {
    HTTPException: error_to_http,
    JobcastError: error_to_http,
    HTTP_500_INTERNAL_SERVER_ERROR: error_to_http,  # any other exception, wherever it is raised
}
"""The app's exception handlers: Litestar's errors, jobcast's, and every unexpected one, as JSON."""


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
        500: "Unexpected server error: `request_id` names it in the server log",
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


def queue_unavailable(exc: BaseException) -> UnavailableError:
    """The one wording of a 503 for NATS that did not answer (raise it `from exc`)."""
    return UnavailableError(f"the job queue is unavailable ({type(exc).__name__}); try again")


def not_found(what: str, ident: str) -> NotFoundError:
    """The one wording of a 404."""
    return NotFoundError(f"{what} {ident} not found")


__all__ = [
    "ERROR_HANDLERS",
    "ApiError",
    "ConflictError",
    "ErrorBody",
    "HTTPException",
    "NotFoundError",
    "StatusError",
    "StorageFullError",
    "TooManyError",
    "TooSlowError",
    "UnavailableError",
    "error_body",
    "error_to_http",
    "log_unexpected",
    "not_found",
    "queue_unavailable",
    "request_id",
    "send_request_id",
    "status_of",
]
