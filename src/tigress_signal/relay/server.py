"""Running the relay with uvicorn: ``serve`` for the CLI, ``RelayServer`` for code.

As for the intermediary, the listening socket is bound here (a busy port is a
:class:`ConfigError`, port 0 picks a free one), uvicorn's own signal handling is left out, and a
failure while starting is raised to the caller as the original exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from tigress_signal.errors import ConfigError, TigressSignalError
from tigress_signal.relay.app import create_app
from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.context import RelayContext

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
    sock = listen(config.host, config.port)
    server = _Server(_uvicorn_config(app, config))
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not every loop supports signal handlers; there the caller cancels this coroutine.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, _request_exit, app, server, signum)
            handled.append(signum)
    logger.info("relay listening on %s", url_of(sock, tls=config.tls))
    try:
        await _run_server(server, sock)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        sock.close()
    if not server.started:
        raise _startup_error(app)


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
        self._socket = listen(self.config.host, self.config.port)
        self.url = url_of(self._socket, tls=self.config.tls)
        self._server = _Server(_uvicorn_config(self.app, self.config))
        self._task = asyncio.create_task(
            _run_server(self._server, self._socket), name="relay-server"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not self._server.started:
            if self._task.done():
                await self._task
                self._socket.close()
                raise _startup_error(self.app)
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


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling (see the intermediary's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _run_server(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn ends the process when the app's start-up fails; report the cause instead.
        if server.started:
            raise


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


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: the address is unknown or the port is taken.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="choose another port, or stop the process using it",
        ) from exc
    if not ipaddress.ip_address(str(address[0]).partition("%")[0]).is_loopback:
        logger.info("listening on %s, beyond loopback", host)
    return sock


def url_of(sock: socket.socket, *, tls: bool = False) -> str:
    """The base URL of a listening socket."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def _startup_error(app: Starlette) -> BaseException:
    error = getattr(app.state, "startup_error", None)
    if isinstance(error, BaseException):
        return error
    return TigressSignalError("the relay did not start; see the log above")
