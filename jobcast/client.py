"""The client commands: submit, jobs, watch, cancel, retry, rm, against a jobcast server over HTTP."""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

TERMINAL = {"completed", "failed", "cancelled"}
CONFIG = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "jobcast" / "config.toml"
console = Console(stderr=True)


class ClientError(Exception):
    """A request the server refused, with its message."""


def connection(server: str | None, key: str | None) -> tuple[str, str | None]:
    """Server URL and key: flags, then JOBCAST_SERVER / JOBCAST_KEY, then the config file."""
    config: dict[str, Any] = tomllib.loads(CONFIG.read_text()) if CONFIG.exists() else {}
    url = server or os.environ.get("JOBCAST_SERVER") or config.get("server") or "http://127.0.0.1:8000"
    return url.rstrip("/"), key or os.environ.get("JOBCAST_KEY") or config.get("key")


class Client:
    """A thin, synchronous HTTP client of the jobcast API."""

    def __init__(self, server: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(30, read=None))

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; ClientError with the server's detail on 4xx/5xx."""
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ClientError(f"{response.status_code}: {detail}")
        return response.json() if response.content else None

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's events (history, then live) until it ends, from the SSE stream; a stream the
        server cut off (this client fell too far behind) is resumed after the last event."""
        last = ""
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            cut_off = False
            with self.http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"{response.status_code}: {response.text}")
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        last = line[3:].strip()
                    elif line.startswith("data:"):
                        yield json.loads(line[5:])
                    elif line.startswith(": too slow"):
                        cut_off = True
            if not cut_off:
                return

    def download(self, url: str, target: Path) -> None:
        """Stream a file to disk."""
        with self.http.stream("GET", url) as response, target.open("wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)


def submit(
    client: Client, files: list[Path], stages: list[tuple[str, dict[str, Any]]], watch: bool, out: Path | None
) -> int:
    """Upload, submit (one operation: a job, a batch for several files; several operations: a
    pipeline per file), optionally follow and download."""
    ids = []
    for path in files:
        with path.open("rb") as handle:
            ids.append(client.call("POST", "/api/v1/files", files={"file": (path.name, handle)})["id"])
    if len(stages) > 1:
        body = [{"type": op, "params": params} for op, params in stages]
        jobs = [client.call("POST", "/api/v1/pipelines", json={"file_id": i, "stages": body}) for i in ids]
    elif len(ids) == 1:
        ((op, params),) = stages
        jobs = [client.call("POST", "/api/v1/jobs", json={"type": op, "file_id": ids[0], "params": params})]
    else:
        ((op, params),) = stages
        jobs = [
            client.call("POST", "/api/v1/jobs/batch", json={"type": op, "file_ids": ids, "params": params})
        ]
    for job in jobs:
        print(job["id"])
    if not watch:
        return 0
    return follow(client, jobs, out)


def js_round(value: float) -> int:
    """Rounded as JavaScript's Math.round does it, .5 up (Python's round goes to the even one)."""
    return math.floor(value + 0.5)


def about(seconds: float) -> str:
    """ "about 3 min": rounded as the UI rounds it (5 s steps under a minute, minutes under 90)."""
    if seconds < 60:
        return f"about {max(5, js_round(seconds / 5) * 5)} s"
    if seconds < 5400:
        return f"about {js_round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def eta_text(status: str, eta_s: float | None, estimated_start_s: float | None = None) -> str:
    """A bar's ETA: the time left of a running job, the wait of a pending one; empty when unknown."""
    if status == "running" and eta_s is not None:
        return f"{about(eta_s)} left"
    if status == "pending" and estimated_start_s is not None:
        return f"starts in {about(estimated_start_s)}"
    return ""


def quality_text(result: dict[str, Any] | None) -> str:
    """A finished subtitle job's quality gate in a line or a few: counts, then each flag left with
    its time; empty when the result has no quality section."""
    quality = (result or {}).get("quality")
    if not isinstance(quality, dict):
        return ""
    if not quality.get("enabled"):
        return "quality gate: off"
    counts = ", ".join(f"{quality[part]['count']} {part}" for part in ("found", "fixed", "left"))
    lines = [f"quality gate: {counts}"]
    for flag in quality["left"]["flags"]:
        lines.append(f"  left {flag['start']:.1f}-{flag['end']:.1f} s {flag['check']}: {flag['why']}")
    return "\n".join(lines)


def follow(client: Client, jobs: list[dict[str, Any]], out: Path | None) -> int:
    """A progress bar per job (per child of a batch, per stage of a pipeline, in their order),
    fed by SSE; downloads every output to `out` when given. 1 unless every one completed."""
    failed = 0
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TextColumn("{task.fields[step]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"))  # fmt: skip
    shown = [
        child for job in jobs for child in client.call("GET", f"/api/v1/jobs/{job['id']}/children") or [job]
    ]
    with Progress(*columns, console=console) as bars:
        tasks: list[TaskID] = [
            bars.add_task(
                job.get("title") or job["id"][:8],
                total=100,
                step=job["status"],
                eta=eta_text(job["status"], job.get("eta_s"), job.get("estimated_start_s")),
            )
            for job in shown
        ]
        for job, task in zip(shown, tasks, strict=True):
            status = job["status"]
            for event in client.events(job["id"]):
                status = event["status"]
                bars.update(
                    task, completed=event["progress"], step=event["current_step"][:40],
                    eta=eta_text(status, event.get("eta_s")),
                )  # fmt: skip
            final = client.call("GET", f"/api/v1/jobs/{job['id']}")
            bars.update(
                task,
                step=final["status"] if final["status"] != "failed" else f"failed: {final['error']}",
                eta="",
            )
            failed += status != "completed"
            if summary := quality_text(final["result"]):
                console.print(summary, markup=False)
            if out is not None and final["result"]:
                out.mkdir(parents=True, exist_ok=True)
                for output in final["result"].get("outputs", []):
                    client.download(output["url"], out / output["name"])
                    console.print(f"saved {out / output['name']}")
    return 1 if failed else 0


def list_jobs(client: Client, statuses: list[str], job_type: str | None, limit: int) -> int:
    """A table of recent jobs."""
    params: dict[str, Any] = {"limit": limit}
    if statuses:
        params["status"] = statuses
    if job_type:
        params["type"] = job_type
    page = client.call("GET", "/api/v1/jobs", params=params)
    table = Table("type", "status", "progress", "step", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=36))
    for job in page["items"]:
        table.add_row(job["id"], job["type"], job["status"], f"{job['progress']:.0f}%", job["current_step"][:40],
                      job["created_at"][:19])  # fmt: skip
    Console().print(table)
    Console().print(f"Showing {len(page['items'])} of {page['total']}")
    return 0
