"""Shared pieces of the benchmarks: processes to measure, a lean HTTP client, tables and JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams import NatsServer

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUICK = os.environ.get("BENCH_QUICK") == "1"
"""Set by `python -m bench --quick`: smaller counts, same shape."""
VERBOSE = os.environ.get("BENCH_VERBOSE") == "1"


def scaled(full: int, quick: int) -> int:
    """`full` normally, `quick` under --quick."""
    return quick if QUICK else full


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one (load clients hold thousands of sockets)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


# processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def self_cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Child:
    """A subprocess whose CPU time and memory can be read while it runs; always killed at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None, quiet: bool = True):
        self.name = name
        # Children's logs would bury the tables; BENCH_VERBOSE=1 shows them.
        out = None if VERBOSE or not quiet else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            argv, env=dict(os.environ, **(env or {})), stdout=out, stderr=None if VERBOSE else out,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds so far (0 once it has exited)."""
        try:
            return cpu_seconds(self.pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return 0.0

    def rss(self) -> int:
        """Resident bytes now."""
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL of its process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def jobcast_env(nats_url: str, data_dir: Path) -> dict[str, str]:
    """Environment of the API and workers: no request or stream limits get in a benchmark's way."""
    return {
        "JOBCAST_NATS_URL": nats_url,
        "JOBCAST_DATA_DIR": str(data_dir),
        "JOBCAST_RATE_LIMIT_PER_MIN": str(10**9),
        "JOBCAST_MAX_STREAMS": str(10**6),
        "JOBCAST_LOG_LEVEL": "WARNING",
        "JOBCAST_SUBMIT_TIMEOUT_S": "60",
        "PYTHONUNBUFFERED": "1",
    }


async def start_api(nats_url: str, data_dir: Path, **env: str) -> tuple[Child, str]:
    """`jobcast api` on a free port; returns once /ready answers 200."""
    port = free_port()
    child = Child(
        "api",
        [sys.executable, "-m", "jobcast", "--log-level", "WARNING", "api", "--port", str(port)],
        jobcast_env(nats_url, data_dir) | env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"the API exited with {child.proc.returncode}")
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            conn = await Http.open(url)
            try:
                status, _ = await conn.request("GET", "/ready")
            finally:
                conn.close()
            if status == 200:
                return child, url
        await asyncio.sleep(0.1)
    child.stop()
    raise RuntimeError("the API did not become ready")


def start_worker(nats_url: str, data_dir: Path, pool: str = "cpu", concurrency: int = 0, **env: str) -> Child:
    """A `jobcast worker` subprocess of one pool."""
    argv = [sys.executable, "-m", "jobcast", "--log-level", "WARNING", "worker", "--pool", pool]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return Child(f"worker-{pool}", argv, jobcast_env(nats_url, data_dir) | env)


async def wait_workers(nats_url: str, count: int, timeout: float = 60) -> None:
    """Until `count` workers have a heartbeat (they have declared their consumers and fetch)."""
    import nats

    from streams import workers_bucket

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                kv = await workers_bucket(js)
                if len(await kv.keys()) >= count:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("workers did not start")
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def nats_server(tmp: Path) -> AsyncIterator[NatsServer]:
    """A fresh `nats-server -js` with its store under `tmp`."""
    from streams import NatsServer

    server = NatsServer(tmp / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def nats_cpu(server: NatsServer) -> float:
    """CPU seconds of the nats-server process so far."""
    assert server.process is not None
    return cpu_seconds(server.process.pid)


def server_cpu(children: Sequence[Child]) -> dict[str, float]:
    """CPU seconds of each child so far, by name."""
    return {child.name: child.cpu() for child in children}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-name CPU seconds between two `server_cpu` readings, rounded."""
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


# a lean HTTP/1.1 client ---------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection over asyncio streams: cheap enough that the load
    generator costs little next to the server, and fully under the benchmark's control."""

    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host = host
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Http:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=2**20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(f"{host}:{port}", reader, writer)

    def close(self) -> None:
        self.writer.close()

    def send(self, method: str, path: str, body: bytes | None = None, headers: str = "") -> None:
        """Write one request without waiting."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{headers}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        """Status and lower-cased headers of the next response."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
        """The body of a response, chunk by chunk as the server flushes it."""
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    return
                yield data[:-2]
        else:
            length = int(headers.get(b"content-length", b"0"))
            if length:
                yield await self.reader.readexactly(length)

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: str = ""
    ) -> tuple[int, bytes]:
        """One request and its whole response body."""
        self.send(method, path, body, headers)
        status, head = await self.head()
        parts = [chunk async for chunk in self.chunks(head)]
        return status, b"".join(parts)


# output --------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A table cell."""
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (it reads in a terminal and pastes into docs/benchmarks.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [f"\n{title}\n"]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, AttributeError):
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024  # type: ignore[union-attr]
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg": os.getloadavg(),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json (quick runs get a `-quick` suffix so they never overwrite a full one)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'-quick' if QUICK else ''}.json"
    payload = {"benchmark": name, "quick": QUICK, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine(), **data}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"-> {path.relative_to(REPO)}", flush=True)
    return path


def apt_install(binary: str, package: str) -> str:
    """The path of `binary`, installing its Debian package first when it is missing."""
    found = shutil.which(binary)
    if found:
        return found
    print(f"installing {package} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary} is still missing after installing {package}")
    return found


async def upload(url: str, path: Path) -> str:
    """Upload a file through the API; its id."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        with path.open("rb") as handle:
            response = await client.post("/api/v1/files", files={"file": (path.name, handle)})
        response.raise_for_status()
        file_id: str = response.json()["id"]
        return file_id


async def run_job(conn: Http, job: dict[str, Any]) -> tuple[float, bytes]:
    """Submit a job and follow its SSE stream to the end: seconds to the terminal event, and
    the chunk that carried it."""
    import msgspec

    began = time.perf_counter()
    status, body = await conn.request("POST", "/api/v1/jobs", msgspec.json.encode(job))
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {body[:300]!r}")
    return await follow_to_end(conn, msgspec.json.decode(body)["id"], began)


async def follow_to_end(conn: Http, job_id: str, began: float) -> tuple[float, bytes]:
    """Follow a job's SSE stream to its end: seconds from `began` to the terminal event, and the
    chunk that carried it; RuntimeError unless it completed."""
    conn.send("GET", f"/api/v1/jobs/{job_id}/events")
    _, head = await conn.head()
    elapsed, last = None, b""
    async for chunk in conn.chunks(head):
        if elapsed is None and re.search(rb"event: (completed|failed|cancelled)", chunk):
            elapsed, last = time.perf_counter() - began, chunk
    if elapsed is None or b"event: completed" not in last:
        raise RuntimeError(f"job {job_id} did not complete: {last[:500]!r}")
    return elapsed, last
