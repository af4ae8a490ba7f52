"""What the intermediary and the relay share to run under uvicorn.

The listening socket is bound here rather than by uvicorn, so that a busy port or a bad address
is reported as a :class:`~tigress_signal.errors.ConfigError` instead of ending the process, and
so that port 0 gives a free port (tests, the demo). A failure while the app starts is handed to
the caller as the original exception, not as uvicorn's ``SystemExit``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from tigress_signal.errors import ConfigError, TigressSignalError

logger = logging.getLogger(__name__)


class QuietServer(uvicorn.Server):
    """uvicorn's server without its own signal handling.

    uvicorn swaps the process's signal handlers while it serves and raises the caught signal
    again when it stops, which turns a requested stop into a KeyboardInterrupt for the caller.
    Our ``serve`` functions install their own handlers instead, and an embedded server leaves
    the process's handlers alone.
    """

    #: Logged at INFO once the app has started and requests are answered (None: nothing).
    ready_message: str | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Announced only now: a script that waits for the line may connect at once.
        await super().startup(sockets=sockets)
        if self.started and self.ready_message:
            logger.info("%s", self.ready_message)


async def run_server(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve on ``sock`` until told to stop; returns early when the start failed."""
    quiet_start = _StartupTraceback(server)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(quiet_start)
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn ends the process when the app's start-up fails; the cause, kept by the
        # app's lifespan, is reported to the caller instead (see startup_error).
        if server.started:
            raise
    finally:
        uvicorn_log.removeFilter(quiet_start)


class _StartupTraceback(logging.Filter):
    """Drops the traceback uvicorn logs when the app fails to start, unless debugging.

    The caller reports that failure as one line (see :func:`startup_error`); the traceback
    before it would only bury the line. With debug logging on, it is kept.
    """

    def __init__(self, server: uvicorn.Server) -> None:
        super().__init__()
        self._server = server

    def filter(self, record: logging.LogRecord) -> bool:
        if self._server.started or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        # Only the lifespan's failure arrives as a formatted traceback in the message (starlette
        # sends it so); errors of other servers in this process, logged with exc_info, pass.
        return not (record.levelno >= logging.ERROR and str(record.msg).startswith("Traceback"))


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
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether a bound socket listens on a loopback address only."""
    host = str(sock.getsockname()[0]).partition("%")[0]
    return ipaddress.ip_address(host).is_loopback


def url_of(sock: socket.socket, *, tls: bool = False) -> str:
    """The base URL of a listening socket."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def startup_error(app: Starlette, what: str) -> BaseException:
    """Why ``app`` did not start: the error its lifespan kept, or a plain one naming ``what``."""
    error = getattr(app.state, "startup_error", None)
    if isinstance(error, BaseException):
        return error
    return TigressSignalError(f"the {what} did not start; see the log above")


def read_settings(path: Path | str, table: str) -> dict[str, object]:
    """A server's settings from a TOML file: its ``[table]``, or the top level without one.

    Raises:
        ConfigError: the file cannot be read or parsed, or ``table`` is not a table.
    """
    try:
        with Path(path).open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    settings = document.get(table, document)
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    return settings
