"""The wallet store: one SQLite file in the wallet folder that owns everything durable.

It holds the account (id, device, password, own identity), every libsignal record, the shares
this wallet takes part in, received credentials, the ids of messages already processed, sealed
messages waiting to be delivered (the outbox), for a short while the messages sent (the send
log, :mod:`tigress_signal.wallet.send_log`), envelopes held while their sender's changed
identity key is not trusted, and the newest identity key seen for each peer. libsignal's
changes and a message's effect are written in one transaction (:meth:`WalletStore.transaction`),
which is what makes a crash at any point neither lose nor repeat a credential.

Only one process may use a wallet at a time; a second one fails fast with
:class:`~tigress_signal.errors.StoreLocked` (an ``flock`` on ``wallet.lock``).

Note:
    The database runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives
    the process being killed at any point, but an operating-system crash or power loss may roll
    back the last few commits. Acknowledgements to the server happen after the commit, so such a
    rollback could lose a message that had already been acknowledged; ``synchronous=FULL``
    (option ``durable_fsync``) closes that gap at the price of an fsync per message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from tigress_signal.bridge.records import RECORD_KINDS, RecordChange, RecordKind
from tigress_signal.errors import StoreError, StoreLocked

log = logging.getLogger(__name__)

DATABASE_NAME = "wallet.sqlite3"
LOCK_NAME = "wallet.lock"

# Each entry upgrades the schema by one version; the version reached is kept in user_version.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE account (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        account_id TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        password TEXT NOT NULL,
        identity_key_pair BLOB NOT NULL,
        identity_public_key BLOB NOT NULL,
        registration_id INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        next_value INTEGER NOT NULL
    );
    CREATE TABLE records (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE TABLE peer_devices (
        peer TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        registration_id INTEGER NOT NULL,
        PRIMARY KEY (peer, device_id)
    ) WITHOUT ROWID;
    CREATE TABLE shares (
        share_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('sender', 'receiver')),
        peer TEXT NOT NULL,
        flow TEXT NOT NULL CHECK (flow IN ('stateless', 'stateful')),
        state TEXT NOT NULL,
        credential_format TEXT NOT NULL,
        title TEXT NOT NULL,
        description TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        offer BLOB NOT NULL,
        private BLOB NOT NULL DEFAULT x''
    );
    CREATE TABLE credentials (
        share_id TEXT PRIMARY KEY REFERENCES shares (share_id),
        media_type TEXT NOT NULL,
        filename TEXT,
        content BLOB NOT NULL,
        from_peer TEXT NOT NULL,
        received_at TEXT NOT NULL
    );
    CREATE TABLE seen_messages (
        message_id TEXT PRIMARY KEY,
        seen_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE seen_envelopes (
        envelope_id TEXT PRIMARY KEY,
        seen_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        share_id TEXT NOT NULL,
        peer TEXT NOT NULL,
        wire BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE signing_keys (
        name TEXT PRIMARY KEY,
        private_key_pem BLOB NOT NULL,
        created_at TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # Several devices per account: which of the peer's devices answered a sent share first,
    # and the ephemeral key of a new device waiting to be linked (see wallet/linking.py).
    """
    ALTER TABLE shares ADD COLUMN answered_by_device INTEGER;
    CREATE TABLE pending_link (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key_pem BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    # Identity changes: envelopes kept while their sender's key is not trusted (oldest first by
    # seq, removed only once processed), and the newest identity key seen for each peer.
    """
    CREATE TABLE held_envelopes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        envelope_id TEXT NOT NULL UNIQUE,
        peer TEXT NOT NULL,
        source_device INTEGER NOT NULL,
        message_type INTEGER NOT NULL,
        content BLOB NOT NULL,
        held_at TEXT NOT NULL
    );
    CREATE INDEX held_envelopes_by_peer ON held_envelopes (peer, seq);
    CREATE TABLE peer_identity_seen (
        peer TEXT PRIMARY KEY,
        identity_key BLOB NOT NULL,
        seen_at TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # The send log (wallet/send_log.py): recently sent transfer messages, plaintext included,
    # kept for a short while so one a peer could not decrypt can be sent again.
    """
    CREATE TABLE send_log (
        peer TEXT NOT NULL,
        sent_at_ms INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        share_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        resends INTEGER NOT NULL DEFAULT 0,
        expires_at_ms INTEGER NOT NULL,
        PRIMARY KEY (peer, sent_at_ms)
    ) WITHOUT ROWID;
    CREATE INDEX send_log_by_share ON send_log (share_id);
    CREATE INDEX send_log_by_expiry ON send_log (expires_at_ms);
    """,
    # The signed prekeys and last-resort Kyber keys this wallet has made, for rotation: a key
    # is published once the server took it, retired when a newer one was published, and its
    # record is deleted a grace period after that. Existing wallets list the keys they
    # registered with, and the signed-prekey counter starts after them.
    """
    CREATE TABLE rotating_prekeys (
        kind TEXT NOT NULL CHECK (kind IN ('signed_prekey', 'last_resort_kyber')),
        key_id INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        published_at TEXT,
        retired_at TEXT,
        PRIMARY KEY (kind, key_id)
    ) WITHOUT ROWID;
    INSERT INTO rotating_prekeys (kind, key_id, created_at, published_at)
        SELECT 'signed_prekey', CAST(r.key AS INTEGER), a.created_at, a.created_at
        FROM records r, account a WHERE r.kind = 'signed_prekey';
    INSERT INTO rotating_prekeys (kind, key_id, created_at, published_at)
        SELECT 'last_resort_kyber', 1, a.created_at, a.created_at
        FROM records r, account a WHERE r.kind = 'kyber_prekey' AND r.key = '1';
    INSERT OR IGNORE INTO counters (name, next_value)
        SELECT 'signed_prekey', MAX(CAST(key AS INTEGER)) + 1 FROM records
        WHERE kind = 'signed_prekey' HAVING COUNT(*) > 0;
    """,
)


def utc_now_text() -> str:
    """The current time as ISO 8601 text in UTC, the form every timestamp is stored in."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Account:
    """This wallet's account at its intermediary.

    Attributes:
        account_id: the account's UUID, also its libsignal address name.
        device_id: this device's id within the account.
        password: the device password the server issued (a secret; never log it).
        identity_key_pair: serialized libsignal IdentityKeyPair (a secret).
        identity_public_key: serialized identity public key (33 bytes).
        registration_id: this install's libsignal registration id.
    """

    account_id: str
    device_id: int
    password: str
    identity_key_pair: bytes
    identity_public_key: bytes
    registration_id: int

    def __repr__(self) -> str:
        # The dataclass default would print the password and the private key.
        return f"Account(account_id={self.account_id!r}, device_id={self.device_id})"


@dataclass(frozen=True, slots=True)
class HeldEnvelope:
    """An envelope kept, still encrypted, until its sender's new identity key is trusted.

    Attributes:
        envelope_id: the intermediary's envelope guid.
        peer: the sender's account id.
        source_device: the sender's device id.
        message_type: libsignal's message type (2 Whisper, 3 PreKey).
        content: the ciphertext as it arrived.
    """

    envelope_id: str
    peer: str
    source_device: int
    message_type: int
    content: bytes = field(repr=False)


class WalletStore:
    """The SQLite store of one wallet folder.

    Use :meth:`open` to get one; it takes the folder's process lock, creates or upgrades the
    schema, and is closed with :meth:`close` (or used as a context manager).
    """

    def __init__(self, folder: Path, connection: sqlite3.Connection, lock_file: IO[bytes]) -> None:
        self.folder = folder
        self._db = connection
        self._lock_file = lock_file

    @classmethod
    def open(
        cls, folder: Path | str, *, create: bool = True, durable_fsync: bool = False
    ) -> WalletStore:
        """Open (and by default create) the wallet in ``folder``.

        Args:
            folder: the wallet folder.
            create: create the folder and database if they do not exist.
            durable_fsync: fsync every commit (``synchronous=FULL``), see the module note.

        Raises:
            StoreLocked: another process has this wallet open.
            StoreError: the folder or database cannot be opened.
        """
        path = Path(folder)
        if not path.is_dir():
            if not create:
                raise StoreError(f"no wallet folder at {path}")
            path.mkdir(parents=True, mode=0o700)
        if not create and not (path / DATABASE_NAME).exists():
            # Checked before the lock file is made: a folder that is not a wallet stays as it
            # was, so a later 'wallet init' or 'wallet link-request' can still use it.
            raise StoreError(f"{path} is not a wallet (no {DATABASE_NAME})")
        lock_file = cls._take_lock(path)
        try:
            db_path = path / DATABASE_NAME
            if not create and not db_path.exists():
                raise StoreError(f"{path} is not a wallet (no {DATABASE_NAME})")
            connection = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            os.chmod(db_path, 0o600)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={'FULL' if durable_fsync else 'NORMAL'}")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=5000")
            _migrate(connection)
        except sqlite3.Error as exc:
            lock_file.close()
            raise StoreError(f"cannot open the wallet database in {path}: {exc}") from exc
        except BaseException:
            lock_file.close()
            raise
        return cls(path, connection, lock_file)

    @staticmethod
    def _take_lock(folder: Path) -> IO[bytes]:
        lock_file = open(folder / LOCK_NAME, "ab")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock_file.close()
            raise StoreLocked(f"the wallet in {folder} is in use by another process") from exc
        return lock_file

    def close(self) -> None:
        """Close the database and release the process lock."""
        self._db.close()
        self._lock_file.close()

    def __enter__(self) -> WalletStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: everything done with the yielded connection commits together.

        Raises:
            StoreError: the transaction could not be committed (it was rolled back).
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start a wallet transaction: {exc}") from exc
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise StoreError(f"cannot commit to the wallet: {exc}") from exc

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for reads outside a transaction."""
        return self._db

    # -- account -------------------------------------------------------------------------

    def save_account(self, conn: sqlite3.Connection, account: Account) -> None:
        """Record this wallet's account (once, when the wallet registers)."""
        conn.execute(
            "INSERT INTO account (id, account_id, device_id, password,"
            " identity_key_pair, identity_public_key, registration_id, created_at)"
            " VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (
                account.account_id,
                account.device_id,
                account.password,
                account.identity_key_pair,
                account.identity_public_key,
                account.registration_id,
                utc_now_text(),
            ),
        )

    def save_pending_link(self, conn: sqlite3.Connection, private_key_pem: bytes) -> None:
        """Keep the ephemeral private key of a link request until the link is finished."""
        conn.execute(
            "INSERT INTO pending_link (id, private_key_pem, created_at) VALUES (1, ?, ?)",
            (private_key_pem, utc_now_text()),
        )

    def pending_link(self) -> bytes | None:
        """The private key of this folder's open link request, or None if there is none."""
        row = self._db.execute("SELECT private_key_pem FROM pending_link WHERE id = 1").fetchone()
        return bytes(row[0]) if row else None

    def clear_pending_link(self, conn: sqlite3.Connection) -> None:
        """Forget the link request's key (in the transaction that stores the linked account)."""
        conn.execute("DELETE FROM pending_link WHERE id = 1")

    def account(self) -> Account | None:
        """This wallet's account, or None before the wallet is registered."""
        row = self._db.execute(
            "SELECT account_id, device_id, password, identity_key_pair,"
            " identity_public_key, registration_id FROM account WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return Account(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5])

    def next_ids(self, conn: sqlite3.Connection, counter: str, count: int) -> int:
        """Reserve ``count`` consecutive ids from a named counter and return the first.

        The counter is advanced in the caller's transaction, before the ids are used anywhere,
        so an id is never handed out twice even if the process dies right after.
        """
        row = conn.execute("SELECT next_value FROM counters WHERE name = ?", (counter,)).fetchone()
        first = int(row[0]) if row else 1
        conn.execute(
            "INSERT INTO counters (name, next_value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET next_value = excluded.next_value",
            (counter, first + count),
        )
        return first

    def skip_ids_through(self, conn: sqlite3.Connection, counter: str, last: int) -> None:
        """Make sure a named counter never hands out ``last`` or an id below it."""
        conn.execute(
            "INSERT INTO counters (name, next_value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET next_value = max(next_value, excluded.next_value)",
            (counter, last + 1),
        )

    # -- libsignal records ---------------------------------------------------------------

    def load_record(self, kind: RecordKind, key: str) -> bytes | None:
        """Return a stored libsignal record, or None (the sidecar's RecordSource)."""
        row = self._db.execute(
            "SELECT value FROM records WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return bytes(row[0]) if row else None

    def apply_changes(self, conn: sqlite3.Connection, changes: Iterable[RecordChange]) -> None:
        """Write libsignal's record changes in the caller's transaction."""
        for change in changes:
            if change.kind not in RECORD_KINDS:
                raise StoreError(f"unknown libsignal record kind {change.kind!r}")
            if change.value is None:
                conn.execute(
                    "DELETE FROM records WHERE kind = ? AND key = ?", (change.kind, change.key)
                )
            else:
                conn.execute(
                    "INSERT INTO records (kind, key, value) VALUES (?, ?, ?)"
                    " ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
                    (change.kind, change.key, change.value),
                )

    def has_record(self, kind: RecordKind, key: str) -> bool:
        """Whether a record exists."""
        row = self._db.execute(
            "SELECT 1 FROM records WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return row is not None

    def count_records(self, kind: RecordKind) -> int:
        """How many records of a kind are stored."""
        row = self._db.execute("SELECT count(*) FROM records WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    # -- peers -----------------------------------------------------------------------------

    def save_peer_device(
        self, conn: sqlite3.Connection, peer: str, device_id: int, registration_id: int
    ) -> None:
        """Remember a peer device's registration id (the server checks it on every send)."""
        conn.execute(
            "INSERT INTO peer_devices (peer, device_id, registration_id) VALUES (?, ?, ?)"
            " ON CONFLICT (peer, device_id)"
            " DO UPDATE SET registration_id = excluded.registration_id",
            (peer, device_id, registration_id),
        )

    def peer_devices(self, peer: str) -> dict[int, int]:
        """A peer's known devices: device id to registration id."""
        rows = self._db.execute(
            "SELECT device_id, registration_id FROM peer_devices WHERE peer = ?", (peer,)
        ).fetchall()
        return {int(d): int(r) for d, r in rows}

        # -- identity keys seen and envelopes held ---------------------------------------------

    def note_identity_seen(self, conn: sqlite3.Connection, peer: str, identity_key: bytes) -> None:
        """Remember the newest identity key seen for a peer (one the trust policy refused)."""
        conn.execute(
            "INSERT INTO peer_identity_seen (peer, identity_key, seen_at) VALUES (?, ?, ?)"
            " ON CONFLICT (peer) DO UPDATE SET identity_key = excluded.identity_key,"
            " seen_at = excluded.seen_at",
            (peer, identity_key, utc_now_text()),
        )

    def identity_seen(self, peer: str) -> bytes | None:
        """The newest identity key seen for a peer and refused, or None."""
        row = self._db.execute(
            "SELECT identity_key FROM peer_identity_seen WHERE peer = ?", (peer,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def hold_envelope(self, conn: sqlite3.Connection, envelope: HeldEnvelope) -> None:
        """Keep an envelope until its sender's key is trusted (once per envelope id)."""
        conn.execute(
            "INSERT OR IGNORE INTO held_envelopes (envelope_id, peer, source_device,"
            " message_type, content, held_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                envelope.envelope_id,
                envelope.peer,
                envelope.source_device,
                envelope.message_type,
                envelope.content,
                utc_now_text(),
            ),
        )

    def is_held(self, envelope_id: str) -> bool:
        """Whether an envelope is among the held ones."""
        row = self._db.execute(
            "SELECT 1 FROM held_envelopes WHERE envelope_id = ?", (envelope_id,)
        ).fetchone()
        return row is not None

    def holds_for(self, peer: str) -> bool:
        """Whether any envelope from ``peer`` is held (newer ones then wait behind it)."""
        row = self._db.execute(
            "SELECT 1 FROM held_envelopes WHERE peer = ? LIMIT 1", (peer,)
        ).fetchone()
        return row is not None

    def held_envelopes(self, peer: str | None = None) -> list[HeldEnvelope]:
        """Held envelopes, oldest first; of one peer, or of every peer."""
        sql = "SELECT envelope_id, peer, source_device, message_type, content FROM held_envelopes"
        params: tuple[str, ...] = ()
        if peer is not None:
            sql += " WHERE peer = ?"
            params = (peer,)
        rows = self._db.execute(sql + " ORDER BY seq", params).fetchall()
        return [HeldEnvelope(r[0], r[1], int(r[2]), int(r[3]), bytes(r[4])) for r in rows]

    def release_held(self, conn: sqlite3.Connection, envelope_id: str) -> None:
        """Remove a held envelope (processed, or found already processed)."""
        conn.execute("DELETE FROM held_envelopes WHERE envelope_id = ?", (envelope_id,))

    # -- processed messages --------------------------------------------------------------

    def envelope_seen(self, envelope_id: str) -> bool:
        """Whether a server envelope was already processed (its effect committed)."""
        row = self._db.execute(
            "SELECT 1 FROM seen_envelopes WHERE envelope_id = ?", (envelope_id,)
        ).fetchone()
        return row is not None

    def mark_envelope_seen(self, conn: sqlite3.Connection, envelope_id: str) -> None:
        """Record that an envelope's effect is committed, in the caller's transaction."""
        conn.execute(
            "INSERT OR IGNORE INTO seen_envelopes (envelope_id, seen_at) VALUES (?, ?)",
            (envelope_id, utc_now_text()),
        )

    def message_seen(self, conn: sqlite3.Connection, message_id: str) -> bool:
        """Whether a transfer message id was already processed."""
        row = conn.execute(
            "SELECT 1 FROM seen_messages WHERE message_id = ?", (message_id,)
        ).fetchone()
        return row is not None

    def mark_message_seen(self, conn: sqlite3.Connection, message_id: str) -> None:
        """Record a transfer message id as processed, in the caller's transaction."""
        conn.execute(
            "INSERT INTO seen_messages (message_id, seen_at) VALUES (?, ?)",
            (message_id, utc_now_text()),
        )


def _migrate(connection: sqlite3.Connection) -> None:
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version > len(_MIGRATIONS):
        raise StoreError(
            f"the wallet schema is version {version}, newer than this tigress-signal knows"
            f" ({len(_MIGRATIONS)}); upgrade tigress-signal"
        )
    for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        log.info("upgrading wallet schema to version %d", number)
        connection.executescript(
            f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={number};\nCOMMIT;"
        )
