"""Running the intermediary with uvicorn: ``serve`` for the CLI, ``IntermediaryServer`` for code.

The listening socket is bound here rather than by uvicorn, so that a busy port or a bad address
is reported as a :class:`ConfigError` instead of ending the process, and so that port 0 can be
used to get a free port (tests, the demo). A failure while starting (the database, the
sidecar) is raised to the caller as the original exception, not as uvicorn's ``SystemExit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from tigress_signal.errors import TigressSignalError
from tigress_signal.intermediary.app import begin_draining, create_app
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.signatures import SignatureVerifier
from tigress_signal.serving import (
    QuietServer,
    is_loopback,
    listen,
    run_server,
    startup_error,
    url_of,
)

logger = logging.getLogger(__name__)

#: Seconds requests in flight get to finish when the server stops.
_GRACEFUL_SHUTDOWN = 10
#: Largest WebSocket frame a device may send; its frames are small acknowledgements.
_WS_MAX_FRAME = 64 * 1024
_START_TIMEOUT = 30.0


async def serve(config: IntermediaryConfig, *, verifier: SignatureVerifier | None = None) -> None:
    """Run the intermediary until the process gets SIGINT or SIGTERM, then stop cleanly.

    Args:
        config: the server's settings (``host``, ``port``, ``database_url``, limits).
        verifier: checks prekey signatures; None starts a libsignal sidecar.

    Raises:
        ConfigError: the address cannot be listened on.
        TigressSignalError: the server could not start (database, sidecar).
    """
    app = create_app(config, verifier=verifier)
    sock = _listen(config)
    server = QuietServer(_uvicorn_config(app, config))
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not every loop supports signal handlers (e.g. outside the main thread); there the
        # caller stops the server by cancelling this coroutine.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, _request_exit, server, app, signum)
            handled.append(signum)
    server.ready_message = f"listening on {url_of(sock)}"
    try:
        await run_server(server, sock)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        sock.close()
    if not server.started:
        raise startup_error(app, "intermediary")


def run(config: IntermediaryConfig) -> None:
    """:func:`serve` for synchronous callers: blocks until the server stops."""
    asyncio.run(serve(config))


class IntermediaryServer:
    """An intermediary running in this event loop, for tests and embedding.

    Example::

        async with IntermediaryServer(IntermediaryConfig(port=0, ...)) as server:
            client = IntermediaryClient(server.url)

    Args:
        config: the server's settings; ``port=0`` picks a free port.
        verifier: checks prekey signatures; None starts a libsignal sidecar.
    """

    def __init__(
        self, config: IntermediaryConfig, *, verifier: SignatureVerifier | None = None
    ) -> None:
        self.config = config
        self.app = create_app(config, verifier=verifier)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    async def start(self) -> None:
        """Bind, start the app's lifespan and begin serving.

        Raises:
            ConfigError: the address cannot be listened on.
            TigressSignalError: the server could not start.
        """
        self._socket = _listen(self.config)
        self.url = url_of(self._socket)
        self._server = QuietServer(_uvicorn_config(self.app, self.config))
        self._task = asyncio.create_task(
            run_server(self._server, self._socket), name="intermediary-server"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not self._server.started:
            if self._task.done():
                await self._task  # re-raises a crash
                self._socket.close()
                raise startup_error(self.app, "intermediary")
            if loop.time() > deadline:
                await self.stop()
                raise TigressSignalError("the intermediary did not start in time")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving: finish requests in flight, close WebSockets (1012), shut down."""
        begin_draining(self.app)
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> IntermediaryServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _request_exit(server: uvicorn.Server, app: Starlette, signum: signal.Signals) -> None:
    logger.info("received %s; finishing requests in flight, then stopping", signum.name)
    begin_draining(app)
    if server.should_exit:
        server.force_exit = True  # a second signal: stop waiting for connections
    server.should_exit = True


def _uvicorn_config(app: Starlette, config: IntermediaryConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="on",
        # The sans-I/O implementation: the other websockets one uses a deprecated API.
        ws="websockets-sansio",
        ws_max_size=_WS_MAX_FRAME,
        # No permessage-deflate: the frames carry ciphertext, which does not compress, so it
        # would only cost CPU on both ends (and compressing secrets next to data a sender
        # chose is how compression side channels leak).
        ws_per_message_deflate=False,
        # Logging is configured by whoever runs us; our middleware logs each request once.
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
        # Behind a reverse proxy, the client address (for rate limits) comes from its
        # X-Forwarded-For, trusted only from the listed proxy addresses.
        proxy_headers=bool(config.forwarded_allow_ips),
        forwarded_allow_ips=config.forwarded_allow_ips or None,
    )


def _listen(config: IntermediaryConfig) -> socket.socket:
    sock = listen(config.host, config.port)
    if not is_loopback(sock):
        # Device passwords travel in every request; beyond this machine they need TLS.
        logger.warning(
            "listening on %s, not a loopback address: serve it behind a TLS proxy", config.host
        )
    return sock
