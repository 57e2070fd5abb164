"""Requests per key per minute: a fixed window per caller, counted, on Litestar's ASGIMiddleware.

Litestar's own `RateLimitMiddleware` stores the timestamp of every request of the window, decodes
and re-encodes that list on each request and keeps its copy alive for as long as the response
lasts: thousands of SSE connections opened in one window held O(n^2) memory (about 16 KB per
connection at 1,000, growing with n). This one keeps two integers per caller and window, with the
same limit, the same 429 and the same RateLimit-* headers. (The `limits` library would do the
counting too, but its async memory storage runs its own expiry task, unsupervised, for what is
a dict here.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Iterable

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import TooManyRequestsException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app._auth import Caller

WINDOW_S = 60
"""The window: the limit is requests per minute (JOBCAST_RATE_LIMIT_PER_MIN)."""


def rate_limit_identity(scope: Scope) -> str:
    """Rate limits count per key (owner), not per address."""
    caller = scope.get("user")
    if isinstance(caller, Caller):
        return f"owner:{caller.owner}"
    client = scope.get("client")
    return f"addr:{client[0] if client else '-'}"


class RateLimit(ASGIMiddleware):
    """At most `per_window` HTTP requests per caller in each fixed window of WINDOW_S (0: no limit);
    the next ones get 429. Paths matching one of `exclude` (regular expressions) are not counted."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, per_window: int, exclude: Iterable[str] = ()) -> None:
        self.per_window = per_window
        self._excluded = re.compile("|".join(f"(?:{pattern})" for pattern in exclude)) if exclude else None
        self._windows: dict[str, tuple[int, int]] = {}
        """Per caller: requests counted in its window, and when that window ends (epoch seconds)."""
        self._swept_at = 0
        self.should_bypass_for_scope = self._bypassed

    def _bypassed(self, scope: Scope) -> bool:
        """Off (0), or an excluded path (the probes, the schema, the UI's static files)."""
        return self.per_window <= 0 or (
            self._excluded is not None and bool(self._excluded.search(scope["path"]))
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Count the request in its caller's window; 429 once the window is full."""
        count, reset = self.count(rate_limit_identity(scope), int(time.time()))
        if count > self.per_window:
            raise TooManyRequestsException(headers=self._headers(self.per_window, reset))
        await next_app(scope, receive, self._send_with_headers(send, count, reset))

    @property
    def windows(self) -> int:
        """Callers with a window kept (those of about the last minute)."""
        return len(self._windows)

    def count(self, identity: str, now: int) -> tuple[int, int]:
        """Count one request of `identity` at `now`: its count in the window (at most the limit plus
        one: refused requests are not counted further) and when the window ends. No await: no lock."""
        if now >= self._swept_at + WINDOW_S:  # bounded: only windows of the last minute are kept
            self._windows = {key: window for key, window in self._windows.items() if window[1] > now}
            self._swept_at = now
        count, reset = self._windows.get(identity, (0, 0))
        if reset <= now:
            count, reset = 0, now + WINDOW_S
        count = min(count + 1, self.per_window + 1)
        self._windows[identity] = (count, reset)
        return count, reset

    def _headers(self, count: int, reset: int) -> dict[str, str]:
        return {
            "RateLimit-Policy": f"{self.per_window}; w={WINDOW_S}",
            "RateLimit-Limit": str(self.per_window),
            "RateLimit-Remaining": str(max(self.per_window - count, 0)),
            "RateLimit-Reset": str(reset - int(time.time())),
        }

    def _send_with_headers(self, send: Send, count: int, reset: int) -> Send:
        # A plain function handing back `send`'s own awaitable: no coroutine of its own per message,
        # which an SSE stream to thousands of followers would pay on every frame.
        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableScopeHeaders(message)
                for name, value in self._headers(count, reset).items():
                    headers[name] = value
            return send(message)

        return send_with_headers
