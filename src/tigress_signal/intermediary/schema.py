"""The intermediary's tables, as numbered migrations of the component ``intermediary``.

Version 1:

* ``accounts``: the account id and its identity key (fixed at creation, as in Signal-Server).
* ``devices``: a device's registration id, password hash, signed EC prekey and last-resort
  Kyber prekey (exactly one of each, replaced on upload).
* ``one_time_prekeys`` / ``one_time_pq_prekeys``: the pools handed out one per bundle fetch,
  oldest first by ``seq``.
* ``messages``: stored envelopes, per recipient device, oldest first by ``seq``.

``seq`` must grow forever and never be reused, even after the newest row is deleted: an open
WebSocket remembers the last ``seq`` it sent and asks only for later ones, so a reused number
would hide a new message from it. On SQLite that takes ``AUTOINCREMENT``; PostgreSQL's
identity columns behave so already.
"""

from __future__ import annotations

from tigress_signal.storage import Connection, Migration, Schema


async def _create_tables(conn: Connection) -> None:
    if conn.dialect == "postgresql":
        blob = "BYTEA"
        seq = "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    else:
        blob = "BLOB"
        seq = "seq INTEGER PRIMARY KEY AUTOINCREMENT"
    statements = [
        f"""
        CREATE TABLE accounts (
            uuid TEXT PRIMARY KEY,
            identity_key {blob} NOT NULL,
            created_at BIGINT NOT NULL
        )""",
        f"""
        CREATE TABLE devices (
            account_uuid TEXT NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
            device_id INTEGER NOT NULL,
            registration_id INTEGER NOT NULL,
            password_hash TEXT NOT NULL,
            signed_prekey_id BIGINT NOT NULL,
            signed_prekey {blob} NOT NULL,
            signed_prekey_signature {blob} NOT NULL,
            pq_last_resort_id BIGINT NOT NULL,
            pq_last_resort_key {blob} NOT NULL,
            pq_last_resort_signature {blob} NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (account_uuid, device_id)
        )""",
        f"""
        CREATE TABLE one_time_prekeys (
            {seq},
            account_uuid TEXT NOT NULL,
            device_id INTEGER NOT NULL,
            key_id BIGINT NOT NULL,
            public_key {blob} NOT NULL,
            FOREIGN KEY (account_uuid, device_id)
                REFERENCES devices (account_uuid, device_id) ON DELETE CASCADE
        )""",
        "CREATE INDEX one_time_prekeys_by_device"
        " ON one_time_prekeys (account_uuid, device_id, seq)",
        f"""
        CREATE TABLE one_time_pq_prekeys (
            {seq},
            account_uuid TEXT NOT NULL,
            device_id INTEGER NOT NULL,
            key_id BIGINT NOT NULL,
            public_key {blob} NOT NULL,
            signature {blob} NOT NULL,
            FOREIGN KEY (account_uuid, device_id)
                REFERENCES devices (account_uuid, device_id) ON DELETE CASCADE
        )""",
        "CREATE INDEX one_time_pq_prekeys_by_device"
        " ON one_time_pq_prekeys (account_uuid, device_id, seq)",
        f"""
        CREATE TABLE messages (
            {seq},
            guid TEXT NOT NULL UNIQUE,
            account_uuid TEXT NOT NULL,
            device_id INTEGER NOT NULL,
            type INTEGER NOT NULL,
            client_timestamp BIGINT NOT NULL,
            source_uuid TEXT,
            source_device INTEGER,
            server_timestamp BIGINT NOT NULL,
            urgent BOOLEAN NOT NULL,
            content {blob} NOT NULL,
            FOREIGN KEY (account_uuid, device_id)
                REFERENCES devices (account_uuid, device_id) ON DELETE CASCADE
        )""",
        "CREATE INDEX messages_by_device ON messages (account_uuid, device_id, seq)",
    ]
    for statement in statements:
        await conn.execute(statement)


INTERMEDIARY_SCHEMA = Schema(
    "intermediary",
    [Migration(1, "accounts, devices, prekey pools, messages", _create_tables)],
)
