"""The Tigress relay as an ASGI application: routes, limits, request log, lifespan.

``create_app(config)`` returns a Starlette app. Its lifespan opens and migrates the database
(the project's storage layer, component ``tigress-relay``) and runs the expiry sweep every
``sweep_interval_seconds``; stopping it wakes waiting reads and closes the database.

Every answer echoes the request's ``Mailbox-Request-ID``. Errors are JSON
``{"error", "message"}`` (the preview page answers HTML). Each request is logged once, at INFO,
with its method, route template, status and duration: never a mailbox id, a claim, a link or a
payload, so the log cannot tie requests to shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tigress_signal.intermediary.api import ApiError, error_response, json_response
from tigress_signal.relay import mailboxes
from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.context import RelayContext
from tigress_signal.relay.entities import REQUEST_ID_HEADER
from tigress_signal.relay.limits import RateLimiter
from tigress_signal.relay.schema import RELAY_SCHEMA
from tigress_signal.storage import Database, upgrade

logger = logging.getLogger(__name__)

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def create_app(config: RelayConfig, *, clock: Callable[[], float] = time.time) -> Starlette:
    """Build the relay's ASGI app.

    Args:
        config: the relay's settings.
        clock: seconds since the epoch, for expiry (tests move it forward).

    Returns:
        The app; serve it with :class:`tigress_signal.relay.server.RelayServer` or uvicorn.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            try:
                db = await Database.open(config.database_url)
                stack.push_async_callback(db.close)
                version = await upgrade(db, RELAY_SCHEMA)
            except Exception as exc:
                app.state.startup_error = exc  # for whoever started the server
                raise
            context = RelayContext(
                config=config,
                db=db,
                clock=clock,
                requests=RateLimiter(config.requests_per_minute, config.burst),
                misses=RateLimiter(config.misses_per_minute, max(1, config.misses_per_minute)),
            )
            app.state.relay = context
            sweeper = asyncio.create_task(_sweep_forever(context), name="relay expiry sweep")
            logger.info("relay ready (%s, schema version %d)", db.dialect, version)
            try:
                yield
            finally:
                context.watch.close()
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                app.state.relay = None
                logger.info("relay stopping")

    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(RelayMiddleware)],
        exception_handlers={HTTPException: _http_exception, ApiError: _api_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    return app


def _routes() -> list[BaseRoute]:
    return [
        Route("/health", _health, methods=["GET"]),
        Route("/v1/m", mailboxes.create_mailbox, methods=["POST"]),
        Route("/v1/m/{mailbox_id}", mailboxes.read_mailbox, methods=["POST"]),
        Route("/v1/m/{mailbox_id}", mailboxes.update_mailbox, methods=["PUT"]),
        Route("/v1/m/{mailbox_id}", mailboxes.preview_mailbox, methods=["GET"]),
        Route("/v1/m/{mailbox_id}", mailboxes.delete_mailbox, methods=["DELETE"]),
        Route("/v1/m/{mailbox_id}", mailboxes.relinquish_mailbox, methods=["PATCH"]),
    ]


async def _health(request: Request) -> Response:
    """``GET /health``: 200 once the relay has started."""
    return json_response({"status": "ok"})


async def _sweep_forever(context: RelayContext) -> None:
    while True:
        await asyncio.sleep(context.config.sweep_interval_seconds)
        try:
            await mailboxes.sweep_expired(context)
        except Exception:
            # The next round tries again; a failing sweep must not stop the relay.
            logger.error("expiry sweep failed", exc_info=True)


async def _http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for this type only
        raise exc
    code = _HTTP_ERROR_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # pragma: no cover - registered for this type only
        raise exc
    return exc.response()


class RelayMiddleware:
    """Rate limit per address, echo the request id, log one line, turn crashes into 500s."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = Request(scope)
        echo = request.headers.get(REQUEST_ID_HEADER)
        status = 0
        sent = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                sent = True
                if echo is not None and echo.isascii() and echo.isprintable():
                    headers = list(message.get("headers", []))
                    headers.append((REQUEST_ID_HEADER.lower().encode(), echo.encode("ascii")))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            context = getattr(request.app.state, "relay", None)
            wait = 0.0
            if isinstance(context, RelayContext) and request.client is not None:
                wait = context.requests.take(request.client.host)
            if wait > 0:
                response = error_response(
                    429,
                    "rate_limited",
                    "too many requests from this address",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
                await response(scope, receive, send_and_watch)
            else:
                await self.app(scope, receive, send_and_watch)
        except Exception:
            logger.error(
                "unhandled error in %s %s", scope.get("method"), _template(scope), exc_info=True
            )
            if sent:
                raise  # the answer is half sent; the server must drop the connection
            response = error_response(500, "internal", "the relay failed; see its log")
            await response(scope, receive, send_and_watch)
        finally:
            logger.info(
                "%s %s %d %.1fms",
                scope.get("method", "?"),
                _template(scope),
                status,
                (time.perf_counter() - started) * 1000,
            )


def _template(scope: Scope) -> str:
    """The matched route's template; the raw path would log mailbox ids."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<no route>"
