"""Requests per key per window, counted in this process.

Litestar's `RateLimitMiddleware` keeps every request's timestamp of the current window in a
store and decodes, extends and re-encodes that whole list on each request: its cost grows with
the limit (6,000 a minute by default). This one keeps a count and the window's end per key, with
the same fixed window, the same refusal (429) and the same `RateLimit-*` headers.
"""

from __future__ import annotations

from time import time

from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.rate_limit import DURATION_VALUES, RateLimitConfig, RateLimitMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

PRUNE_ABOVE = 10_000
"""Keys kept before windows that have ended are dropped."""


class CountingRateLimitMiddleware(RateLimitMiddleware):
    """A fixed window per key: a counter and the time it resets."""

    def __init__(self, app: ASGIApp, config: RateLimitConfig) -> None:
        super().__init__(app, config)
        self.duration = DURATION_VALUES[self.unit]
        self.windows: dict[str, list[int]] = {}
        """Key -> [requests let through in the window, when the window ends (epoch seconds)]."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request against its key's window; 429 once the window is full."""
        request = scope["litestar_app"].request_class(scope)
        if await self.should_check_request(request=request):
            key = self.cache_key_from_request(request)
            now = int(time())
            window = self.windows.get(key)
            if window is None or window[1] <= now:
                if len(self.windows) > PRUNE_ABOVE:
                    self.windows = {k: w for k, w in self.windows.items() if w[1] > now}
                window = self.windows[key] = [0, now + self.duration]
            if window[0] >= self.max_requests:
                headers = self.window_headers(window) if self.config.set_rate_limit_headers else None
                raise TooManyRequestsException(headers=headers)
            window[0] += 1
            if self.config.set_rate_limit_headers:
                send = self._with_headers(send, self.window_headers(window))
        await self.app(scope, receive, send)

    def window_headers(self, window: list[int]) -> dict[str, str]:
        """The `RateLimit-*` headers, as Litestar's middleware sets them."""
        return {
            self.config.rate_limit_policy_header_key: f"{self.max_requests}; w={self.duration}",
            self.config.rate_limit_limit_header_key: str(self.max_requests),
            self.config.rate_limit_remaining_header_key: str(max(0, self.max_requests - window[0])),
            self.config.rate_limit_reset_header_key: str(window[1] - int(time())),
        }

    @staticmethod
    def _with_headers(send: Send, headers: dict[str, str]) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                scope_headers = MutableScopeHeaders(message)
                for key, value in headers.items():
                    scope_headers[key] = value
            await send(message)

        return send_with_headers
