"""Numbered schema migrations, recorded per component in a version table.

Each component that keeps tables in a database (the intermediary, later the Tigress relay)
declares a :class:`Schema`: its name and its migrations numbered 1, 2, 3, ... Opening a
database applies the missing ones in order, each in its own transaction together with the row
that records it in ``schema_version``, so a crash between two migrations leaves a database that
the next start simply continues upgrading. A migration is a function of the connection; it
branches on ``conn.dialect`` where SQLite and PostgreSQL need different DDL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tigress_signal.errors import StoreError
from tigress_signal.storage.database import Connection, Database

logger = logging.getLogger(__name__)

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of a component's schema.

    Attributes:
        version: the schema version this step produces (1 for the first).
        description: a few words on what it changes, stored in the version table.
        upgrade: applies the step inside the migration's transaction.
    """

    version: int
    description: str
    upgrade: Callable[[Connection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Schema:
    """The ordered migrations of one component.

    Attributes:
        component: the name the versions are recorded under, e.g. ``"intermediary"``.
        migrations: the steps, numbered 1..n without gaps.
    """

    component: str
    migrations: Sequence[Migration]

    def __post_init__(self) -> None:
        numbers = [m.version for m in self.migrations]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"migrations of {self.component} must be numbered 1..n: {numbers}")

    @property
    def latest(self) -> int:
        """The version a fully upgraded database has."""
        return len(self.migrations)


async def schema_version(db: Database, component: str) -> int:
    """The version of a component's schema in a database (0 when it has none).

    Raises:
        StoreError: the database could not be read.
    """
    async with db.transaction() as conn:
        await conn.execute(_VERSION_TABLE)
        return await _current_version(conn, component)


async def upgrade(db: Database, schema: Schema) -> int:
    """Apply a component's missing migrations, each in its own transaction.

    Safe to run from several processes at once: each step re-reads the version inside its
    transaction, which holds the write lock, so a step already applied elsewhere is skipped.

    Args:
        db: the open database.
        schema: the component's migrations.

    Returns:
        The schema version after upgrading.

    Raises:
        StoreError: a migration failed (its transaction is rolled back), or the database was
            written by a newer program that knows migrations this one does not.
    """
    async with db.transaction() as conn:
        if conn.dialect == "postgresql":
            # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL: two
            # processes creating the table at once can both pass the check and one then fails
            # on the catalogue's unique index. The lock makes them take turns.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('schema_version'))")
        await conn.execute(_VERSION_TABLE)
        current = await _current_version(conn, schema.component)
    _refuse_newer(schema, current)
    for migration in schema.migrations[current:]:
        async with db.transaction() as conn:
            if conn.dialect == "postgresql":
                # Several server processes may start together; serialize their upgrades.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema.component)
            current = await _current_version(conn, schema.component)
            if current >= migration.version:
                continue  # another process applied it meanwhile
            await migration.upgrade(conn)
            await conn.execute(
                "INSERT INTO schema_version (component, version, description, applied_at)"
                " VALUES ($1, $2, $3, $4)",
                schema.component,
                migration.version,
                migration.description,
                int(time.time()),
            )
        logger.info(
            "applied %s schema migration %d: %s",
            schema.component,
            migration.version,
            migration.description,
        )
    return await schema_version(db, schema.component)


def _refuse_newer(schema: Schema, current: int) -> None:
    if current > schema.latest:
        raise StoreError(
            f"the database holds {schema.component} schema version {current}, "
            f"newer than this program's {schema.latest}",
            hint="upgrade tigress-signal or use another database",
        )


async def _current_version(conn: Connection, component: str) -> int:
    value = await conn.fetchval(
        "SELECT MAX(version) FROM schema_version WHERE component = $1", component
    )
    return int(value) if value is not None else 0
