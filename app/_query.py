"""Unknown query parameters are refused, on every route: a misspelt or unsupported filter is a 400
naming it, never a silently wrong answer.

What a route accepts is what its handler declares, its dependencies' parameters included, read
from Litestar's public handler API (`parsed_fn_signature`, `resolve_dependencies`,
`resolve_layered_parameters`), the same declarations Litestar itself parses the query by.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.constants import RESERVED_KWARGS
from litestar.enums import ParamType, ScopeType
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.params import BodyKwarg, DependencyKwarg, ParameterKwarg
from litestar.status_codes import HTTP_400_BAD_REQUEST
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.typing import FieldDefinition

from app._auth import TOKEN_QUERY
from app._exceptions import REQUEST_ID_HEADER, ErrorBody, request_id

ALWAYS_ACCEPTED = frozenset({TOKEN_QUERY})
"""Read by the auth middleware on every route (the signed link of EventSource and WebSocket)."""
DENIAL_EXTENSION = "websocket.http.response"
"""The ASGI extension that lets a WebSocket handshake be answered with an HTTP response."""
CLOSE_BAD_REQUEST = 4400
"""WebSocket close code for a refused handshake where the server cannot answer it in HTTP."""


def accepted_query(handler: BaseRouteHandler) -> frozenset[str] | None:
    """The query parameter names `handler` reads, with its dependencies' and its layers'; None when
    it takes the whole query (`query`), so any name is its own business."""
    dependencies = handler.resolve_dependencies()
    names = set(ALWAYS_ACCEPTED)
    followed: set[str] = set()
    pending: list[dict[str, FieldDefinition]] = [
        handler.parsed_fn_signature.parameters,
        handler.resolve_layered_parameters(),
    ]
    while pending:
        for name, field in pending.pop().items():
            if name == "query":
                return None
            if name in RESERVED_KWARGS:
                continue
            if name in dependencies:
                if name not in followed:
                    followed.add(name)
                    pending.append(dependencies[name].parsed_fn_signature.parameters)
                continue
            kwarg = field.kwarg_definition
            if isinstance(kwarg, ParameterKwarg):
                if kwarg.param_type is ParamType.QUERY:
                    names.add(kwarg.name or name)
            elif not (isinstance(kwarg, BodyKwarg | DependencyKwarg) or field.is_di_field):
                # Undeclared: Litestar reads it from the query (or the path, when the path names it;
                # accepting that name in the query too costs nothing).
                names.add(name)
    return frozenset(names)


def unknown_query_error(unknown: list[str], accepted: frozenset[str]) -> ValidationException:
    """The 400 for query parameters the route does not take: each named in `detail` and in `extra`
    (as Litestar names a parameter that fails validation)."""
    takes = ", ".join(sorted(accepted - ALWAYS_ACCEPTED)) or "none"
    listed = ", ".join(repr(name) for name in unknown)
    return ValidationException(
        detail=f"unknown query parameter{'s' if len(unknown) > 1 else ''} {listed}; this route takes: {takes}",
        extra=[{"message": "unknown query parameter", "key": name, "source": "query"} for name in unknown],
    )


class QueryCheck(ASGIMiddleware):
    """Refuses a request (HTTP or WebSocket handshake) whose query names a parameter its route
    does not take."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self) -> None:
        self._accepted: dict[BaseRouteHandler, frozenset[str] | None] = {}
        """Per handler, worked out on its first request (it never changes)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Pass the request on, or refuse it with 400 naming the unknown parameters."""
        if scope["query_string"]:
            handler = scope["route_handler"]
            if handler not in self._accepted:
                self._accepted[handler] = accepted_query(handler)
            accepted = self._accepted[handler]
            if accepted is not None:
                given = ASGIConnection[BaseRouteHandler, Any, Any, Any](scope).query_params
                unknown = [name for name in given if name not in accepted]
                if unknown:
                    error = unknown_query_error(unknown, accepted)
                    if scope["type"] != ScopeType.WEBSOCKET:
                        raise error
                    await _refuse_handshake(scope, send, error)
                    return
        await next_app(scope, receive, send)


async def _refuse_handshake(scope: Scope, send: Send, error: ValidationException) -> None:
    """Answer a WebSocket handshake with the 400 and its error body where the server can (the ASGI
    denial-response extension, which uvicorn has), else close it with 4400 and the detail."""
    if DENIAL_EXTENSION not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": CLOSE_BAD_REQUEST, "reason": error.detail[:120]})
        return
    body = msgspec.json.encode(
        ErrorBody(status_code=HTTP_400_BAD_REQUEST, detail=error.detail, extra=error.extra)
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER, request_id(scope).encode()),
    ]
    await send({"type": "websocket.http.response.start", "status": HTTP_400_BAD_REQUEST, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
