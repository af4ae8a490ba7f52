"""What each server actually stored during the run, read from its own database.

Before the first transfer, :func:`install_audit` adds triggers to a server's SQLite file that
copy every row the server inserts, updates or deletes, with the time, into a table of ours
(``evaluation_observed``). The server's code is not touched and does not know; the triggers
see what an operator, a backup or a thief of the database would see at that moment, including
rows the server deletes a second later (delivered messages, used prekeys). After the run,
:func:`read_observations` reads them back and :func:`analyse` attributes each row to the
transfer during which it was written and works out, from the values themselves, which stored
values identify a sender or a recipient and which link one transfer to another.

Which column holds what kind of value (a sender's account id, a device claim, display text) is
written down below per server; everything counted comes from the run.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUDIT_TABLE = "evaluation_observed"

#: What a column holds, per server and ``table.column``. Kinds:
#: ``sender`` / ``recipient``: identifies that party (account, device, or device claim);
#: ``party``: identifies a party whose role the row does not tell; ``share``: names one share
#: or message only; ``display``: text shown to people; ``time``: a timestamp; ``content``:
#: ciphertext or key material; ``other``: counters, flags, types.
COLUMN_KINDS: Mapping[str, Mapping[str, str]] = {
    "intermediary": {
        "accounts.uuid": "party",
        "accounts.identity_key": "party",
        "accounts.created_at": "time",
        "devices.account_uuid": "party",
        "devices.registration_id": "party",
        "devices.password_hash": "content",
        "devices.created_at": "time",
        "messages.guid": "share",
        "messages.account_uuid": "recipient",
        "messages.device_id": "other",
        "messages.source_uuid": "sender",
        "messages.source_device": "other",
        "messages.client_timestamp": "time",
        "messages.server_timestamp": "time",
        "messages.content": "content",
        "messages.type": "other",
        "messages.urgent": "other",
        "one_time_prekeys.account_uuid": "party",
        "one_time_pq_prekeys.account_uuid": "party",
    },
    "tigress-relay": {
        "mailboxes.mailbox_id": "share",
        "mailboxes.initiator_claim": "sender",
        "mailboxes.recipient_claim": "recipient",
        "mailboxes.display_title": "display",
        "mailboxes.display_description": "display",
        "mailboxes.display_image_url": "display",
        "mailboxes.expires_at": "time",
        "mailboxes.payload": "content",
        "mailboxes.payload_type": "other",
        "mailboxes.version": "other",
        "mailboxes.access_rights": "other",
        "mailbox_requests.mailbox_id": "share",
        "mailbox_requests.claim": "party",
        "mailbox_requests.request_id": "share",
    },
}
#: The kinds whose repeated values tie transfers together.
IDENTIFYING_KINDS = frozenset({"sender", "recipient", "party"})


@dataclass(frozen=True, slots=True)
class Observation:
    """One row a server wrote (or deleted), as the audit trigger saw it.

    Attributes:
        at_ms: when, in ms since the epoch.
        table: the server's table.
        operation: ``insert``, ``update`` or ``delete``.
        row: the row's columns (blobs as hex text).
    """

    at_ms: int
    table: str
    operation: str
    row: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ColumnFinding:
    """What one column held over the run.

    Attributes:
        column: ``table.column``.
        kind: see :data:`COLUMN_KINDS`.
        distinct: how many distinct values it held.
        transfers: in how many transfers a value was written to it.
        linking_values: values that were written in two or more transfers.
        linked_transfers: transfers that share a value with another transfer.
    """

    column: str
    kind: str
    distinct: int
    transfers: int
    linking_values: int
    linked_transfers: int


@dataclass(slots=True)
class ServerFindings:
    """Everything the run learned about one server's storage.

    Attributes:
        server: ``intermediary`` or ``tigress-relay``.
        tables: per table, rows written (inserted) and rows left at the end.
        columns: one finding per column that held a value during a transfer.
        pairs_linked: sender/recipient pairs written in two or more transfers.
        stores_addresses: whether any stored value contains a client address.
        transfers: how many transfers the findings cover.
    """

    server: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    columns: list[ColumnFinding] = field(default_factory=list)
    pairs_linked: int = 0
    stores_addresses: bool = False
    transfers: int = 0

    def columns_of(self, *kinds: str) -> list[ColumnFinding]:
        """The findings of the columns of these kinds."""
        return [c for c in self.columns if c.kind in kinds]

    @property
    def linking_columns(self) -> list[ColumnFinding]:
        """Identifying columns with at least one value that spans two transfers."""
        return [c for c in self.columns_of(*IDENTIFYING_KINDS) if c.linking_values]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        return {
            "server": self.server,
            "transfers": self.transfers,
            "tables": self.tables,
            "columns": [
                {
                    "column": c.column,
                    "kind": c.kind,
                    "distinct_values": c.distinct,
                    "transfers_with_values": c.transfers,
                    "values_in_two_or_more_transfers": c.linking_values,
                    "transfers_linked": c.linked_transfers,
                }
                for c in self.columns
            ],
            "sender_recipient_pairs_in_two_or_more_transfers": self.pairs_linked,
            "stores_client_addresses": self.stores_addresses,
        }


def install_audit(db_path: Path, tables: Sequence[str]) -> None:
    """Add the audit table and triggers to a server's SQLite database.

    Args:
        db_path: the database file (the server may be running; WAL mode lets us in).
        tables: the server's tables to watch.
    """
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " at_ms INTEGER NOT NULL, tbl TEXT NOT NULL, op TEXT NOT NULL, row TEXT NOT NULL)"
        )
        now_ms = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            for operation, ref in (("insert", "NEW"), ("update", "NEW"), ("delete", "OLD")):
                pairs = ", ".join(
                    f"'{c}', CASE WHEN typeof({ref}.{c}) = 'blob' THEN hex({ref}.{c})"
                    f" ELSE {ref}.{c} END"
                    for c in columns
                )
                # Names come from the server's own schema, not from outside input.
                trigger = (
                    f"CREATE TRIGGER IF NOT EXISTS evaluation_{table}_{operation}"  # noqa: S608
                    f" AFTER {operation.upper()} ON {table} BEGIN"
                    f" INSERT INTO {AUDIT_TABLE} (at_ms, tbl, op, row)"
                    f" VALUES ({now_ms}, '{table}', '{operation}', json_object({pairs})); END"
                )
                conn.execute(trigger)
        conn.commit()


def read_observations(db_path: Path) -> list[Observation]:
    """Every row the audit triggers recorded, oldest first."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        rows = conn.execute(
            f"SELECT at_ms, tbl, op, row FROM {AUDIT_TABLE} ORDER BY seq"  # noqa: S608
        ).fetchall()
    return [
        Observation(int(at), str(table), str(op), json.loads(row)) for at, table, op, row in rows
    ]


def rows_left(db_path: Path, tables: Iterable[str]) -> dict[str, int]:
    """How many rows each table holds now."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables}  # noqa: S608


def table_names(db_path: Path) -> list[str]:
    """The tables of a database, except SQLite's own and ours."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        names = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
    return [n for n in names if not n.startswith("sqlite_") and n != AUDIT_TABLE]


def analyse(
    server: str,
    observations: Sequence[Observation],
    windows: Mapping[str, tuple[int, int]],
    final_rows: Mapping[str, int],
    *,
    addresses: Iterable[str] = ("127.0.0.1",),
) -> ServerFindings:
    """Attribute what a server wrote to transfers and find identifying and linking values.

    Args:
        server: a key of :data:`COLUMN_KINDS`.
        observations: the audit rows of that server.
        windows: per transfer id, the [start, end] ms during which it ran.
        final_rows: rows left per table at the end.
        addresses: client addresses to look for in stored values.
    """
    kinds = COLUMN_KINDS.get(server, {})
    findings = ServerFindings(server=server, transfers=len(windows))
    written: dict[str, int] = defaultdict(int)
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    pairs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for observation in observations:
        if observation.operation == "insert":
            written[observation.table] += 1
        text = json.dumps(observation.row)
        if any(address in text for address in addresses):
            findings.stores_addresses = True
        if observation.operation == "delete":
            continue
        transfer = _transfer_at(observation.at_ms, windows)
        if transfer is None:
            continue
        for column, value in observation.row.items():
            if value is None or value == "":
                continue
            values[f"{observation.table}.{column}"][str(value)].add(transfer)
        if observation.table == "messages":
            pairs[
                (str(observation.row.get("source_uuid")), str(observation.row.get("account_uuid")))
            ].add(transfer)
        if observation.table == "mailboxes" and observation.row.get("recipient_claim"):
            pairs[
                (
                    str(observation.row.get("initiator_claim")),
                    str(observation.row.get("recipient_claim")),
                )
            ].add(transfer)
    for table in sorted(set(written) | set(final_rows)):
        findings.tables[table] = {
            "rows_written": written.get(table, 0),
            "rows_left": final_rows.get(table, 0),
        }
    for column in sorted(values):
        by_value = values[column]
        spanning = [t for t in by_value.values() if len(t) >= 2]
        findings.columns.append(
            ColumnFinding(
                column=column,
                kind=kinds.get(column, "other"),
                distinct=len(by_value),
                transfers=len(set().union(*by_value.values())),
                linking_values=len(spanning),
                linked_transfers=len(set().union(*spanning)) if spanning else 0,
            )
        )
    findings.pairs_linked = sum(1 for t in pairs.values() if len(t) >= 2)
    return findings


def _transfer_at(at_ms: int, windows: Mapping[str, tuple[int, int]]) -> str | None:
    for transfer, (start, end) in windows.items():
        if start <= at_ms <= end:
            return transfer
    return None
