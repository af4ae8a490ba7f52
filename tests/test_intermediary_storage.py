"""The async SQL layer under the intermediary (``tigress_signal.storage``), on SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import POSTGRES
from tigress_signal.errors import ConfigError, StoreError, StoreUnavailable
from tigress_signal.storage import (
    Connection,
    Database,
    Migration,
    Schema,
    schema_version,
    upgrade,
)
from tigress_signal.storage.throwaway import free_loopback_port


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path / 'test.db'}")
    await database.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    yield database
    await database.close()


async def test_absolute_relative_and_memory_urls(tmp_path, monkeypatch):
    absolute = tmp_path / "absolute.db"
    async with await Database.open(f"sqlite:///{absolute}") as database:
        assert database.dialect == "sqlite"
        await database.execute("CREATE TABLE t (x)")
    assert absolute.exists()

    monkeypatch.chdir(tmp_path)
    async with await Database.open("sqlite:///relative.db") as database:
        await database.execute("CREATE TABLE t (x)")
    assert (tmp_path / "relative.db").exists()

    for url in ("sqlite://", "sqlite:///:memory:"):
        async with await Database.open(url) as database:
            assert await database.fetchval("SELECT $1 + $2", 2, 3) == 5


@pytest.mark.parametrize("url", ["sqlite:", "sqlite:///", "sqlite:relative.db", "mysql://x/y"])
async def test_unreadable_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        await Database.open(url)


async def test_an_unreachable_postgresql_server_is_store_unavailable_with_the_password_hidden():
    port = free_loopback_port()  # nothing listens there
    with pytest.raises(StoreUnavailable) as caught:
        await Database.open(f"postgresql://user:secret@127.0.0.1:{port}/db")
    assert "secret" not in str(caught.value) and caught.value.hint


@pytest.mark.parametrize(
    "url", ["postgresql://127.0.0.1:5432/", "postgresql://h:port/db", "postgres://x:99999999/d"]
)
async def test_unreadable_postgresql_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        await Database.open(url)


async def test_a_missing_folder_is_a_store_error(tmp_path):
    with pytest.raises(StoreError) as caught:
        await Database.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert caught.value.hint


async def test_a_new_sqlite_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "server.db"
    async with await Database.open(f"sqlite:///{path}") as db:
        await db.execute("CREATE TABLE t (x INTEGER)")
        await db.execute("INSERT INTO t VALUES (1)")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["server.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_an_existing_sqlite_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.db"
    sqlite3.connect(path).close()
    path.chmod(0o640)
    async with await Database.open(f"sqlite:///{path}"):
        pass
    assert path.stat().st_mode & 0o777 == 0o640


async def test_wal_mode_busy_timeout_and_foreign_keys(db):
    async with db.transaction() as conn:
        assert await conn.fetchval("PRAGMA journal_mode") == "wal"
        assert await conn.fetchval("PRAGMA busy_timeout") == 5000
        assert await conn.fetchval("PRAGMA foreign_keys") == 1


async def test_numbered_placeholders_in_any_order(db):
    await db.execute("INSERT INTO items (id, name) VALUES ($2, $1)", "second", 2)
    row = await db.fetchrow("SELECT id, name FROM items WHERE name = $1 AND id = $2", "second", 2)
    assert row is not None and (row["id"], row["name"]) == (2, "second")
    assert row[0] == 2 and row.keys() == ["id", "name"]


async def test_commit_and_rollback(db):
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO items (name) VALUES ($1)", "kept")
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items (name) VALUES ($1)", "dropped")
            raise RuntimeError("abort")
    assert [r["name"] for r in await db.fetch("SELECT name FROM items")] == ["kept"]


async def test_rowcount_executemany_and_returning(db):
    async with db.transaction() as conn:
        await conn.executemany("INSERT INTO items (name) VALUES ($1)", [("a",), ("b",), ("c",)])
        assert await conn.execute("UPDATE items SET name = name || '!'") == 3
        taken = await conn.fetchrow(
            "DELETE FROM items WHERE id = (SELECT MIN(id) FROM items) RETURNING name"
        )
        assert taken is not None and taken["name"] == "a!"
    assert await db.fetchval("SELECT COUNT(*) FROM items") == 2
    assert await db.fetchrow("SELECT * FROM items WHERE id = $1", 99) is None
    assert await db.fetchval("SELECT name FROM items WHERE id = $1", 99) is None


async def test_sqlite_errors_become_store_errors(db):
    with pytest.raises(StoreError) as caught:
        await db.execute("INSERT INTO items (name) VALUES (NULL)")
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    with pytest.raises(StoreError):
        await db.fetch("SELECT nonsense FROM nowhere")
    # The failed statements left no transaction open.
    await db.execute("INSERT INTO items (name) VALUES ($1)", "fine")


async def test_concurrent_transactions_are_serialized(db):
    await db.execute("INSERT INTO items (id, name) VALUES (1, '0')")

    async def increment() -> None:
        async with db.transaction() as conn:
            value = int(await conn.fetchval("SELECT name FROM items WHERE id = 1"))
            await asyncio.sleep(0)  # let the others try to interleave
            await conn.execute("UPDATE items SET name = $1 WHERE id = 1", str(value + 1))

    await asyncio.gather(*(increment() for _ in range(25)))
    assert await db.fetchval("SELECT name FROM items WHERE id = 1") == "25"


async def test_a_cancelled_transaction_is_rolled_back(db):
    entered = asyncio.Event()

    async def slow() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items (name) VALUES ($1)", "cancelled")
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await db.fetchval("SELECT COUNT(*) FROM items") == 0
    await db.execute("INSERT INTO items (name) VALUES ($1)", "after")


async def test_a_query_waits_for_no_transaction_and_sees_only_committed_rows(db):
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO items (name) VALUES ($1)", "pending")
        # Were queries queued behind transactions, this one would wait for the very
        # transaction it runs in, forever (the timeout only turns that hang into a failure).
        assert await asyncio.wait_for(db.fetchval("SELECT COUNT(*) FROM items"), 60) == 0
    assert await db.fetchval("SELECT COUNT(*) FROM items") == 1


async def test_statements_that_write_and_return_rows_run_on_the_writer(db):
    # The query connection is read-only: these would fail there.
    assert await db.fetchval("INSERT INTO items (name) VALUES ($1) RETURNING id", "a") == 1
    row = await db.fetchrow("  WITH gone AS (SELECT 1) DELETE FROM items RETURNING name")
    assert row is not None and row["name"] == "a"
    assert await db.fetchval("SELECT COUNT(*) FROM items") == 0


async def test_an_in_memory_database_reads_its_own_writes():
    async with await Database.open("sqlite://") as database:
        await database.execute("CREATE TABLE t (x)")
        await database.execute("INSERT INTO t VALUES (7)")
        assert await database.fetchval("SELECT x FROM t") == 7


async def test_a_closed_database_refuses_work(tmp_path):
    database = await Database.open("sqlite://")
    await database.close()
    await database.close()  # twice is fine
    with pytest.raises(StoreError):
        await database.execute("SELECT 1")


async def test_another_process_holding_the_write_lock_makes_us_wait_then_fail(tmp_path):
    path = tmp_path / "locked.db"
    async with await Database.open(f"sqlite:///{path}", busy_timeout_ms=200) as database:
        await database.execute("CREATE TABLE t (x)")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError) as caught:
                await database.execute("INSERT INTO t VALUES (1)")
            assert "busy" in str(caught.value)
        finally:
            other.execute("ROLLBACK")
            other.close()
        await database.execute("INSERT INTO t VALUES (1)")


# -- migrations --------------------------------------------------------------------------------


def _schema(*steps: str, component: str = "widgets") -> Schema:
    def make(sql: str):
        async def apply(conn: Connection) -> None:
            await conn.execute(sql)

        return apply

    return Schema(
        component,
        [Migration(i + 1, f"step {i + 1}", make(sql)) for i, sql in enumerate(steps)],
    )


async def test_migrations_apply_in_order_once_and_are_recorded(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    first = _schema("CREATE TABLE a (x)")
    both = _schema("CREATE TABLE a (x)", "ALTER TABLE a ADD COLUMN y")
    async with await Database.open(url) as database:
        assert await schema_version(database, "widgets") == 0
        assert await upgrade(database, first) == 1
        assert await upgrade(database, first) == 1  # nothing left to do
    async with await Database.open(url) as database:
        assert await upgrade(database, both) == 2
        await database.execute("INSERT INTO a (x, y) VALUES (1, 2)")
        rows = await database.fetch(
            "SELECT version, description FROM schema_version WHERE component = $1"
            " ORDER BY version",
            "widgets",
        )
        assert [(r["version"], r["description"]) for r in rows] == [(1, "step 1"), (2, "step 2")]


async def test_components_have_separate_versions(tmp_path):
    async with await Database.open("sqlite://") as database:
        await upgrade(database, _schema("CREATE TABLE a (x)", "CREATE TABLE b (x)"))
        await upgrade(database, _schema("CREATE TABLE c (x)", component="relay"))
        assert await schema_version(database, "widgets") == 2
        assert await schema_version(database, "relay") == 1


async def test_a_failing_migration_rolls_back_and_keeps_earlier_ones(tmp_path):
    async with await Database.open("sqlite://") as database:
        broken = _schema("CREATE TABLE a (x)", "CREATE TABLE b (x)", "NOT SQL AT ALL")
        with pytest.raises(StoreError):
            await upgrade(database, broken)
        assert await schema_version(database, "widgets") == 2
        fixed = _schema("CREATE TABLE a (x)", "CREATE TABLE b (x)", "CREATE TABLE c (x)")
        assert await upgrade(database, fixed) == 3


async def test_a_database_from_a_newer_program_is_refused(tmp_path):
    async with await Database.open("sqlite://") as database:
        await upgrade(database, _schema("CREATE TABLE a (x)", "CREATE TABLE b (x)"))
        with pytest.raises(StoreError, match="newer"):
            await upgrade(database, _schema("CREATE TABLE a (x)"))


def test_migrations_must_be_numbered_from_one_without_gaps():
    async def noop(conn: Connection) -> None:
        return None

    with pytest.raises(ValueError, match=r"1\.\.n"):
        Schema("x", [Migration(1, "a", noop), Migration(3, "c", noop)])
    with pytest.raises(ValueError, match=r"1\.\.n"):
        Schema("x", [Migration(2, "b", noop)])


async def test_servers_starting_together_on_a_new_postgresql_database_all_upgrade(tmp_path):
    # Several server processes may start at the same moment against an empty database; the
    # first transaction (creating the version table) and each migration must take turns.
    url = await POSTGRES.new_database()
    schema = _schema("CREATE TABLE a (x INTEGER)", "CREATE TABLE b (x INTEGER)")
    databases = [await Database.open(url) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(upgrade(db, schema) for db in databases))
        assert versions == [2, 2, 2, 2]
        rows = await databases[0].fetch(
            "SELECT version FROM schema_version WHERE component = $1", "widgets"
        )
        assert sorted(r["version"] for r in rows) == [1, 2]
    finally:
        for db in databases:
            await db.close()
