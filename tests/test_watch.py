"""The API's stall-checking KV watch (app/_watch.py): it restarts a watch that missed a change,
and does not take revisions the bucket no longer keeps for missed ones."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js import api as js_api
from nats.js.kv import KeyValue

from app._watch import WATCH_CHECK_S, WatchStalledError, follow_bucket
from streams import NatsServer


async def watch_for(js: nats.js.JetStreamContext, kv: KeyValue, seconds: float) -> list[str]:
    """The keys the watch delivered in `seconds`; raises what the watch raised before then."""
    keys: list[str] = []
    task = asyncio.create_task(
        follow_bucket(js, kv, "test", lambda entry: keys.append(entry.key), lambda: None)
    )
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
    task.cancel()
    return keys


async def test_a_bucket_whose_values_all_expired_is_not_a_stalled_watch(nats_server: NatsServer) -> None:
    """The workers' heartbeats expire by the bucket's TTL when every worker is gone; the watch
    then replays nothing while the stream's last sequence still counts them. It took that for a
    stall and restarted for ever, and /ready reported the API down until a worker came back."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(config=js_api.KeyValueConfig(bucket="beats", history=1, ttl=1))
        await kv.put("cpu.w1", b"{}")
        async with asyncio.timeout(10):
            while (await kv.status()).stream_info.state.messages:  # noqa: ASYNC110 - expiry sends nothing
                await asyncio.sleep(0.1)
        assert await watch_for(js, kv, 3 * WATCH_CHECK_S) == []
    finally:
        await nc.close()


async def test_a_purged_newest_value_is_not_a_stalled_watch(nats_server: NatsServer) -> None:
    """A revocation that leaves no marker purges the bucket's newest message: the stream's last
    sequence names a message the watch can never deliver."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(config=js_api.KeyValueConfig(bucket="keys", history=1))
        await kv.put("alice", b"{}")
        await kv.put("bob", b"{}")
        await js.purge_stream("KV_keys", subject="$KV.keys.bob")
        assert await watch_for(js, kv, 3 * WATCH_CHECK_S) == ["alice"]
    finally:
        await nc.close()


async def test_a_bucket_made_again_restarts_the_watch(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        config = js_api.KeyValueConfig(bucket="again", history=1)
        kv = await js.create_key_value(config=config)
        for name in ("a", "b", "c"):
            await kv.put(name, b"{}")
        loaded = asyncio.Event()
        task = asyncio.create_task(follow_bucket(js, kv, "test", lambda entry: None, loaded.set))
        await asyncio.wait_for(loaded.wait(), 5)  # a, b and c delivered
        await js.delete_key_value("again")
        kv = await js.create_key_value(config=config)
        await kv.put("d", b"{}")
        with pytest.raises(WatchStalledError, match="made again"):
            await asyncio.wait_for(task, 4 * WATCH_CHECK_S)
    finally:
        await nc.close()
