"""P2's baseline: a Celery 5 no-op task on Redis, behind a minimal Litestar endpoint."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, group
from litestar import Litestar, post

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

celery = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
# Celery as it ships (prefetch multiplier 4), as the baseline is; results are kept.
# BENCH_CELERY_PREFETCH=64 gives the tuned variant (each prefork child takes tasks in bulk).
celery.conf.update(
    task_ignore_result=False,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
)


@celery.task(name="noop")
def noop() -> None:
    """Nothing: the cost measured is the queue's."""


@post("/jobs", status_code=202, sync_to_thread=False)
def submit() -> dict[str, Any]:
    """One task, queued before the answer (as jobcast's 202 means "stored")."""
    return {"id": noop.delay().id}


@post("/jobs/batch", status_code=202, sync_to_thread=False)
def submit_batch(data: dict[str, Any]) -> dict[str, Any]:
    """One task per item, queued as a group."""
    result = group(noop.s() for _ in data["items"]).apply_async()
    return {"id": result.id, "count": len(data["items"])}


app = Litestar([submit, submit_batch], openapi_config=None)
