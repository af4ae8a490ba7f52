"""An async SQL database opened from a URL, with transactions and one query style for all dialects.

Queries are written once, with PostgreSQL's numbered placeholders (``$1``, ``$2``, ...). On SQLite
they are rewritten to ``?1``, ``?2``, which SQLite binds the same way, so a caller only branches on
:attr:`Database.dialect` where the SQL itself differs (column types, ``RETURNING`` locking
clauses, upserts).

Supported URLs, in the form SQLAlchemy made familiar (``sqlite:///`` followed by the path):

* ``sqlite:///relative/path.db``: a file relative to the working directory;
* ``sqlite:////absolute/path.db``: an absolute path (four slashes);
* ``sqlite:///:memory:`` or ``sqlite://``: a private in-memory database;
* ``postgresql://user:password@host:port/database`` (or ``postgres://``): a PostgreSQL
  database through asyncpg, with a pool of connections; libpq's query parameters that asyncpg
  understands (``sslmode`` ...) may follow.

Foreign exceptions (``sqlite3.Error``, asyncpg's and the network's) become :class:`StoreError`
here. PostgreSQL also offers :meth:`Database.notify` and :meth:`Database.listen`
(LISTEN/NOTIFY), which let several server processes sharing one database wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tigress_signal.errors import ConfigError, StoreError, StoreUnavailable

logger = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]

#: How long a SQLite statement waits for another process's write lock before failing.
DEFAULT_BUSY_TIMEOUT_MS = 5000
#: Connections a PostgreSQL database keeps open at most (asyncpg's pool).
DEFAULT_POOL_SIZE = 10
#: Seconds to open a PostgreSQL connection, and at most one statement may run.
_PG_CONNECT_TIMEOUT = 10.0
_PG_COMMAND_TIMEOUT = 60.0
#: How often an idle LISTEN connection checks that the server still answers.
_LISTEN_PING_SECONDS = 5.0

_PLACEHOLDER = re.compile(r"\$(\d+)")
_T = TypeVar("_T")


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
        SQLite allows one writer at a time, so this class keeps a single writing connection
        and runs one transaction (or statement) at a time on it, queueing the others;
        transactions begin with ``BEGIN IMMEDIATE`` so another process writing the same file
        makes us wait (up to the busy timeout) at the start instead of failing half-way
        through. Single ``SELECT`` statements (:meth:`fetch` and its kin) run on a second,
        read-only connection and wait for no transaction. Each connection has its own
        thread, and each statement is one hand-over to it.
    """

    def __init__(self, backend: _Backend, url: str) -> None:
        self._backend = backend
        self._url = url

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> Database:
        """Open the database a URL names.

        Args:
            url: ``sqlite:///...`` or ``postgresql://...`` (see the module docstring).
            busy_timeout_ms: how long SQLite waits for another process's lock.
            pool_size: how many connections a PostgreSQL database keeps at most.

        Returns:
            The open database.

        Raises:
            ConfigError: the URL is not one this layer can open.
            StoreError: the database could not be opened (:class:`StoreUnavailable` when
                the server cannot be reached).
        """
        scheme = url.partition(":")[0].lower()
        if scheme == "sqlite":
            backend: _Backend = await _SqliteBackend.connect(_sqlite_path(url), busy_timeout_ms)
            return cls(backend, url)
        if scheme in ("postgresql", "postgres"):
            check_postgres_url(url)
            backend = await _PostgresBackend.connect(url, pool_size)
            return cls(backend, url)
        raise ConfigError(
            f"unsupported database URL scheme {scheme!r}",
            hint="use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE",
        )

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
        """Run one statement on its own; see :meth:`Connection.execute`.

        A single statement is atomic by itself, so it runs without ``BEGIN`` and ``COMMIT``
        (each of which costs a round trip to PostgreSQL or a hop to SQLite's thread).
        """
        async with self._backend.statement() as conn:
            return await conn.execute(sql, *params)

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        """Run one query on its own; see :meth:`Connection.fetch`.

        On SQLite a ``SELECT`` runs on a read-only connection of its own, beside whatever
        transaction is writing (WAL lets it), and sees every transaction committed so far.
        """
        async with self._backend.statement(read_only=_is_select(sql)) as conn:
            return await conn.fetch(sql, *params)

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        """Run one query on its own; see :meth:`Connection.fetchrow` and :meth:`fetch`."""
        async with self._backend.statement(read_only=_is_select(sql)) as conn:
            return await conn.fetchrow(sql, *params)

    async def fetchval(self, sql: str, *params: object) -> Any:
        """Run one query on its own; see :meth:`Connection.fetchval` and :meth:`fetch`."""
        async with self._backend.statement(read_only=_is_select(sql)) as conn:
            return await conn.fetchval(sql, *params)

    async def notify(self, channel: str, payload: str) -> None:
        """Send a PostgreSQL notification (``pg_notify``) to every listener of ``channel``.

        Raises:
            StoreError: the database is not PostgreSQL, or the notification failed.
        """
        async with self.transaction() as conn:
            if conn.dialect != "postgresql":
                raise StoreError("notifications need a PostgreSQL database")
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    def listener(
        self,
        channels: Mapping[str, Callable[[str], None]],
        *,
        on_connect: Callable[[], None] | None = None,
    ) -> Listener:
        """A LISTEN connection for ``channels``, kept open until closed (PostgreSQL only).

        Start it with :meth:`Listener.start`. Notifications sent while it is disconnected are
        lost; ``on_connect`` runs after every (re)connection so the caller can look again
        for whatever it might have missed.

        Args:
            channels: channel name to a function called with each notification's payload.
            on_connect: called each time the listener is (again) connected.

        Raises:
            StoreError: the database is not PostgreSQL.
        """
        if self.dialect != "postgresql":
            raise StoreError("notifications need a PostgreSQL database")
        return Listener(self._url, channels, on_connect)

    def __repr__(self) -> str:
        return f"<Database {self.dialect} {redact_url(self._url)!r}>"


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ``***``, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_postgres_url(url: str) -> None:
    """Check that a ``postgresql://`` URL names a database asyncpg can reach.

    Raises:
        ConfigError: it cannot be read, or its port is not a number.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(
            f"cannot read the PostgreSQL URL {redact_url(url)!r}: {exc}",
            hint="write postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        ) from None
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"not a PostgreSQL URL: {redact_url(url)!r}")
    if not parts.path.strip("/"):
        raise ConfigError(
            f"the PostgreSQL URL {redact_url(url)!r} names no database",
            hint="add /DATABASE at the end",
        )


class _Backend(Protocol):
    """What a dialect's connection handling provides to :class:`Database`."""

    @property
    def dialect(self) -> Dialect: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...

    def statement(self, *, read_only: bool = False) -> AbstractAsyncContextManager[Connection]: ...


def _is_select(sql: str) -> bool:
    """Whether a statement is a plain query (a ``WITH`` may hide a write, so it is not)."""
    return sql.lstrip()[:6].upper() == "SELECT"


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
    """The :class:`Connection` of the SQLite backend, valid while its transaction runs.

    Each method is one call to the database thread, which runs the statement and reads all
    its rows at once. In a transaction the first statement also runs the ``BEGIN IMMEDIATE``,
    in the same call.
    """

    dialect: Dialect = "sqlite"

    def __init__(
        self, db: sqlite3.Connection, call: Callable[..., Awaitable[Any]], *, begin: bool
    ) -> None:
        self._db = db
        self._call = call
        self._begin_pending = begin
        self.began = False

    async def execute(self, sql: str, *params: object) -> int:
        return await self._run(self._execute, _to_sqlite_placeholders(sql), params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._run(self._executemany, _to_sqlite_placeholders(sql), list(rows))

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        return await self._run(self._fetch, _to_sqlite_placeholders(sql), params)

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        # Every row is read, not only the first: a statement with RETURNING only completes
        # (and its changes only become part of the transaction) once all have been stepped.
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *params: object) -> Any:
        row = await self.fetchrow(sql, *params)
        return None if row is None else row[0]

    async def _run(self, work: Callable[[str, Any], _T], sql: str, params: Any) -> _T:
        try:
            return cast(_T, await self._call(self._prepared, work, sql, params))
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def _prepared(self, work: Callable[[str, Any], _T], sql: str, params: Any) -> _T:
        """In the database thread: begin the transaction if still due, then run ``work``."""
        if self._begin_pending:
            self._begin_pending = False
            _begin(self._db)
            self.began = True
        elif not self.began and self._db.in_transaction:
            # A transaction left open by a task cancelled before its ROLLBACK ran.
            self._db.execute("ROLLBACK")
        return work(sql, params)

    def _execute(self, sql: str, params: Sequence[object]) -> int:
        cursor = self._db.execute(sql, params)
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    def _executemany(self, sql: str, rows: list[Sequence[object]]) -> None:
        self._db.executemany(sql, rows).close()

    def _fetch(self, sql: str, params: Sequence[object]) -> list[Row]:
        cursor = self._db.execute(sql, params)
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()


class _SqliteBackend:
    """A writing sqlite3 connection in a thread of its own, used by one transaction at a
    time, and a read-only one in another thread for single queries.

    Every database call is one hand-over to a thread and back; a delivery makes several,
    and under load each hand-over waits for the scheduler, so they are kept to one per
    statement (plus one for the ``COMMIT``). Queries on the reader wait for no transaction.
    """

    dialect: Dialect = "sqlite"

    def __init__(self, writer: _SqliteThread, reader: _SqliteThread | None) -> None:
        self._writer = writer
        self._reader = reader
        self.db = writer.db
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, path: str, busy_timeout_ms: int) -> _SqliteBackend:
        writer = await _SqliteThread.open(path, busy_timeout_ms, read_only=False)
        # A second connection to ":memory:" would be another, empty database.
        if path == ":memory:":
            reader = None
        else:
            try:
                reader = await _SqliteThread.open(path, busy_timeout_ms, read_only=True)
            except BaseException:
                await writer.close()
                raise
        logger.debug("opened SQLite database %s", path)
        return cls(writer, reader)

    async def call(self, work: Callable[..., _T], *args: Any) -> _T:
        """Run ``work(*args)`` in the writing connection's thread."""
        return await self._writer.call(work, *args)

    async def close(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._reader is not None:
                    await self._reader.close()
            finally:
                await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            if self._closed:
                raise StoreError("the database is closed")
            conn = _SqliteConnection(self.db, self.call, begin=True)
            try:
                yield conn
            except BaseException:
                if conn.began:
                    await self._rollback()
                raise
            if conn.began:
                try:
                    await self.call(self.db.execute, "COMMIT")
                except sqlite3.Error as exc:
                    await self._rollback()
                    raise _store_error(exc) from exc

    @asynccontextmanager
    async def statement(self, *, read_only: bool = False) -> AsyncIterator[Connection]:
        """The connection for one statement in autocommit mode (it commits by itself).

        Nothing needs ``BEGIN`` or ``COMMIT``; a read-only statement goes to the reader.
        """
        if self._closed:
            raise StoreError("the database is closed")
        if read_only and self._reader is not None:
            # Its thread runs one query at a time; a query sees what was committed before.
            yield _SqliteConnection(self._reader.db, self._reader.call, begin=False)
            return
        async with self._lock:
            if self._closed:
                raise StoreError("the database is closed")
            yield _SqliteConnection(self.db, self.call, begin=False)

    async def _rollback(self) -> None:
        try:
            await self.call(_rollback_if_open, self.db)
        except sqlite3.Error:
            # The transaction may already be gone (SQLite rolls back by itself on some
            # errors); the original exception is what the caller needs to see.
            logger.debug("ROLLBACK failed", exc_info=True)


class _SqliteThread:
    """One sqlite3 connection and the single thread that uses it."""

    def __init__(self, db: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self.db = db
        self._thread = thread

    @classmethod
    async def open(cls, path: str, busy_timeout_ms: int, *, read_only: bool) -> _SqliteThread:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(thread, _open_sqlite, path, busy_timeout_ms, read_only)
        except sqlite3.Error as exc:
            thread.shutdown(wait=False)
            raise StoreError(
                f"cannot open SQLite database {path!r}: {exc}",
                hint="check that the folder exists and is writable",
            ) from exc
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(db, thread)

    async def call(self, work: Callable[..., _T], *args: Any) -> _T:
        """Run ``work(*args)`` in this connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def close(self) -> None:
        try:
            await self.call(self.db.close)
        except sqlite3.Error as exc:
            raise StoreError(f"closing the SQLite database failed: {exc}") from exc
        finally:
            self._thread.shutdown(wait=False)


def _open_sqlite(path: str, busy_timeout_ms: int, read_only: bool) -> sqlite3.Connection:
    """In the database thread: open the file and set it up; raises sqlite3.Error."""
    # isolation_level=None: the sqlite3 module must not open transactions on its own; we
    # issue BEGIN IMMEDIATE / COMMIT / ROLLBACK ourselves. The connection is only ever used
    # from the database thread, one call at a time.
    if not read_only:
        _create_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        # WAL lets readers in other processes work while we write; FULL synchronous makes
        # each commit durable across a power loss, not only a process crash, because a
        # committed message or key must not silently come back or vanish.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.execute("PRAGMA foreign_keys=ON")
        if read_only:
            # A write sent here by mistake fails instead of bypassing the writer's lock.
            db.execute("PRAGMA query_only=ON")
    except BaseException:
        db.close()
        raise
    return db


def _begin(db: sqlite3.Connection) -> None:
    """Start a write transaction, closing one a cancelled task may have left open."""
    if db.in_transaction:
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")


def _rollback_if_open(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


def _create_private(path: str) -> None:
    """Create a missing SQLite file readable by its owner only; raises sqlite3.Error if it can't.

    It holds password hashes and undelivered messages. SQLite gives its -wal and -shm files the
    same mode; an existing file keeps the mode its owner gave it.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot create {path}: {exc.strerror}") from exc


def _store_error(exc: sqlite3.Error) -> StoreError:
    """Our error for a SQLite failure, with a hint where one helps."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return StoreError(
            f"the database is busy: {text}",
            hint="another process holds a long write lock on the database file",
        )
    return StoreError(f"database error: {text}")


# -- PostgreSQL ------------------------------------------------------------------------------

#: What asyncpg and the network raise; all of it becomes StoreError at this boundary.
_PG_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def _rowcount(status: str) -> int:
    """The row count in a PostgreSQL command tag (``"DELETE 3"``, ``"INSERT 0 5"``)."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class _PostgresConnection:
    """The :class:`Connection` of the PostgreSQL backend, valid while its transaction runs."""

    dialect: Dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any]) -> None:
        self._conn = conn

    async def execute(self, sql: str, *params: object) -> int:
        try:
            return _rowcount(await self._conn.execute(sql, *params))
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        try:
            await self._conn.executemany(sql, list(rows))
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc

    async def fetch(self, sql: str, *params: object) -> list[Row]:
        try:
            return cast(list[Row], await self._conn.fetch(sql, *params))
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc

    async def fetchrow(self, sql: str, *params: object) -> Row | None:
        try:
            return cast(Row | None, await self._conn.fetchrow(sql, *params))
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc

    async def fetchval(self, sql: str, *params: object) -> Any:
        try:
            return await self._conn.fetchval(sql, *params)
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc


class _PostgresBackend:
    """An asyncpg pool; each transaction holds one pooled connection while it runs."""

    dialect: Dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool[Any], url: str) -> None:
        self._pool = pool
        self._url = url
        self._closed = False

    @classmethod
    async def connect(cls, url: str, pool_size: int) -> _PostgresBackend:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=_PG_CONNECT_TIMEOUT,
                command_timeout=_PG_COMMAND_TIMEOUT,
                server_settings={"application_name": "tigress-signal"},
                reset=_keep_session,
            )
        except _PG_FAILURES as exc:
            error = _pg_error(exc)
            raise type(error)(
                f"cannot open PostgreSQL database {redact_url(url)!r}: {exc}",
                hint="check that the server runs, the database exists and the URL's user may "
                "log in",
            ) from exc
        logger.debug("opened PostgreSQL database %s", redact_url(url))
        return cls(pool, url)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Transactions still running get a few seconds, then their connections are cut.
            async with asyncio.timeout(10):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()
        except _PG_FAILURES as exc:
            self._pool.terminate()
            raise StoreError(f"closing the PostgreSQL pool failed: {exc}") from exc

    @asynccontextmanager
    async def statement(self, *, read_only: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection for one statement, which PostgreSQL runs as its own transaction
        (whether it reads or writes makes no difference here).
        """
        if self._closed:
            raise StoreError("the database is closed")
        try:
            conn = await self._pool.acquire(timeout=_PG_CONNECT_TIMEOUT)
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc
        try:
            yield _PostgresConnection(conn)
        finally:
            with contextlib.suppress(*_PG_FAILURES):
                await self._pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        if self._closed:
            raise StoreError("the database is closed")
        try:
            conn = await self._pool.acquire(timeout=_PG_CONNECT_TIMEOUT)
        except _PG_FAILURES as exc:
            raise _pg_error(exc) from exc
        try:
            transaction = conn.transaction()
            try:
                await transaction.start()
            except _PG_FAILURES as exc:
                raise _pg_error(exc) from exc
            try:
                yield _PostgresConnection(conn)
            except BaseException:
                with contextlib.suppress(*_PG_FAILURES):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except _PG_FAILURES as exc:
                raise _pg_error(exc) from exc
        finally:
            # A connection broken mid-transaction is closed by the pool, not reused.
            with contextlib.suppress(*_PG_FAILURES):
                await self._pool.release(conn)


async def _keep_session(_conn: asyncpg.Connection[Any]) -> None:
    """Reset nothing when a connection goes back to the pool.

    asyncpg's default reset sends ``RESET ALL``, ``UNLISTEN *`` and more, one round trip per
    release. Pooled connections here never change session state: no ``SET``, no ``LISTEN``
    (the :class:`Listener` has its own connection), only transaction-scoped advisory locks.
    asyncpg still rolls back a transaction left open before calling this.
    """


def _pg_error(exc: BaseException) -> StoreError:
    """Our error for an asyncpg or network failure."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, asyncpg.exceptions.PostgresConnectionError | asyncpg.exceptions.CannotConnectNowError
    ):
        sqlstate = getattr(exc, "sqlstate", "") or ""
        return StoreError(f"database error {sqlstate}: {exc}".replace("  ", " "))
    return StoreUnavailable(
        f"the PostgreSQL database cannot be reached: {type(exc).__name__}: {exc}",
        hint="check that the PostgreSQL server is running and reachable",
    )


class Listener:
    """A dedicated PostgreSQL connection that LISTENs, reconnecting after failures.

    Made by :meth:`Database.listener`. While connected it also checks every few seconds that
    the server still answers, so a silently dropped connection is noticed and replaced.

    Attributes:
        connected: whether the LISTEN connection is up right now.
    """

    def __init__(
        self,
        url: str,
        channels: Mapping[str, Callable[[str], None]],
        on_connect: Callable[[], None] | None,
    ) -> None:
        self._url = url
        self._channels = dict(channels)
        self._on_connect = on_connect
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self.connected = False

    async def start(self, timeout: float = _PG_CONNECT_TIMEOUT) -> None:
        """Start listening; returns once the first connection attempt has ended.

        A failed first attempt is not an error: the listener keeps trying in the background
        and :attr:`connected` tells when it succeeded.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="postgresql-listener")
            self._task.add_done_callback(_log_crash)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._first_attempt.wait()

    async def aclose(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected = False

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=_PG_CONNECT_TIMEOUT,
                    server_settings={"application_name": "tigress-signal-listener"},
                )
            except _PG_FAILURES as exc:
                logger.warning("cannot open the LISTEN connection (%s); retrying", exc)
                self._first_attempt.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                await self._listen(conn)
                delay = 0.1
            except _PG_FAILURES as exc:
                logger.warning("the LISTEN connection failed (%s); reconnecting", exc)
            finally:
                self.connected = False
                conn.terminate()
            self._first_attempt.set()
            await asyncio.sleep(delay)

    async def _listen(self, conn: asyncpg.Connection[Any]) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, _dispatcher(channel, callback))
        self.connected = True
        self._first_attempt.set()
        logger.info("listening for notifications on %s", ", ".join(self._channels))
        if self._on_connect is not None:
            self._on_connect()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LISTEN_PING_SECONDS):
                    await lost.wait()
            if not lost.is_set():
                await conn.fetchval("SELECT 1", timeout=_LISTEN_PING_SECONDS)
        raise ConnectionResetError("the PostgreSQL server closed the LISTEN connection")


def _dispatcher(channel: str, callback: Callable[[str], None]) -> Callable[..., None]:
    def dispatch(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            callback(payload)
        except Exception:
            logger.error("handling a notification on %s failed", channel, exc_info=True)

    return dispatch


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the LISTEN task ended", exc_info=task.exception())
