"""Browser sessions: log in with a key (cookie), short-lived tokens for EventSource and WebSocket."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.datastructures import Cookie, State
from litestar.exceptions import NotAuthorizedException
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK

from app._auth import SESSION_COOKIE, SESSION_TTL_S, Caller, Keys, session_cookie, sign_token, token_lifetime

TOKEN_TTL_S = 300


class Login(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/v1/auth/login."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class Session(msgspec.Struct, kw_only=True):
    """Who the session or token stands for."""

    owner: str
    admin: bool
    token: str | None = None
    """A signed token for `?token=` (EventSource and WebSocket cannot send headers)."""
    expires_in: int


class AuthController(Controller):
    """Sessions and tokens."""

    path = "/api/v1/auth"
    tags = ["auth"]

    @post("/login", status_code=HTTP_200_OK, operation_id="login")
    async def login(self, data: JSONBody[Login], state: State) -> Response[Session]:
        """Trade a key for an HttpOnly session cookie."""
        keys: Keys = state.api_keys
        record = keys.lookup(data.key)
        if record is None:
            raise NotAuthorizedException("invalid API key")
        caller = Caller(owner=record.name, admin=record.admin, key=record)
        body = Session(owner=caller.owner, admin=caller.admin, expires_in=SESSION_TTL_S)
        return Response(body, cookies=[session_cookie(state.token_secret, caller)])

    @post("/logout", status_code=HTTP_200_OK, operation_id="logout")
    async def logout(self) -> Response[dict[str, str]]:
        """Drop the session cookie."""
        return Response(
            {"status": "logged out"}, cookies=[Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")]
        )

    @post("/token", status_code=HTTP_200_OK, operation_id="issueToken")
    async def token(self, request: Request[Any, Any, Any], state: State) -> Session:
        """A token for `?token=`, valid for five minutes, for the authenticated caller.

        Asked for with a token or session cookie, the new one keeps that session's login time, so
        refreshing never carries a session past its maximum age (nor past its key: see verify_token).
        """
        caller: Caller = request.user
        now = time.time()
        token = sign_token(state.token_secret, caller, TOKEN_TTL_S, now)
        expires_in = int(token_lifetime(caller, TOKEN_TTL_S, now))
        return Session(owner=caller.owner, admin=caller.admin, token=token, expires_in=expires_in)
