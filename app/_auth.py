"""Who is calling: API keys (KV bucket, hashed), signed tokens for browsers, local mode.

A request authenticates with `Authorization: Bearer <key>` or `X-API-Key`; browsers, whose
EventSource and WebSocket cannot set headers, use the session cookie set by a login with a
key, or a short-lived signed `?token=`. With no key configured jobcast runs as one local
owner with admin rights, and only while bound to a loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException, TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.rate_limit import DURATION_VALUES, RateLimitMiddleware
from litestar.stores.base import Store
from litestar.types import Message, Receive, Scope, Send
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from app._settings import Settings
from streams import ApiKeyRecord, is_loopback, keys_bucket

log = logging.getLogger("jobcast.auth")

SESSION_COOKIE = "jobcast_session"
SESSION_TTL_S = 12 * 3600
TOKEN_QUERY = "token"
UI_PREFIX = "/ui"


class LoginRequired(NotAuthorizedException):
    """A browser page was asked for without a valid session: it is sent to the login form."""


class Caller(msgspec.Struct, frozen=True):
    """The authenticated caller: whose jobs it sees, and whether it may use admin routes."""

    owner: str
    admin: bool


def key_hash(key: str) -> str:
    """How keys are stored: their sha256, so a leaked bucket leaks no key."""
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    """The API keys, kept in memory and current through a KV watch (revocation is immediate)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def start(self) -> None:
        """Load every key and follow changes."""
        self._kv = await keys_bucket(self.js)
        self._task = asyncio.create_task(self._watch())
        async with asyncio.timeout(10):
            await self._loaded.wait()

    async def stop(self) -> None:
        """Stop following changes."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        assert self._kv is not None
        names: dict[str, str] = {}
        watcher = await self._kv.watchall()
        async for entry in watcher:
            if entry is None:  # the initial values have all arrived
                self._loaded.set()
                continue
            old = names.pop(entry.key, None)
            if old is not None:
                self._by_hash.pop(old, None)
            if entry.value and entry.operation is None:
                with contextlib.suppress(msgspec.DecodeError):
                    record = msgspec.json.decode(entry.value, type=ApiKeyRecord)
                    self._by_hash[record.sha256] = record
                    names[entry.key] = record.sha256

    @property
    def empty(self) -> bool:
        """No key configured: local mode."""
        return not self._by_hash

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key, if it is valid."""
        return self._by_hash.get(key_hash(key))


def sign_token(secret: bytes, caller: Caller, ttl_s: float) -> str:
    """A signed, expiring token standing for `caller` (for cookies and ?token=)."""
    payload = base64.urlsafe_b64encode(
        json.dumps({"o": caller.owner, "a": caller.admin, "e": int(time.time() + ttl_s)}).encode()
    ).decode()
    signature = hmac.new(secret, b"token:" + payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{signature}"


def session_cookie(secret: bytes, caller: Caller) -> Cookie:
    """The HttpOnly session cookie a login sets."""
    return Cookie(
        key=SESSION_COOKIE, value=sign_token(secret, caller, SESSION_TTL_S), max_age=SESSION_TTL_S,
        httponly=True, samesite="strict", path="/",
    )  # fmt: skip


def verify_token(secret: bytes, token: str) -> Caller | None:
    """The caller a token stands for, if its signature holds and it has not expired."""
    payload, _, signature = token.partition(".")
    expected = hmac.new(secret, b"token:" + payload.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload.encode()))
        if data["e"] < time.time():
            return None
        return Caller(owner=str(data["o"]), admin=bool(data["a"]))
    except (ValueError, KeyError, TypeError):
        return None


class AuthMiddleware(AbstractAuthenticationMiddleware):
    """Sets `connection.user` to a Caller, or answers 401."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        """Key header, then token, then local mode; pages of the UI send the browser to log in."""
        try:
            return self._authenticate(connection)
        except NotAuthorizedException as exc:
            if connection.scope["path"].startswith(UI_PREFIX):
                raise LoginRequired(exc.detail) from exc
            raise

    @staticmethod
    def _authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        state = connection.app.state
        keys: Keys = state.api_keys
        settings: Settings = state.settings
        header = connection.headers.get("authorization", "")
        key = (
            header[7:].strip()
            if header.lower().startswith("bearer ")
            else connection.headers.get("x-api-key")
        )
        if key:
            record = keys.lookup(key)
            if record is None:
                raise NotAuthorizedException("invalid API key")
            return AuthenticationResult(user=Caller(owner=record.name, admin=record.admin), auth=record.name)
        token = connection.query_params.get(TOKEN_QUERY) or connection.cookies.get(SESSION_COOKIE)
        if token:
            caller = verify_token(state.token_secret, token)
            if caller is None:
                raise NotAuthorizedException("invalid or expired token; log in again")
            return AuthenticationResult(user=caller, auth=token)
        if keys.empty and is_loopback(settings.host):
            return AuthenticationResult(user=Caller(owner=settings.local_owner, admin=True), auth=None)
        raise NotAuthorizedException("an API key is required: send Authorization: Bearer <key> or X-API-Key")


def rate_limit_identity(request: Request[Any, Any, Any]) -> str:
    """Rate limits count per key (owner), not per address."""
    caller = request.scope.get("user")
    return (
        f"owner:{caller.owner}"
        if isinstance(caller, Caller)
        else f"addr:{request.client.host if request.client else '-'}"
    )


class CountingRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's fixed-window rate limit, keeping a count per window instead of every request's time.

    The stock middleware decodes and re-encodes the list of the window's timestamps on every
    request and keeps its copy alive in the request's frame and send wrapper for as long as the
    response lasts: thousands of SSE connections opened in one window held O(n^2) memory (about
    16 KB per connection at 1,000, growing with n). Same limit, same 429, same RateLimit-* headers.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request in its key's window; 429 once the window is full."""
        app = scope["litestar_app"]
        request: Request[Any, Any, Any] = app.request_class(scope)
        if await self.should_check_request(request=request):
            key = self.cache_key_from_request(request)
            store = self.config.get_store_from_app(app)
            async with self._lock:
                count, reset = await self._window(key, store)
                if count >= self.max_requests:
                    headers = self._headers(count, reset) if self.config.set_rate_limit_headers else None
                    raise TooManyRequestsException(headers=headers)
                count += 1
                await store.set(key, f"{count} {reset}", expires_in=DURATION_VALUES[self.unit])
            if self.config.set_rate_limit_headers:
                send = self._send_with_headers(send, count, reset)
        del request
        await self.app(scope, receive, send)

    async def _window(self, key: str, store: Store) -> tuple[int, int]:
        """Requests counted in the key's current window, and when it resets (epoch seconds)."""
        now = int(time.time())
        raw = await store.get(key)
        if raw:
            count, reset = (int(part) for part in raw.split())
            if reset > now:
                return count, reset
        return 0, now + DURATION_VALUES[self.unit]

    def _headers(self, count: int, reset: int) -> dict[str, str]:
        config = self.config
        return {
            config.rate_limit_policy_header_key: f"{self.max_requests}; w={DURATION_VALUES[self.unit]}",
            config.rate_limit_limit_header_key: str(self.max_requests),
            config.rate_limit_remaining_header_key: str(max(self.max_requests - count, 0)),
            config.rate_limit_reset_header_key: str(reset - int(time.time())),
        }

    def _send_with_headers(self, send: Send, count: int, reset: int) -> Send:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableScopeHeaders(message)
                for name, value in self._headers(count, reset).items():
                    headers[name] = value
            await send(message)

        return send_wrapper


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of the admin routes: 403 for everyone but admins."""
    caller = connection.user
    if not isinstance(caller, Caller) or not caller.admin:
        raise PermissionDeniedException("this route needs an admin key")
