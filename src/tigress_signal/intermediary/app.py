"""The intermediary as an ASGI application: routes, error answers, request log, lifespan.

``create_app(config)`` returns a Starlette app. Starting it (its lifespan) opens and migrates
the database, starts a libsignal sidecar for signature checks (unless a verifier is passed
in), records the process for presence, starts listening to other processes (PostgreSQL) and
starts the heartbeat and retention sweep; stopping it undoes all of that, in reverse.

Every answer is JSON. Errors the client caused are 4xx with ``{"error", "message"}``; anything
unexpected is logged with its traceback and answered with a JSON 500, which tests treat as a
bug; a database that cannot be reached is a 503 with ``Retry-After``. Each request is logged
once, at INFO, with its method, route template (never the ids in the path), status and
duration, and counted in the metrics; never credentials, keys or message contents. Every
request except the operations endpoints first takes a permit of the per-address rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tigress_signal.bridge.libsignal import LibsignalBridge
from tigress_signal.errors import StoreUnavailable
from tigress_signal.intermediary import accounts, devices, keys, messages, openapi, operations
from tigress_signal.intermediary.api import ApiError, error_response
from tigress_signal.intermediary.auth import Authenticator
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.context import ServerContext
from tigress_signal.intermediary.delivery import DeliveryHub, Switchboard
from tigress_signal.intermediary.limits import RateLimiter
from tigress_signal.intermediary.maintenance import run_maintenance
from tigress_signal.intermediary.metrics import Metrics
from tigress_signal.intermediary.schema import INTERMEDIARY_SCHEMA
from tigress_signal.intermediary.signatures import SignatureVerifier
from tigress_signal.intermediary.websocket import CLOSE_INTERNAL_ERROR, websocket_endpoint
from tigress_signal.storage import Database, upgrade

logger = logging.getLogger(__name__)

_HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
#: Paths monitoring polls; they bypass the per-address limit.
_OPERATIONS_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


def create_app(
    config: IntermediaryConfig, *, verifier: SignatureVerifier | None = None
) -> Starlette:
    """Build the intermediary's ASGI app.

    Args:
        config: the server's settings.
        verifier: checks prekey signatures; None starts a libsignal sidecar
            (:class:`~tigress_signal.bridge.libsignal.LibsignalBridge`) with the app.

    Returns:
        The app; serve it with uvicorn (see :func:`tigress_signal.intermediary.server.serve`).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            try:
                db = await Database.open(config.database_url, pool_size=config.database_pool_size)
                stack.push_async_callback(db.close)
                version = await upgrade(db, INTERMEDIARY_SCHEMA)
                checker = verifier
                if checker is None:
                    checker = await _start_bridge(config, stack)
                hub = DeliveryHub()
                switchboard = Switchboard(db, hub)
                await switchboard.start()
                stack.push_async_callback(switchboard.aclose)
            except Exception as exc:
                # Kept for whoever started the server (uvicorn only logs it).
                app.state.startup_error = exc
                raise
            metrics = Metrics()
            context = ServerContext(
                config=config,
                db=db,
                verifier=checker,
                authenticator=Authenticator(
                    db,
                    cache_size=config.auth_cache_size,
                    kdf_concurrency=config.kdf_concurrency,
                ),
                hub=hub,
                switchboard=switchboard,
                limiter=RateLimiter(
                    config, on_limited=lambda name: metrics.rate_limited.labels(name).inc()
                ),
                metrics=metrics,
            )
            app.state.intermediary = context
            maintenance = asyncio.create_task(run_maintenance(context), name="maintenance")
            stack.push_async_callback(_cancel, maintenance)
            logger.info("intermediary ready (%s, schema version %d)", db.dialect, version)
            try:
                yield
            finally:
                context.draining.set()
                app.state.intermediary = None
                logger.info("intermediary stopping")

    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(RequestLogMiddleware), Middleware(AddressLimitMiddleware)],
        exception_handlers={
            HTTPException: _http_exception,
            ApiError: _api_error,
            StoreUnavailable: _store_unavailable,
        },
        lifespan=lifespan,
    )
    # A path with an extra trailing slash is an unknown path (a JSON 404), not a redirect
    # that clients would have to follow with their credentials.
    app.router.redirect_slashes = False
    return app


def begin_draining(app: Starlette) -> None:
    """Mark a running app as shutting down: ``/ready`` answers 503 from now on."""
    context = getattr(app.state, "intermediary", None)
    if isinstance(context, ServerContext):
        context.draining.set()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _routes() -> list[BaseRoute]:
    return [
        Route("/health", operations.health, methods=["GET"]),
        Route("/ready", operations.ready, methods=["GET"]),
        Route("/metrics", operations.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_document, methods=["GET"]),
        Route("/v1/accounts", accounts.create_account, methods=["POST"]),
        Route("/v1/accounts/whoami", accounts.whoami, methods=["GET"]),
        Route("/v1/accounts/identity", accounts.replace_identity, methods=["PUT"]),
        Route("/v1/devices", devices.list_devices, methods=["GET"]),
        Route("/v1/devices/provisioning/code", devices.issue_link_code, methods=["POST"]),
        Route("/v1/devices/link", devices.link_device, methods=["PUT"]),
        Route("/v1/devices/{device_id}", devices.remove_device, methods=["DELETE"]),
        Route("/v2/keys", keys.upload_keys, methods=["PUT"]),
        Route("/v2/keys", keys.prekey_counts, methods=["GET"]),
        Route("/v2/keys/{uuid}/{device_id}", keys.fetch_bundle, methods=["GET"]),
        Route("/v1/messages", messages.list_messages, methods=["GET"]),
        Route("/v1/messages/uuid/{guid}", messages.acknowledge_message, methods=["DELETE"]),
        Route("/v1/messages/{uuid}", messages.send_messages, methods=["PUT"]),
        WebSocketRoute("/v1/websocket/", websocket_endpoint),
        WebSocketRoute("/v1/websocket", websocket_endpoint),
    ]


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own errors: unknown route, wrong method.
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for this type only
        raise exc
    code = _HTTP_ERROR_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # pragma: no cover - registered for this type only
        raise exc
    return exc.response()


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    # A PostgreSQL server that went away is an outage to wait out, not a bug.
    logger.warning("the database is unavailable: %s", exc)
    return error_response(
        503,
        "unavailable",
        "the database cannot be reached right now; try again later",
        headers={"Retry-After": "5"},
    )


class AddressLimitMiddleware:
    """The per-client-address rate limit, before routing (429 with ``Retry-After``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = _context_of_scope(scope)
        if (
            scope["type"] == "http"
            and context is not None
            and scope.get("path") not in _OPERATIONS_PATHS
        ):
            client = scope.get("client")
            try:
                context.limiter.check("address", client[0] if client else "unknown")
            except ApiError as exc:
                await exc.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _context_of_scope(scope: Scope) -> ServerContext | None:
    app = scope.get("app")
    context = getattr(getattr(app, "state", None), "intermediary", None)
    return context if isinstance(context, ServerContext) else None


async def _start_bridge(config: IntermediaryConfig, stack: AsyncExitStack) -> SignatureVerifier:
    bridge = LibsignalBridge(node=config.node, sidecar=config.sidecar)
    await bridge.start()
    stack.push_async_callback(bridge.aclose)
    return bridge


class RequestLogMiddleware:
    """One INFO line per request, and a JSON 500 for anything an endpoint did not handle."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        outcome = _Outcome()

        async def send_and_watch(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                outcome.status = int(message["status"])
                outcome.started = True
            elif kind == "websocket.accept":
                outcome.status = 101
                outcome.started = True
            elif kind == "websocket.close":
                outcome.status = int(message.get("code", 1000))
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            logger.error(
                "unhandled error in %s %s", _method(scope), _template(scope), exc_info=True
            )
            if scope["type"] == "http":
                if outcome.started:
                    raise  # the answer is half sent; the server must drop the connection
                outcome.status = 500
                response = error_response(500, "internal", "the server failed; see its log")
                await response(scope, receive, send)
            else:
                outcome.status = CLOSE_INTERNAL_ERROR
                await send({"type": "websocket.close", "code": CLOSE_INTERNAL_ERROR})
        finally:
            elapsed = time.perf_counter() - started
            logger.info(
                "%s %s %d %.1fms",
                _method(scope),
                _template(scope),
                outcome.status,
                elapsed * 1000,
            )
            context = _context_of_scope(scope)
            if context is not None:
                context.metrics.observe_request(
                    _method(scope), _template(scope), outcome.status, elapsed
                )


class _Outcome:
    """What the app answered: HTTP status, or WebSocket close code (101 while open)."""

    __slots__ = ("started", "status")

    def __init__(self) -> None:
        self.status = 0
        self.started = False


def _method(scope: Scope) -> str:
    return "WEBSOCKET" if scope["type"] == "websocket" else str(scope.get("method", "?"))


def _template(scope: Scope) -> str:
    """The matched route's path template; the raw path would log account ids and guids."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<no route>"
