"""The operational files: compose.yaml and the justfile parse and say what they should;
`jobcast.replay` prints a job's history from JetStream as the API's SSE history has it."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from jobcast.replay import replay
from streams import NatsServer, nats_server_binary, nats_servers
from tests.cluster import jetstream_ready
from tests.conftest import REPO, WorkerRunner, free_port, spawned, submit, wait_terminal
from tests.test_live import read_sse
from tests.test_sessions import check_public_api, clean_env

POOLS = ("gpu", "cpu", "llm")
RECIPES = ("default", "serve", "test", "lint", "typecheck", "fmt", "bench", "up", "down")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml, parsed (anchors and merge keys resolved)."""
    parsed: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return parsed


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, Any]:
    depends = service.get("depends_on", {})
    return {name: {} for name in depends} if isinstance(depends, list) else dict(depends)


def test_compose_services_and_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"nats", "api", *(f"worker-{pool}" for pool in POOLS)}

    nats = services["nats"]
    assert nats["image"].startswith("nats:2.12")
    argv = _argv(nats)
    assert "-js" in argv
    assert argv[argv.index("-sd") + 1] == "/data"
    assert argv[argv.index("-m") + 1] == "8222"
    volume = next(v for v in nats["volumes"] if v.split(":")[1] == "/data")
    assert volume.split(":")[0] in compose["volumes"]  # a named volume, not a host path

    api = services["api"]
    assert api.get("image") == "jobcast:latest" or "build" in api
    assert _argv(api) == ["jobcast", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert _env(api)["JOBCAST_DATA_DIR"] == "/data"
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in compose["volumes"] for v in api["volumes"])
    assert any(str(port).split(":")[-1] == "8000" for port in api["ports"])

    for pool in POOLS:
        worker = services[f"worker-{pool}"]
        assert worker.get("image") == "jobcast:latest" or "build" in worker
        assert _argv(worker) == ["jobcast", "worker", "--pool", pool]


def test_compose_wires_every_process_to_the_nats_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name == "nats":
            continue
        url = _env(service)["JOBCAST_NATS_URL"]
        assert re.fullmatch(r"nats://nats:4222", url), (name, url)
        assert "nats" in _depends_on(service), name

    llm = _env(services["worker-llm"])
    for var in ("JOBCAST_LLM_BASE_URL", "JOBCAST_LLM_API_KEY"):
        assert llm[var].startswith("${" + var), (var, llm[var])  # taken from the host's environment
    for pool in ("gpu", "cpu"):
        assert not any(k.startswith("JOBCAST_LLM") for k in _env(services[f"worker-{pool}"]))
    # The API checks a job's base_url against the same endpoints as the llm workers; the key
    # itself goes to the llm workers only.
    api = _env(services["api"])
    for var in ("JOBCAST_LLM_BASE_URL", "JOBCAST_LLM_ALLOWED_BASE_URLS"):
        assert api[var] == llm[var], var
    assert "JOBCAST_LLM_API_KEY" not in api


def test_compose_gpu_reservation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("api", "worker-cpu", "worker-llm", "nats"):
        assert "deploy" not in services[name], name


def test_compose_healthchecks_and_startup_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats_check = " ".join(services["nats"]["healthcheck"]["test"])
    assert "wget" in nats_check
    assert "localhost:8222/healthz" in nats_check
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "curl" in api_check
    assert "localhost:8000/ready" in api_check
    for name in ("api", *(f"worker-{pool}" for pool in POOLS)):
        assert _depends_on(services[name])["nats"] == {"condition": "service_healthy"}, name
    assert "API keys" in (REPO / "compose.yaml").read_text().split("services:")[0]


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, the forms compose.yaml uses."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if environ.get(name):
            return environ[name]
        if operator == ":?":
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        return argument or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


async def test_compose_api_starts_on_its_public_address_with_the_admin_key(
    compose: dict[str, Any], nats_server: NatsServer, tmp_path: Path
) -> None:
    api = compose["services"]["api"]
    with pytest.raises(ValueError, match="JOBCAST_ADMIN_KEY is missing a value: set JOBCAST_ADMIN_KEY"):
        [interpolate(value, {}) for value in _env(api).values()]  # compose refuses to start without it
    dot_env = {"JOBCAST_ADMIN_KEY": "the-key-from-dot-env"}
    env = {name: interpolate(value, dot_env) for name, value in _env(api).items()}
    assert env["JOBCAST_ADMIN_KEY"] == "the-key-from-dot-env"
    argv = _argv(api)
    assert argv[:4] == ["jobcast", "api", "--host", "0.0.0.0"]
    port = free_port()
    # what differs outside the compose network: where NATS is, the data volume, the port
    env.update(JOBCAST_NATS_URL=nats_server.url, JOBCAST_DATA_DIR=str(tmp_path / "data"))
    args = [*argv[1:-1], str(port)]
    await check_public_api(args, port, clean_env(**env), "the-key-from-dot-env")


NODES = ("nats-1", "nats-2", "nats-3")


@pytest.fixture(scope="module")
def cluster_compose() -> dict[str, Any]:
    """compose.cluster.yaml, parsed (anchors and merge keys resolved)."""
    parsed: dict[str, Any] = yaml.safe_load((REPO / "compose.cluster.yaml").read_text())
    return parsed


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_cluster_compose_is_three_nodes_two_apis_and_the_workers(cluster_compose: dict[str, Any]) -> None:
    services, volumes = cluster_compose["services"], cluster_compose["volumes"]
    assert set(services) == {*NODES, "api-1", "api-2", *(f"worker-{pool}" for pool in POOLS)}
    routes = ",".join(f"nats://{node}:6222" for node in NODES)
    stores = []
    for node in NODES:
        argv = _argv(services[node])
        assert services[node]["image"].startswith("nats:2.12")
        assert "-js" in argv
        assert _flag(argv, "--server_name") == node  # JetStream on a cluster needs a name per node
        assert _flag(argv, "--cluster_name") == "jobcast"
        assert _flag(argv, "--cluster") == "nats://0.0.0.0:6222"
        assert _flag(argv, "--routes") == routes
        store = next(
            v.split(":")[0] for v in services[node]["volumes"] if v.split(":")[1] == _flag(argv, "-sd")
        )
        assert store in volumes
        stores.append(store)
    assert len(set(stores)) == 3  # each node its own store

    url = ",".join(f"nats://{node}:4222" for node in NODES)
    for name, service in services.items():
        if name in NODES:
            continue
        env = _env(service)
        assert env["JOBCAST_NATS_URL"] == url, name  # every node: it fails over between them
        assert nats_servers(env["JOBCAST_NATS_URL"]) == url.split(",")
        assert env["JOBCAST_STREAM_REPLICAS"] == "3", name
        assert _depends_on(service) == {node: {"condition": "service_healthy"} for node in NODES}, name
        assert service.get("image") == "jobcast:latest", name

    apis = [services["api-1"], services["api-2"]]
    data = [next(v.split(":")[0] for v in api["volumes"] if v.endswith(":/data")) for api in apis]
    assert data[0] != data[1]  # no shared disk: each keeps its own projection
    assert {str(api["ports"][0]).split(":")[0] for api in apis} == {"8001", "8002"}
    envs = [_env(api) for api in apis]
    assert envs[0] == envs[1]
    for secret in ("JOBCAST_ADMIN_KEY", "JOBCAST_WEBHOOK_SECRET", "JOBCAST_SESSION_SECRET"):
        with pytest.raises(ValueError, match=f"{secret} is missing a value"):
            interpolate(envs[0][secret], {})  # required, so every instance has the same one
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.mark.slow
async def test_cluster_compose_nodes_form_a_jetstream_cluster(
    cluster_compose: dict[str, Any], tmp_path: Path
) -> None:
    # Each node's command as compose.cluster.yaml has it, with its host names and ports made
    # loopback addresses and free ports: the three elect a leader and keep a stream of three replicas.
    client_ports = {node: free_port() for node in NODES}
    route_ports = {node: free_port() for node in NODES}
    async with contextlib.AsyncExitStack() as stack:
        for node in NODES:
            argv = _argv(cluster_compose["services"][node])
            argv[argv.index("-sd") + 1] = str(tmp_path / node)
            argv[argv.index("-m") + 1] = str(free_port())
            argv[argv.index("--cluster") + 1] = f"nats://127.0.0.1:{route_ports[node]}"
            routes = _flag(argv, "--routes")
            for other in NODES:
                routes = routes.replace(f"nats://{other}:6222", f"nats://127.0.0.1:{route_ports[other]}")
            argv[argv.index("--routes") + 1] = routes
            argv += ["-a", "127.0.0.1", "-p", str(client_ports[node])]
            await stack.enter_async_context(spawned([nats_server_binary(), *argv], dict(os.environ)))
        await jetstream_ready(
            ",".join(f"nats://127.0.0.1:{port}" for port in client_ports.values()), replicas=3
        )


def test_justfile_has_every_recipe_with_a_doc_comment() -> None:
    lines = (REPO / "justfile").read_text().splitlines()
    recipes: dict[str, tuple[str, list[str]]] = {}
    for index, line in enumerate(lines):
        match = re.match(r"^@?([a-z][a-z0-9_-]*)(?: [^:=]*)?:(?!=)", line)
        if not match:
            continue
        above = index - 1
        attributes: list[str] = []
        while above >= 0 and lines[above].startswith("["):
            attributes.append(lines[above])
            above -= 1
        doc = lines[above] if above >= 0 else ""
        recipes[match.group(1)] = (doc, attributes)

    assert set(RECIPES) <= set(recipes), sorted(recipes)
    for name in RECIPES:
        doc, attributes = recipes[name]
        assert re.fullmatch(r"# \S.*", doc), (name, doc)
        assert any(re.fullmatch(r"\[group\('[a-z]+'\)\]", a) for a in attributes), (name, attributes)

    text = "\n".join(lines)
    assert "just --list" in text
    assert "ruff check" in text
    assert "ruff format --check" in text
    assert "mypy" in text
    assert "python -m bench" in text
    assert "docker compose up" in text
    assert "docker compose down" in text
    assert ".venv/bin" in text


def test_nats_doc_names_the_commands() -> None:
    text = (REPO / "docs" / "nats.md").read_text()
    for command in (
        "nats stream view JOBS --subject 'jobs.events.",
        "nats sub 'jobs.events.>'",
        "nats kv watch JOBCAST_WORKERS",
        "nats object ls JOBCAST_FILES",
        "nats consumer ls JOBS",
        "nats.url",
        "jobcast events replay",
    ):
        assert command in text, command


async def test_replay_prints_the_job_history_as_the_api_streams_it(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    nats_server: NatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = await submit(client, params={"steps": 3})
    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed"
    history = await read_sse(client, job["id"])

    # the CLI's way to NATS: no JOBCAST_NATS_URL, the URL `jobcast serve` leaves in the data dir
    monkeypatch.delenv("JOBCAST_NATS_URL", raising=False)
    data_dir = tmp_path / "cli-data"
    data_dir.mkdir()
    (data_dir / "nats.url").write_text(nats_server.url + "\n")
    capsys.readouterr()
    assert await replay(job["id"], data_dir) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]

    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(set(seqs))
    assert lines[0]["kind"] == "submitted"
    assert lines[0]["subject"].startswith("jobs.submit.cpu.p0.")
    assert lines[-1]["kind"] == "completed"
    assert all(line["subject"].endswith(job["id"]) for line in lines)
    assert all(line["event"]["job_id"] == job["id"] for line in lines)
    assert all(line["event"]["kind"] == line["kind"] for line in lines)
    assert {line["subject"] for line in lines[1:]} == {f"jobs.events.{job['id']}"}

    assert [(line["seq"], line["kind"]) for line in lines] == [(seq, kind) for seq, kind, _ in history]
    assert [line["event"] for line in lines] == [data["event"] for _, _, data in history]

    # follow on a finished job ends at its terminal event, with the same lines
    assert await replay(job["id"], data_dir, follow=True) == 0
    assert capsys.readouterr().out == out


@pytest.mark.slow
async def test_replay_follow_prints_until_the_job_ends(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    nats_server: NatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBCAST_NATS_URL", nats_server.url)
    job = await submit(client, params={"steps": 4, "duration_s": 1.5})
    assert await replay(job["id"], tmp_path, follow=True) == 0
    kinds = [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()]
    assert kinds[0] == "submitted"
    assert kinds[-1] == "completed"
    assert "progress" in kinds
    done = await wait_terminal(client, job["id"], timeout=5)
    assert done["status"] == "completed"


async def test_replay_of_an_unknown_job_exits_1(
    nats_server: NatsServer,
    client: httpx.AsyncClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBCAST_NATS_URL", nats_server.url)  # `client` started the API: the stream exists
    assert await replay("0d4f6c1e-0000-4000-8000-000000000000", tmp_path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no messages for job" in captured.err
    assert await replay("jobs.>", tmp_path) == 2
