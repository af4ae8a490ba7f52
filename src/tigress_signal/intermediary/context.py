"""What every endpoint of a running intermediary needs, made once per app in its lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from tigress_signal.intermediary.auth import Authenticator
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.delivery import DeliveryHub, Switchboard
from tigress_signal.intermediary.entities import DeviceAddress
from tigress_signal.intermediary.limits import RateLimiter
from tigress_signal.intermediary.metrics import Metrics
from tigress_signal.intermediary.signatures import SignatureVerifier
from tigress_signal.storage import Database


@dataclass(frozen=True, slots=True)
class ServerContext:
    """The running server's parts.

    Attributes:
        config: the configuration it was started with.
        db: its database, migrated.
        verifier: libsignal's signature check.
        authenticator: checks device credentials.
        hub: the WebSockets open in this process.
        switchboard: presence and wake-ups across the processes sharing the database.
        limiter: the rate limits.
        metrics: the Prometheus metrics.
        draining: set once the server has begun to shut down.
    """

    config: IntermediaryConfig
    db: Database
    verifier: SignatureVerifier
    authenticator: Authenticator
    hub: DeliveryHub
    switchboard: Switchboard
    limiter: RateLimiter
    metrics: Metrics
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    async def authenticate(self, connection: HTTPConnection) -> DeviceAddress:
        """The device whose credentials a request or WebSocket upgrade carries.

        Raises:
            ApiError: 401 when they are missing or wrong.
        """
        return await self.authenticator.authenticate(connection.headers.get("authorization"))


def context_of(connection: HTTPConnection) -> ServerContext:
    """The context of the app serving a request (set by the app's lifespan)."""
    context = getattr(connection.app.state, "intermediary", None)
    if not isinstance(context, ServerContext):
        raise RuntimeError("the intermediary app is not started (its lifespan did not run)")
    return context


def client_address(connection: HTTPConnection) -> str:
    """The client's address, as rate limits key it (the proxy's header already applied)."""
    return connection.client.host if connection.client is not None else "unknown"
