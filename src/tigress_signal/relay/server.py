"""Running the relay with uvicorn: ``serve`` for the CLI, ``RelayServer`` for code.

As for the intermediary, the listening socket is bound here (a busy port is a
:class:`ConfigError`, port 0 picks a free one), uvicorn's own signal handling is left out, and a
failure while starting is raised to the caller as the original exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from tigress_signal.errors import TigressSignalError
from tigress_signal.relay.app import create_app
from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.context import RelayContext
from tigress_signal.serving import (
    QuietServer,
    is_loopback,
    listen,
    run_server,
    startup_error,
    url_of,
)

logger = logging.getLogger(__name__)

_GRACEFUL_SHUTDOWN = 5
_START_TIMEOUT = 30.0


async def serve(config: RelayConfig) -> None:
    """Run the relay until the process gets SIGINT or SIGTERM, then stop cleanly.

    Raises:
        ConfigError: the address cannot be listened on.
        TigressSignalError: the relay could not start (its database).
    """
    app = create_app(config)
    sock = _listen(config)
    server = QuietServer(_uvicorn_config(app, config))
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not every loop supports signal handlers; there the caller cancels this coroutine.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, _request_exit, app, server, signum)
            handled.append(signum)
    server.ready_message = f"relay listening on {url_of(sock, tls=config.tls)}"
    try:
        await run_server(server, sock)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        sock.close()
    if not server.started:
        raise startup_error(app, "relay")


class RelayServer:
    """A relay running in this event loop, for tests and embedding.

    Example::

        async with RelayServer(RelayConfig(port=0, database_url=...)) as relay:
            client = RelayClient(relay.url)

    Args:
        config: the relay's settings; ``port=0`` picks a free port.
        clock: seconds since the epoch, for expiry (tests move it forward).
    """

    def __init__(self, config: RelayConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.app = create_app(config, clock=clock)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    @property
    def context(self) -> RelayContext:
        """The running relay's parts (database, limits); only while it runs."""
        context = getattr(self.app.state, "relay", None)
        if not isinstance(context, RelayContext):
            raise TigressSignalError("the relay is not running")
        return context

    async def start(self) -> None:
        """Bind, start the app's lifespan and begin serving.

        Raises:
            ConfigError: the address cannot be listened on.
            TigressSignalError: the relay could not start.
        """
        self._socket = _listen(self.config)
        self.url = url_of(self._socket, tls=self.config.tls)
        self._server = QuietServer(_uvicorn_config(self.app, self.config))
        self._task = asyncio.create_task(
            run_server(self._server, self._socket), name="relay-server"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not self._server.started:
            if self._task.done():
                await self._task
                self._socket.close()
                raise startup_error(self.app, "relay")
            if loop.time() > deadline:
                await self.stop()
                raise TigressSignalError("the relay did not start in time")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving: wake waiting reads, close connections, run the lifespan's shutdown."""
        context = getattr(self.app.state, "relay", None)
        if isinstance(context, RelayContext):
            context.watch.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _request_exit(app: Starlette, server: uvicorn.Server, signum: signal.Signals) -> None:
    logger.info("received %s; stopping", signum.name)
    context = getattr(app.state, "relay", None)
    if isinstance(context, RelayContext):
        context.watch.close()  # long-polling reads answer now instead of holding the stop
    if server.should_exit:
        server.force_exit = True
    server.should_exit = True


def _uvicorn_config(app: Starlette, config: RelayConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
        ssl_certfile=config.tls_certfile,
        ssl_keyfile=config.tls_keyfile,
    )


def _listen(config: RelayConfig) -> socket.socket:
    sock = listen(config.host, config.port)
    if not is_loopback(sock):
        logger.info("listening on %s, beyond loopback", config.host)
    return sock
