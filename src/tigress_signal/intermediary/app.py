"""The intermediary as an ASGI application: routes, error answers, request log, lifespan.

``create_app(config)`` returns a Starlette app. Starting it (its lifespan) opens and migrates
the database and starts a libsignal sidecar for signature checks, unless a verifier is passed
in; stopping it closes both.

Every answer is JSON. Errors the client caused are 4xx with ``{"error", "message"}``; anything
unexpected is logged with its traceback and answered with a JSON 500, which tests treat as a
bug. Each request is logged once, at INFO, with its method, route template (never the ids in
the path), status and duration; never credentials, keys or message contents.
"""

from __future__ import annotations

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
from tigress_signal.intermediary import accounts, keys, messages
from tigress_signal.intermediary.api import ApiError, error_response, json_response
from tigress_signal.intermediary.auth import Authenticator
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.context import ServerContext
from tigress_signal.intermediary.delivery import DeliveryHub
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
                db = await Database.open(config.database_url)
                stack.push_async_callback(db.close)
                version = await upgrade(db, INTERMEDIARY_SCHEMA)
                checker = verifier
                if checker is None:
                    checker = await _start_bridge(config, stack)
            except Exception as exc:
                # Kept for whoever started the server (uvicorn only logs it).
                app.state.startup_error = exc
                raise
            hub = DeliveryHub()
            app.state.intermediary = ServerContext(
                config=config,
                db=db,
                verifier=checker,
                authenticator=Authenticator(
                    db,
                    cache_size=config.auth_cache_size,
                    kdf_concurrency=config.kdf_concurrency,
                ),
                hub=hub,
                notifier=hub,
            )
            logger.info("intermediary ready (%s, schema version %d)", db.dialect, version)
            try:
                yield
            finally:
                app.state.intermediary = None
                logger.info("intermediary stopping")

    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(RequestLogMiddleware)],
        exception_handlers={HTTPException: _http_exception, ApiError: _api_error},
        lifespan=lifespan,
    )
    # A path with an extra trailing slash is an unknown path (a JSON 404), not a redirect
    # that clients would have to follow with their credentials.
    app.router.redirect_slashes = False
    return app


def _routes() -> list[BaseRoute]:
    return [
        Route("/health", _health, methods=["GET"]),
        Route("/v1/accounts", accounts.create_account, methods=["POST"]),
        Route("/v1/accounts/whoami", accounts.whoami, methods=["GET"]),
        Route("/v2/keys", keys.upload_keys, methods=["PUT"]),
        Route("/v2/keys", keys.prekey_counts, methods=["GET"]),
        Route("/v2/keys/{uuid}/{device_id}", keys.fetch_bundle, methods=["GET"]),
        Route("/v1/messages", messages.list_messages, methods=["GET"]),
        Route("/v1/messages/uuid/{guid}", messages.acknowledge_message, methods=["DELETE"]),
        Route("/v1/messages/{uuid}", messages.send_messages, methods=["PUT"]),
        WebSocketRoute("/v1/websocket/", websocket_endpoint),
        WebSocketRoute("/v1/websocket", websocket_endpoint),
    ]


async def _health(request: Request) -> Response:
    """``GET /health``: 200 once the app has started (for scripts waiting on a server)."""
    return json_response({"status": "ok"})


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
            logger.info(
                "%s %s %d %.1fms",
                _method(scope),
                _template(scope),
                outcome.status,
                (time.perf_counter() - started) * 1000,
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
