"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

It uses the PostgreSQL server binaries of the machine (Debian's ``postgresql`` package puts
them in ``/usr/lib/postgresql/<version>/bin``; ``scripts/setup.sh`` installs it), creates a
cluster in a temporary folder, listens on 127.0.0.1 only (and a Unix socket in that folder) and
deletes everything on :meth:`ThrowawayCluster.stop`. ``initdb`` refuses to run as root, so as
root the server runs as the ``postgres`` user, which owns the folder.

Nothing here is used by a running intermediary; it lives in the package so that the test suite
and ``python -m benchmarks`` start clusters the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tigress_signal.errors import ConfigError

logger = logging.getLogger(__name__)

_BIN_ROOT = Path("/usr/lib/postgresql")
_SYSTEM_USER = "postgres"
_START_TIMEOUT = 60
_SAFE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def find_postgres_bin() -> Path:
    """The folder with ``initdb`` and ``pg_ctl`` of the newest installed PostgreSQL.

    Raises:
        ConfigError: PostgreSQL's server binaries are not installed.
    """
    override = os.environ.get("TIGRESS_PG_BIN")
    candidates = [Path(override)] if override else []
    if _BIN_ROOT.is_dir():
        versions = sorted(
            (p for p in _BIN_ROOT.iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
            reverse=True,
        )
        candidates += [p / "bin" for p in versions]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise ConfigError(
        "PostgreSQL's server binaries (initdb, pg_ctl) are not installed",
        hint="run scripts/setup.sh, which installs Debian's postgresql package",
    )


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayCluster:
    """A private PostgreSQL server: ``start()``, use :attr:`url`, ``stop()``.

    Args:
        durable: keep fsync on (benchmarks that compare with SQLite's synchronous commits);
            tests turn it off, since the cluster is deleted anyway.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        self.port = 0
        self.folder: Path | None = None
        self._bin: Path | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database as the superuser ``postgres``."""
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        """The URL of one database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Create the cluster and start its server; prints nothing on success.

        Raises:
            ConfigError: PostgreSQL is not installed or would not start (the message carries
                the end of its log).
        """
        self._bin = find_postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="tigress-pg-"))
        data = self.folder / "data"
        data.mkdir()
        if self._as_postgres:
            owner = pwd.getpwnam(_SYSTEM_USER)
            for path in (self.folder, data):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-instructions",
                "-E",
                "UTF8",
            ]
        )
        settings = [
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={self.folder}",
            "max_connections=200",
        ]
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        # A free port can be taken between the probe and the start; try a few.
        last_error: ConfigError | None = None
        for _ in range(5):
            self.port = free_loopback_port()
            options = " ".join([f"-p {self.port}"] + [f"-c {s}" for s in settings])
            try:
                self._run(
                    [
                        str(self._bin / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(self.folder / "server.log"),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        str(_START_TIMEOUT),
                        "start",
                    ]
                )
                return
            except ConfigError as exc:
                last_error = exc
        self._remove_folder()
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Stop the server (immediately; nothing in it is kept) and delete the folder."""
        if self.folder is None or self._bin is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(ConfigError):
                self._run([str(self._bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        self._remove_folder()

    def __enter__(self) -> ThrowawayCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def create_database(self, name: str) -> str:
        """Create an empty database and return its URL.

        Raises:
            ValueError: the name is not a plain lower-case SQL identifier.
        """
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        import asyncpg  # only the test and benchmark paths need the admin connection

        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return self.url_of(name)

    def _run(self, command: list[str]) -> None:
        program = Path(command[0]).name
        if self._as_postgres:
            command = ["runuser", "-u", _SYSTEM_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log_tail = ""
            if self.folder is not None and (self.folder / "server.log").exists():
                lines = (self.folder / "server.log").read_text(errors="replace").splitlines()
                log_tail = " | ".join(lines[-5:])
            raise ConfigError(
                f"{program} failed: {(result.stderr or result.stdout).strip()} {log_tail}".strip(),
                hint="check that Debian's postgresql package is installed (scripts/setup.sh)",
            )

    def _remove_folder(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
