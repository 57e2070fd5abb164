"""A JetStream cluster on loopback: three `nats-server` nodes with routes between them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
from nats.js import api as js_api
from nats.js.errors import APIError

from streams import NatsServer, close_quietly, connect
from tests.conftest import free_port

CLUSTER_NAME = "jobcast"
READY_TIMEOUT_S = 60.0
"""Three servers on two loaded cores can take a while to elect a meta leader."""


class NatsCluster:
    """`size` nats-server processes, each with its own store, client port and route port.

    A node keeps its ports and store across `kill` and `start`, so a restarted node rejoins as
    itself and catches up from its peers.
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.nodes = [
            NatsServer(
                root / f"n{index}",
                die_with_parent=True,  # a killed pytest leaves no server
                config=(
                    f"server_name: n{index}\n"
                    f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}"
                ),
            )
            for index, port in enumerate(route_ports)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: JOBCAST_NATS_URL of a cluster."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        """The node whose server_name is `name`."""
        return self.nodes[int(name.removeprefix("n"))]

    def name_of(self, node: NatsServer) -> str:
        """A node's server_name."""
        return f"n{self.nodes.index(node)}"

    async def start(self) -> None:
        """Start every node; returns once JetStream is ready for replicated streams."""
        await asyncio.gather(*(node.start() for node in self.nodes))
        await self.wait_ready()

    async def stop(self) -> None:
        """Stop every node still running."""
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def wait_ready(self, replicas: int | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the cluster has a meta leader and `replicas` (default: every live node) of its
        nodes can keep a replicated stream."""
        live = [node for node in self.nodes if node.process is not None and node.process.returncode is None]
        await jetstream_ready(",".join(node.url for node in live), replicas or len(live), timeout)


async def jetstream_ready(url: str, replicas: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the JetStream cluster at `url` creates (and deletes) a probe stream of `replicas`."""
    nc = await connect(url, name="cluster-probe")
    try:
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await js.add_stream(
                    name="PROBE",
                    subjects=["probe.>"],
                    num_replicas=replicas,
                    storage=js_api.StorageType.MEMORY,
                )
                await js.delete_stream("PROBE")
                return
            except (APIError, nats.errors.Error, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the cluster did not become ready within {timeout:.0f} s: {exc}"
                    ) from exc
                await asyncio.sleep(0.2)
    finally:
        await close_quietly(nc)


@contextlib.asynccontextmanager
async def running_cluster(root: Path, size: int = 3) -> AsyncIterator[NatsCluster]:
    """A started cluster, stopped when the block ends."""
    cluster = NatsCluster(root, size)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
