"""The `noop` operation: progress steps and sleeps, failing, hanging or blocking on request."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from streams import NoopParams, parse_params
from workers._context import JobContext
from workers._errors import JobCancelledError, PermanentError, Retry


async def noop(ctx: JobContext) -> dict[str, Any]:
    """Walk through `steps` progress updates over `duration_s`, then succeed or fail."""
    params = parse_params(ctx.params, NoopParams)
    if ctx.delivery <= params.fail_times:
        raise Retry(f"{params.error} (transient, delivery {ctx.delivery} of {params.fail_times} to fail)")
    pause = params.duration_s / params.steps if params.steps else params.duration_s
    for step in range(1, params.steps + 1):
        ctx.check_cancelled()
        if pause:
            await ctx.sleep(pause)
        ctx.progress(100.0 * step / params.steps, f"step {step} of {params.steps}")
    if not params.steps and pause:
        await ctx.sleep(pause)
    if params.hang_s:
        await asyncio.sleep(params.hang_s)  # deaf to the cancel flag, as a stuck handler is
    if params.block_s:
        await ctx.run_blocking(_block, ctx, params.block_s, params.check_every_s)
    if params.fail:
        raise PermanentError(params.error)
    result: dict[str, Any] = {
        "steps": params.steps,
        "duration_s": params.duration_s,
        "delivery": ctx.delivery,
    }
    if params.result_bytes:
        result["filler"] = "x" * params.result_bytes
    return result


def _block(ctx: JobContext, seconds: float, check_every_s: float) -> None:
    """Busy in this thread for `seconds`, looking at the cancel flag every `check_every_s`."""
    ctx.progress(0.0, f"blocking in thread {threading.get_ident()}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(check_every_s, max(0.0, end - time.monotonic())))
        if ctx.cancelled.is_set():
            ctx.progress(0.0, "blocking thread stopped: cancelled")
            raise JobCancelledError("cancelled")
