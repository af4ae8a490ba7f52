"""The async SQL layer shared by the servers: SQLite now, PostgreSQL later.

Open a :class:`Database` from a URL, bring a component's tables up to date with
:func:`upgrade`, then work in ``async with db.transaction() as conn:`` blocks. SQL is written
with ``$1``-style placeholders for every dialect.
"""

from tigress_signal.storage.database import Connection as Connection
from tigress_signal.storage.database import Database as Database
from tigress_signal.storage.database import Dialect as Dialect
from tigress_signal.storage.database import Row as Row
from tigress_signal.storage.migrations import Migration as Migration
from tigress_signal.storage.migrations import Schema as Schema
from tigress_signal.storage.migrations import schema_version as schema_version
from tigress_signal.storage.migrations import upgrade as upgrade

__all__ = [
    "Connection",
    "Database",
    "Dialect",
    "Migration",
    "Row",
    "Schema",
    "schema_version",
    "upgrade",
]
