"""An async SQL database opened from a URL, with transactions and one query style for all dialects.

Queries are written once, with PostgreSQL's numbered placeholders (``$1``, ``$2``, ...). On SQLite
they are rewritten to ``?1``, ``?2``, which SQLite binds the same way, so a caller only branches on
:attr:`Database.dialect` where the SQL itself differs (column types, ``RETURNING`` locking
clauses, upserts). Foreign exceptions (``sqlite3.Error``) become :class:`StoreError` here.

Supported URLs, in the form SQLAlchemy made familiar (``sqlite:///`` followed by the path):

* ``sqlite:///relative/path.db``: a file relative to the working directory;
* ``sqlite:////absolute/path.db``: an absolute path (four slashes);
* ``sqlite:///:memory:`` or ``sqlite://``: a private in-memory database.

``postgresql://`` is recognised and refused with a :class:`ConfigError` until the asyncpg backend
is written; the public surface here is what that backend will implement.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, Protocol

import aiosqlite

from tigress_signal.errors import ConfigError, StoreError

logger = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]

#: How long a SQLite statement waits for another process's write lock before failing.
DEFAULT_BUSY_TIMEOUT_MS = 5000

_PLACEHOLDER = re.compile(r"\$(\d+)")


class Row(Protocol):
    """One result row; columns are read by name (or by position)."""

    def __getitem__(self, key: int | str, /) -> Any:
        """The value of a column."""
        ...

    def keys(self) -> list[str]:
        """The column names, in order."""
        ...


class Connection(Protocol):
    """A connection inside a transaction (or running one statement on its own).

    Every method takes the SQL text with ``$1``-style placeholders and the parameter values
    as further positional arguments.
    """

    @property
    def dialect(self) -> Dialect:
        """Which SQL dialect the connection speaks."""
        ...

    async def execute(self, sql: str, *params: object) -> int:
        """Run a statement and return how many rows it changed.

        Raises:
            StoreError: the database refused the statement.
        """
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter row.

        Raises:
            StoreError: the database refused the statement.
        """
        ...

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        """Run a query (or a statement with ``RETURNING``) and return all rows.

        Raises:
            StoreError: the database refused the statement.
        """
        ...

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        """Run a query and return its first row, or None when it has none.

        Raises:
            StoreError: the database refused the statement.
        """
        ...

    async def fetchval(self, sql: str, *params: object) -> Any:
        """Run a query and return the first column of its first row, or None.

        Raises:
            StoreError: the database refused the statement.
        """
        ...


class Database:
    """An open database: transactions, single statements, and the dialect to branch on.

    Open one with :meth:`open` and close it with :meth:`close` (or ``async with``). Schema
    migrations are applied with :meth:`upgrade` (see :mod:`tigress_signal.storage.migrations`).

    Note:
        SQLite allows one writer at a time, so this class keeps a single connection and runs
        one transaction (or statement) at a time on it, queueing the others; transactions
        begin with ``BEGIN IMMEDIATE`` so another process writing the same file makes us wait
        (up to the busy timeout) at the start instead of failing half-way through.
    """

    def __init__(self, backend: _Backend, url: str) -> None:
        self._backend = backend
        self._url = url

    @classmethod
    async def open(cls, url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> Database:
        """Open the database a URL names.

        Args:
            url: ``sqlite:///...`` (see the module docstring); ``postgresql://`` is not built
                yet.
            busy_timeout_ms: how long SQLite waits for another process's lock.

        Returns:
            The open database.

        Raises:
            ConfigError: the URL is not one this layer can open.
            StoreError: the database could not be opened.
        """
        scheme = url.partition(":")[0].lower()
        if scheme == "sqlite":
            backend = await _SqliteBackend.connect(_sqlite_path(url), busy_timeout_ms)
            return cls(backend, url)
        if scheme in ("postgresql", "postgres"):
            raise ConfigError(
                "PostgreSQL databases are not supported yet",
                hint="use a sqlite: database URL",
            )
        raise ConfigError(f"unsupported database URL scheme {scheme!r}", hint="use sqlite:///PATH")

    @property
    def dialect(self) -> Dialect:
        """The SQL dialect of this database."""
        return self._backend.dialect

    async def close(self) -> None:
        """Close the database; waits for the running transaction, if any."""
        await self._backend.close()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """Start a transaction: ``async with db.transaction() as conn: ...``.

        The transaction commits when the block ends normally and rolls back when it raises
        (the exception then propagates unchanged). Keep other awaits (network, sidecar) out
        of the block: on SQLite every other database user waits until it ends.

        Raises:
            StoreError: the transaction could not begin or commit.
        """
        return self._backend.transaction()

    async def execute(self, sql: str, *params: object) -> int:
        """Run one statement in its own transaction; see :meth:`Connection.execute`."""
        async with self.transaction() as conn:
            return await conn.execute(sql, *params)

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        """Run one query in its own transaction; see :meth:`Connection.fetch`."""
        async with self.transaction() as conn:
            return await conn.fetch(sql, *params)

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        """Run one query in its own transaction; see :meth:`Connection.fetchrow`."""
        async with self.transaction() as conn:
            return await conn.fetchrow(sql, *params)

    async def fetchval(self, sql: str, *params: object) -> Any:
        """Run one query in its own transaction; see :meth:`Connection.fetchval`."""
        async with self.transaction() as conn:
            return await conn.fetchval(sql, *params)

    def __repr__(self) -> str:
        return f"<Database {self.dialect} {self._url!r}>"


class _Backend(Protocol):
    """What a dialect's connection handling provides to :class:`Database`."""

    @property
    def dialect(self) -> Dialect: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...


def _sqlite_path(url: str) -> str:
    """The file path (or ``:memory:``) a ``sqlite:`` URL names."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return ":memory:"
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ConfigError(
            f"cannot read the SQLite URL {url!r}",
            hint="write sqlite:///relative/path.db or sqlite:////absolute/path.db",
        )
    return url[len("sqlite:///") :]


@functools.lru_cache(maxsize=512)
def _to_sqlite_placeholders(sql: str) -> str:
    """Rewrite ``$1`` placeholders to SQLite's ``?1``."""
    return _PLACEHOLDER.sub(r"?\1", sql)


class _SqliteConnection:
    """The :class:`Connection` of the SQLite backend, valid while its transaction runs."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *params: object) -> int:
        try:
            async with self._conn.execute(_to_sqlite_placeholders(sql), params) as cursor:
                return cursor.rowcount
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        try:
            async with self._conn.executemany(_to_sqlite_placeholders(sql), rows):
                pass
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        try:
            async with self._conn.execute(_to_sqlite_placeholders(sql), params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        # fetchall, not fetchone: a statement with RETURNING only completes (and its changes
        # only become part of the transaction) once every row has been stepped through.
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *params: object) -> Any:
        row = await self.fetchrow(sql, *params)
        return None if row is None else row[0]


class _SqliteBackend:
    """One aiosqlite connection, used by one transaction at a time."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, path: str, busy_timeout_ms: int) -> _SqliteBackend:
        # Open the file once with plain sqlite3 first: when aiosqlite fails to open a file it
        # stops its worker thread without waiting, and that thread later reports to an event
        # loop that may be gone. A failure here leaves no thread behind.
        try:
            await asyncio.to_thread(_probe, path)
            # isolation_level=None: the sqlite3 module must not open transactions on its own;
            # we issue BEGIN IMMEDIATE / COMMIT / ROLLBACK ourselves.
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open SQLite database {path!r}: {exc}",
                hint="check that the folder exists and is writable",
            ) from exc
        try:
            conn.row_factory = sqlite3.Row
            # WAL lets readers in other processes work while we write; FULL synchronous
            # makes each commit durable across a power loss, not only a process crash,
            # because a committed message or key must not silently come back or vanish.
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            await conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot set up SQLite database {path!r}: {exc}") from exc
        logger.debug("opened SQLite database %s", path)
        return cls(conn)

    async def close(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                await self._conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"closing the SQLite database failed: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            if self._closed:
                raise StoreError("the database is closed")
            try:
                # A cancelled task can leave a transaction open if its ROLLBACK never ran;
                # close it before starting ours rather than failing "within a transaction".
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                await self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _store_error(exc) from exc
            try:
                yield _SqliteConnection(self._conn)
            except BaseException:
                await self._rollback()
                raise
            try:
                await self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise _store_error(exc) from exc

    async def _rollback(self) -> None:
        try:
            await self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The transaction may already be gone (SQLite rolls back by itself on some
            # errors); the original exception is what the caller needs to see.
            logger.debug("ROLLBACK failed", exc_info=True)


def _probe(path: str) -> None:
    """Open and close a SQLite file (creating it if needed); raises sqlite3.Error if it can't."""
    if path != ":memory:":
        sqlite3.connect(path).close()


def _store_error(exc: sqlite3.Error) -> StoreError:
    """Our error for a SQLite failure, with a hint where one helps."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return StoreError(
            f"the database is busy: {text}",
            hint="another process holds a long write lock on the database file",
        )
    return StoreError(f"database error: {text}")
