"""Who is calling: API keys (KV bucket, hashed), signed tokens for browsers, local mode.

A request authenticates with `Authorization: Bearer <key>` or `X-API-Key` (whisper-asr-webservice's
routes also with the key as an HTTP Basic password, see BASIC_AUTH_PATHS); browsers, whose
EventSource and WebSocket cannot set headers, use the session cookie set by a login with a
key, or a short-lived signed `?token=`. Tokens and cookies are signed with the session secret
(never the webhook secret, which every callback receiver holds) and name the key they came
from: they end when it is revoked, and never last past SESSION_MAX_AGE_S from the login. With
no key configured jobcast runs as one local owner with admin rights, and only while bound to a
loopback address; then any credential is served as that owner, so clients that always send
some key (the OpenAI SDK) work.
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
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from app._settings import Settings
from app._watch import follow_bucket
from streams import ADMIN_KEY_NAME, ApiKeyRecord, TaskSupervisor, is_loopback, key_hash, keys_bucket

log = logging.getLogger("jobcast.auth")

SESSION_COOKIE = "jobcast_session"
SESSION_TTL_S = 12 * 3600
SESSION_MAX_AGE_S = 12 * 3600
"""No token or cookie outlives its login by more than this, however often it is refreshed."""
TOKEN_QUERY = "token"
UI_PREFIX = "/ui"


class LoginRequired(NotAuthorizedException):
    """A browser page was asked for without a valid session: it is sent to the login form."""


class Caller(msgspec.Struct, frozen=True):
    """The authenticated caller: whose jobs it sees, and whether it may use admin routes."""

    owner: str
    admin: bool
    key: ApiKeyRecord | None = None
    """The key it authenticated with, directly or through a token; None in local mode."""
    login_at: float | None = None
    """When its session began (tokens and cookies); None when it presented the key itself."""


class Keys:
    """The API keys, kept in memory and current through a KV watch (revocation is immediate)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self._kv: KeyValue | None = None
        self._names: dict[str, ApiKeyRecord] = {}
        """The record each key name of the bucket stands for, as the watch has seen them so far
        (kept when the watch is restarted)."""
        self._loaded = asyncio.Event()
        self._revision = 0
        """The newest bucket revision the watch has delivered."""
        self._advanced = asyncio.Event()
        """Set whenever `_revision` grows."""

    async def start(self, tasks: TaskSupervisor) -> None:
        """Load every key and follow changes, as task `key-watch` of `tasks`."""
        self._kv = await keys_bucket(self.js)
        tasks.start("key-watch", self._watch)
        async with asyncio.timeout(10):
            await self._loaded.wait()
            # nats.py may say its initial values are done before the last of them has arrived (it
            # reads its consumer's pending count while that message is in flight): a key stored a
            # moment ago, such as the admin key this API just provisioned, would be missing. The
            # bucket's newest message is the newest of its key, so the watch delivers it.
            state = (await self._kv.status()).stream_info.state
            while state.messages and self._revision < state.last_seq:
                self._advanced.clear()  # no await since the check: a delivery cannot slip between
                await self._advanced.wait()

    async def _watch(self) -> None:
        assert self._kv is not None
        names = self._names
        replayed: set[str] | None = set()  # the replay's keys; None once it is in (not kept growing)

        def loaded() -> None:
            nonlocal replayed
            # Run again after a failure: a key the replay did not bring was revoked meanwhile.
            for revoked in names.keys() - (replayed or set()):
                self._by_hash.pop(names.pop(revoked).sha256, None)
            replayed = None
            self._loaded.set()

        def changed(entry: KeyValue.Entry) -> None:
            self._revision = max(self._revision, entry.revision or 0)
            self._advanced.set()
            if replayed is not None:
                replayed.add(entry.key)
            old = names.pop(entry.key, None)
            if old is not None:
                self._by_hash.pop(old.sha256, None)
            if entry.value and entry.operation is None:
                with contextlib.suppress(msgspec.DecodeError):
                    record = msgspec.json.decode(entry.value, type=ApiKeyRecord)
                    self._by_hash[record.sha256] = record
                    names[entry.key] = record

        # A revoked key must not stay valid because the watch went silent (see follow_bucket).
        await follow_bucket(self.js, self._kv, "key", changed, loaded)

    @property
    def empty(self) -> bool:
        """No key configured: local mode."""
        return not self._by_hash

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key, if it is valid."""
        return self._by_hash.get(key_hash(key))

    def named(self, name: str) -> ApiKeyRecord | None:
        """The current record of the key called `name`, if it exists."""
        record = self._names.get(name)
        return record if record is not None and record.name == name else None


async def provision_admin_key(js: JetStreamContext, key: str) -> None:
    """Store `key` (hashed) as the admin key ADMIN_KEY_NAME, unless that is stored already.

    Idempotent, and safe when several APIs start at once: it creates the record or
    compare-and-sets it. The configured key wins: when it changes, the stored record follows,
    which revokes the previous key and its sessions.
    """
    kv = await keys_bucket(js)
    wanted = key_hash(key)
    for _ in range(10):  # each retry means another API wrote meanwhile; a few are plenty
        try:
            entry: KeyValue.Entry | None = await kv.get(ADMIN_KEY_NAME)
        except (KeyNotFoundError, KeyDeletedError):
            entry = None
        if entry is not None and entry.value:
            with contextlib.suppress(msgspec.DecodeError):
                stored = msgspec.json.decode(entry.value, type=ApiKeyRecord)
                if stored.sha256 == wanted and stored.admin:
                    return
        record = ApiKeyRecord(name=ADMIN_KEY_NAME, sha256=wanted, admin=True, created_at=time.time())
        try:
            if entry is None:
                await kv.create(ADMIN_KEY_NAME, msgspec.json.encode(record))
            else:
                await kv.update(ADMIN_KEY_NAME, msgspec.json.encode(record), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        log.info(
            "admin key %r %s from JOBCAST_ADMIN_KEY",
            ADMIN_KEY_NAME,
            "stored" if entry is None else "replaced",
        )
        return
    raise RuntimeError(f"could not store the admin key {ADMIN_KEY_NAME!r}: the record kept changing")


def key_id(secret: bytes, record: ApiKeyRecord) -> str:
    """How a token names the key it came from: unique to that key, so a key revoked and created
    again under the same name does not revive old tokens; keyed by the session secret, so a token
    (which its holder can read) gives no help in guessing the key."""
    return hmac.new(secret, b"key:" + record.sha256.encode(), hashlib.sha256).hexdigest()[:32]


def token_lifetime(caller: Caller, ttl_s: float, now: float) -> float:
    """Seconds a token for `caller` issued at `now` lasts: `ttl_s`, cut at its login's maximum age."""
    login_at = now if caller.login_at is None else caller.login_at
    return min(ttl_s, login_at + SESSION_MAX_AGE_S - now)


def _signature(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, b"token:" + payload.encode(), hashlib.sha256).hexdigest().encode()


def sign_token(secret: bytes, caller: Caller, ttl_s: float, now: float | None = None) -> str:
    """A signed, expiring token standing for `caller` and its key (for cookies and ?token=)."""
    now = time.time() if now is None else now
    claims = {
        "o": caller.owner,
        "a": caller.admin,
        "k": caller.key.name if caller.key else None,
        "i": key_id(secret, caller.key) if caller.key else None,
        "l": now if caller.login_at is None else caller.login_at,
        "e": now + token_lifetime(caller, ttl_s, now),
    }
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
    return f"{payload}.{_signature(secret, payload).decode()}"


def session_cookie(secret: bytes, caller: Caller) -> Cookie:
    """The HttpOnly session cookie a login sets."""
    return Cookie(
        key=SESSION_COOKIE, value=sign_token(secret, caller, SESSION_TTL_S), max_age=SESSION_TTL_S,
        httponly=True, samesite="strict", path="/",
    )  # fmt: skip


def verify_token(secret: bytes, token: str, keys: Keys, local: Caller | None) -> Caller | None:
    """The caller a token stands for, if its signature holds, it has not expired, its login is
    not older than SESSION_MAX_AGE_S, and its key still exists (a token that names no key, issued
    in local mode, holds only while local mode lasts: `local` is its caller, None outside it)."""
    payload, _, signature = token.partition(".")
    if not hmac.compare_digest(signature.encode(), _signature(secret, payload)):
        return None
    try:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload.encode()))
        now = time.time()
        if data["e"] < now or data["l"] + SESSION_MAX_AGE_S < now:
            return None
        if data["k"] is None:
            return local
        record = keys.named(str(data["k"]))
        if record is None or not hmac.compare_digest(key_id(secret, record), str(data["i"])):
            return None
        return Caller(owner=record.name, admin=record.admin, key=record, login_at=float(data["l"]))
    except (ValueError, KeyError, TypeError):
        return None


BASIC_AUTH_PATHS = frozenset({"/asr", "/detect-language"})
"""whisper-asr-webservice's routes, whose clients (Bazarr's Whisper provider) send no header but
take credentials in their endpoint URL, `http://any-name:KEY@host/`, as HTTP Basic. Only there: a
browser that remembered Basic credentials sends them with any site's requests, as it does cookies
but with no SameSite to stop it, so elsewhere they would lend every route to cross-site forms."""


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key the request presents: `Authorization: Bearer`, `X-API-Key`, or on BASIC_AUTH_PATHS
    the password of `Authorization: Basic`."""
    header = connection.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    if header.lower().startswith("basic ") and connection.scope["path"] in BASIC_AUTH_PATHS:
        with contextlib.suppress(ValueError):  # not base64, or not UTF-8: no key presented
            return base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")[2]
    return connection.headers.get("x-api-key")


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
        key = _presented_key(connection)
        # In local mode every credential is served as the local owner, which is what no credential
        # gets: clients that always send a key (the OpenAI SDK) work, and nothing more is granted.
        local = (
            Caller(owner=settings.local_owner, admin=True)
            if keys.empty and is_loopback(settings.host)
            else None
        )
        if key:
            record = keys.lookup(key)
            if record is not None:
                caller = Caller(owner=record.name, admin=record.admin, key=record)
                return AuthenticationResult(user=caller, auth=record.name)
            if local is None:
                raise NotAuthorizedException("invalid API key")
            return AuthenticationResult(user=local, auth=None)
        token = connection.query_params.get(TOKEN_QUERY) or connection.cookies.get(SESSION_COOKIE)
        if token:
            by_token = verify_token(state.token_secret, token, keys, local)
            if by_token is not None:
                return AuthenticationResult(user=by_token, auth=token)
            if local is None:
                raise NotAuthorizedException("invalid or expired token; log in again")
        if local is not None:
            return AuthenticationResult(user=local, auth=None)
        raise NotAuthorizedException("an API key is required: send Authorization: Bearer <key> or X-API-Key")


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of the admin routes: 403 for everyone but admins."""
    caller = connection.user
    if not isinstance(caller, Caller) or not caller.admin:
        raise PermissionDeniedException("this route needs an admin key")
