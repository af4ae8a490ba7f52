"""The relay's tables, as numbered migrations of the component ``tigress-relay``.

Version 1:

* ``mailboxes``: one row per live mailbox: the relay-chosen id, the current payload (one
  slot, overwritten by each update) and its version, the public display information, the
  access rights, the expiry, and the two bound device claims.
* ``mailbox_requests``: per mailbox and claim, the last ``Mailbox-Request-ID`` processed, so
  that a retried request is answered 201 without doing anything twice.

What is deliberately absent: accounts, device identities, addresses, push tokens,
attestations, creation times. Device claims are stored as SHA-256 digests: the relay only needs
to compare them, and a copy of the database must not let its holder act as a device. Rows go
away with the mailbox (``ON DELETE CASCADE``), by delete or by the expiry sweep.
"""

from __future__ import annotations

from tigress_signal.storage import Connection, Migration, Schema


async def _create_tables(conn: Connection) -> None:
    blob = "BYTEA" if conn.dialect == "postgresql" else "BLOB"
    statements = [
        f"""
        CREATE TABLE mailboxes (
            mailbox_id TEXT PRIMARY KEY,
            payload_type TEXT NOT NULL,
            payload {blob} NOT NULL,
            version BIGINT NOT NULL,
            display_title TEXT NOT NULL,
            display_description TEXT NOT NULL,
            display_image_url TEXT NOT NULL,
            access_rights TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            initiator_claim TEXT NOT NULL,
            recipient_claim TEXT
        )""",
        "CREATE INDEX mailboxes_by_expiry ON mailboxes (expires_at)",
        """
        CREATE TABLE mailbox_requests (
            mailbox_id TEXT NOT NULL REFERENCES mailboxes (mailbox_id) ON DELETE CASCADE,
            claim TEXT NOT NULL,
            request_id TEXT NOT NULL,
            PRIMARY KEY (mailbox_id, claim)
        )""",
        "CREATE INDEX mailbox_requests_by_request ON mailbox_requests (claim, request_id)",
    ]
    for statement in statements:
        await conn.execute(statement)


RELAY_SCHEMA = Schema(
    "tigress-relay",
    [Migration(1, "mailboxes and last request ids", _create_tables)],
)
