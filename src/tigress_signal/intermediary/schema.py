"""The intermediary's tables, as numbered migrations of the component ``intermediary``.

Version 1:

* ``accounts``: the account id and its identity key (fixed at creation, as in Signal-Server).
* ``devices``: a device's registration id, password hash, signed EC prekey and last-resort
  Kyber prekey (exactly one of each, replaced on upload).
* ``one_time_prekeys`` / ``one_time_pq_prekeys``: the pools handed out one per bundle fetch,
  oldest first by ``seq``.
* ``messages``: stored envelopes, per recipient device, oldest first by ``seq``.

Version 2 (several devices, prekey lifecycle, limits and retention, several processes):

* ``messages.expires_at`` (ms; swept after it passes) and ``messages.content_size`` (bytes, for
  the per-device queue limit without reading the contents);
* ``link_codes``: one-time codes to link a new device, stored as SHA-256 digests;
* ``prekey_ids``: every key id a device has published, per key kind (``ec`` one-time EC,
  ``signed`` signed EC, ``kem`` one-time and last-resort Kyber, which share libsignal's id
  space), with a digest of its public key and when it stopped being offered (handed out or
  replaced), so a later upload can be refused when it reuses an id with other material and a
  key already handed out is never offered again; rows are pruned after the retention time;
* ``server_processes`` and ``presence``: which server process holds which device's WebSocket,
  with a heartbeat, so any process can tell whether a device is connected anywhere.

``seq`` must grow forever and never be reused, even after the newest row is deleted: an open
WebSocket remembers the last ``seq`` it sent and asks only for later ones, so a reused number
would hide a new message from it. On SQLite that takes ``AUTOINCREMENT``; PostgreSQL's
identity columns behave so already.
"""

from __future__ import annotations

import hashlib

from tigress_signal.storage import Connection, Migration, Schema


def key_digest(public_key: bytes) -> bytes:
    """The digest ``prekey_ids`` keeps of a public key."""
    return hashlib.sha256(public_key).digest()


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


# 2592000000 ms: the 30 days given to messages stored before expiries were recorded.
_BACKFILL_EXPIRY_AND_SIZE = (
    "UPDATE messages SET content_size = LENGTH(content),"
    " expires_at = server_timestamp + 2592000000"
)


async def _devices_keys_limits_presence(conn: Connection) -> None:
    blob = "BYTEA" if conn.dialect == "postgresql" else "BLOB"
    statements = [
        "ALTER TABLE messages ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN content_size INTEGER NOT NULL DEFAULT 0",
        _BACKFILL_EXPIRY_AND_SIZE,
        "CREATE INDEX messages_by_expiry ON messages (expires_at)",
        """
        CREATE TABLE link_codes (
            code_hash TEXT PRIMARY KEY,
            account_uuid TEXT NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
            issued_by INTEGER NOT NULL,
            expires_at BIGINT NOT NULL
        )""",
        "CREATE INDEX link_codes_by_expiry ON link_codes (expires_at)",
        f"""
        CREATE TABLE prekey_ids (
            account_uuid TEXT NOT NULL,
            device_id INTEGER NOT NULL,
            kind TEXT NOT NULL,
            key_id BIGINT NOT NULL,
            digest {blob} NOT NULL,
            released_at BIGINT,
            PRIMARY KEY (account_uuid, device_id, kind, key_id),
            FOREIGN KEY (account_uuid, device_id)
                REFERENCES devices (account_uuid, device_id) ON DELETE CASCADE
        )""",
        "CREATE INDEX prekey_ids_by_release ON prekey_ids (released_at)",
        """
        CREATE TABLE server_processes (
            server_id TEXT PRIMARY KEY,
            started_at BIGINT NOT NULL,
            heartbeat_at BIGINT NOT NULL
        )""",
        """
        CREATE TABLE presence (
            account_uuid TEXT NOT NULL,
            device_id INTEGER NOT NULL,
            server_id TEXT NOT NULL,
            connection_id TEXT NOT NULL,
            connected_at BIGINT NOT NULL,
            PRIMARY KEY (account_uuid, device_id),
            FOREIGN KEY (account_uuid, device_id)
                REFERENCES devices (account_uuid, device_id) ON DELETE CASCADE
        )""",
    ]
    for statement in statements:
        await conn.execute(statement)

    # The keys already published enter the ledger as offered (not yet released).
    ledger: list[tuple[object, ...]] = []
    for row in await conn.fetch(
        "SELECT account_uuid, device_id, key_id, public_key FROM one_time_prekeys"
    ):
        ledger.append((row[0], row[1], "ec", row[2], key_digest(bytes(row[3]))))
    for row in await conn.fetch(
        "SELECT account_uuid, device_id, key_id, public_key FROM one_time_pq_prekeys"
    ):
        ledger.append((row[0], row[1], "kem", row[2], key_digest(bytes(row[3]))))
    for row in await conn.fetch(
        "SELECT account_uuid, device_id, signed_prekey_id, signed_prekey,"
        " pq_last_resort_id, pq_last_resort_key FROM devices"
    ):
        ledger.append((row[0], row[1], "signed", row[2], key_digest(bytes(row[3]))))
        ledger.append((row[0], row[1], "kem", row[4], key_digest(bytes(row[5]))))
    # A version-1 database may hold the same id twice (it did not check); keep the first.
    unique: dict[tuple[object, ...], tuple[object, ...]] = {}
    for entry in ledger:
        unique.setdefault(entry[:4], entry)
    if unique:
        await conn.executemany(
            "INSERT INTO prekey_ids (account_uuid, device_id, kind, key_id, digest)"
            " VALUES ($1, $2, $3, $4, $5)",
            list(unique.values()),
        )


INTERMEDIARY_SCHEMA = Schema(
    "intermediary",
    [
        Migration(1, "accounts, devices, prekey pools, messages", _create_tables),
        Migration(
            2,
            "message expiry and size, link codes, prekey id ledger, presence",
            _devices_keys_limits_presence,
        ),
    ],
)
