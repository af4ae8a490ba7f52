"""Operations endpoints: ``/health``, ``/ready`` and Prometheus ``/metrics``.

* ``GET /health``: 200 while the process serves requests (liveness).
* ``GET /ready``: 200 when this process can do its work right now: the database answers and,
  on PostgreSQL, the LISTEN connection that carries wake-ups from other processes is up; 503
  otherwise, and from the moment the server starts shutting down, so a load balancer stops
  sending it new requests.
* ``GET /metrics``: the Prometheus text format (see :mod:`.metrics` for what is in it).

None of these endpoints needs credentials; they reveal counts, never ids or contents.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.errors import StoreError
from tigress_signal.intermediary.api import ApiError, json_response
from tigress_signal.intermediary.context import context_of

logger = logging.getLogger(__name__)


async def health(request: Request) -> Response:
    """``GET /health``: 200 while the process serves (for scripts waiting on a server)."""
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    """``GET /ready``: 200 when the database and the wake-up channel work; 503 otherwise."""
    context = context_of(request)
    problems: list[str] = []
    if context.draining.is_set():
        problems.append("shutting down")
    started = time.perf_counter()
    try:
        await context.db.fetchval("SELECT 1")
    except StoreError as exc:
        logger.warning("readiness: the database does not answer: %s", exc)
        problems.append("database unavailable")
    if not context.switchboard.ready:
        problems.append("not listening for other processes' wake-ups")
    if problems:
        raise ApiError(
            503,
            "not_ready",
            "; ".join(problems),
            headers={"Retry-After": "5"},
            checks=problems,
        )
    return json_response(
        {
            "status": "ready",
            "database": context.db.dialect,
            "databaseMs": round((time.perf_counter() - started) * 1000, 2),
        }
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text exposition."""
    context = context_of(request)
    if not context.config.metrics_enabled:
        raise ApiError(404, "not_found", "metrics are disabled on this server")
    try:
        await context.metrics.refresh_from(context.db)
    except StoreError as exc:
        # The counters are still worth serving; the database figures keep their last values.
        logger.warning("metrics: cannot read queue and prekey figures: %s", exc)
    context.metrics.websockets.set(context.hub.connection_count)
    return Response(
        generate_latest(context.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
