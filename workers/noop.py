"""The `noop` operation: progress steps and sleeps, failing on request."""

from __future__ import annotations

from typing import Any

from streams import NoopParams, parse_params
from workers._context import JobContext
from workers._errors import PermanentError, Retry


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
    if params.fail:
        raise PermanentError(params.error)
    return {"steps": params.steps, "duration_s": params.duration_s, "delivery": ctx.delivery}
