"""A scriptable OpenAI-compatible `/v1/chat/completions` server on 127.0.0.1, for tests.

It runs in its own threads (one per request), so it serves clients in any event loop or process,
and in-flight counting sees real concurrency.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

NUMBERED = re.compile(r"^(\d+): ?(.*)$")
# How translate_srt's instructions name the target: the default's wording, or the line appended
# to an operator's own system message.
TARGET = re.compile(r"BCP 47 code '([^']+)'|Target language \(BCP 47 code\): (\S+)")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


@dataclass
class ChatRequest:
    """One request the server received."""

    number: int
    """1-based, in order of arrival."""
    body: dict[str, Any]
    authorization: str
    at: float = field(default_factory=time.monotonic)
    """When it arrived (time.monotonic)."""

    @property
    def system(self) -> str:
        """The system message's content ('' if none)."""
        return str(next((m["content"] for m in self.body["messages"] if m["role"] == "system"), ""))

    @property
    def user(self) -> str:
        """The last user message's content."""
        return str([m["content"] for m in self.body["messages"] if m["role"] == "user"][-1])


def numbered(text: str) -> list[tuple[int, str]]:
    """The "N: text" lines of a message."""
    return [(int(m[1]), m[2]) for line in text.splitlines() if (m := NUMBERED.match(line))]


def tidy(request: ChatRequest) -> str:
    """The default answer: each numbered line with its first letter upper-cased and a final period."""
    out = []
    for n, text in numbered(request.user):
        text = text[:1].upper() + text[1:]
        if text and text[-1] not in ".!?":
            text += "."
        out.append(f"{n}: {text}")
    return "\n".join(out)


def drop_last_line(request: ChatRequest) -> str:
    """A broken answer: `tidy`'s, one line short."""
    return "\n".join(tidy(request).splitlines()[:-1])


def target_language(request: ChatRequest) -> str | None:
    """The language a translation request asks for (None: not a translation)."""
    match = TARGET.search(request.system)
    return None if match is None else match[1] or match[2]


def translate(request: ChatRequest) -> str:
    """A deterministic "translation": each numbered line prefixed with "[<code>] ", or `tidy`'s
    answer to a request that asks for no language."""
    language = target_language(request)
    if language is None:
        return tidy(request)
    return "\n".join(f"{n}: [{language}] {text}" for n, text in numbered(request.user))


@dataclass
class FakeLLM:
    """The server's script and record; use as a context manager, then point a client at `base_url`."""

    reply: Callable[[ChatRequest], str] = translate
    """The assistant's content for a request that is not failed (`translate`: `tidy`'s, unless the
    request asks for a translation)."""
    fail_first: list[int] = field(default_factory=list)
    """HTTP statuses for the first requests, in order (e.g. [429, 500]); later ones are answered."""
    retry_after: str | None = None
    """The Retry-After header of those scripted failures (none when None)."""
    api_key: str | None = None
    """When set, any other bearer token gets 401."""
    delay: float = 0.0
    """Seconds each request takes, so concurrent requests overlap."""
    quote_authorization: bool = False
    """Scripted failures quote the Authorization header they got, as a hostile server might."""
    requests: list[ChatRequest] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status, payload = fake._handle(self.path, body, self.headers.get("Authorization", ""))
                data = json.dumps(payload).encode()
                self.send_response(status)
                if status != 200 and fake.retry_after is not None:
                    self.send_header("Retry-After", fake.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )  # a short poll keeps shutdown() quick
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handle(self, path: str, body: dict[str, Any], authorization: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            request = ChatRequest(number=len(self.requests) + 1, body=body, authorization=authorization)
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if path != "/v1/chat/completions":
                return _error(404, f"no route {path}")
            if self.api_key is not None and authorization != f"Bearer {self.api_key}":
                return _error(401, "Incorrect API key provided.")
            if request.number <= len(self.fail_first):
                status = self.fail_first[request.number - 1]
                quoted = f" for {authorization}" if self.quote_authorization else ""
                return _error(status, f"scripted failure {status}{quoted}")
            return 200, {
                "id": f"chatcmpl-{request.number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply(request)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        finally:
            with self._lock:
                self._in_flight -= 1


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    kind = ERROR_TYPES.get(status, "error")
    return status, {"error": {"message": message, "type": kind, "code": kind, "param": None}}
