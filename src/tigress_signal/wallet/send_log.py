"""The send log: transfer messages this wallet sent recently, kept to send one again.

When a peer's device cannot decrypt a message (its session with us diverged, say after it
restored an old backup) it answers with a decryption-error message naming the message's
timestamp. To send that message again on a new session the wallet needs its plaintext, so each
transfer message a self-hosted channel seals is logged here, in the same transaction that puts
it in the outbox, keyed by peer and sender timestamp (the timestamp the error names).

Warning:
    The log holds plaintext transfer messages: offers may carry provisioning information (a
    hotel key token, say). Entries are therefore kept briefly (``resend_log_seconds`` in
    ``wallet.toml``, one hour by default, 0 to keep none), deleted as soon as they expire, and
    deleted when their share ends, except the message that ended it (the last answer of a share
    may itself need a repair, and it keeps only its normal, short expiry).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field

from tigress_signal.shares.states import ShareState

logger = logging.getLogger(__name__)

_FINAL_STATES = tuple(state.value for state in ShareState if state.is_final)
# Only "?" placeholders are put into the text; the states themselves are parameters.
_FORGET_ENDED_SQL = (
    "DELETE FROM send_log WHERE share_id = ? AND message_id IS NOT ?"  # noqa: S608
    " AND EXISTS (SELECT 1 FROM shares WHERE share_id = ? AND state IN"
    f" ({', '.join('?' for _ in _FINAL_STATES)}))"
)


@dataclass(frozen=True, slots=True)
class LoggedMessage:
    """One logged transfer message.

    Attributes:
        peer: the recipient.
        sent_at_ms: the sender timestamp its envelopes carried (ms since the epoch).
        message_id: its transfer message id (a resend keeps it, so copies are dropped).
        share_id: the share it belongs to.
        payload: the encoded transfer message, in plaintext (never log it).
        resends: how often it was sent again already.
    """

    peer: str
    sent_at_ms: int
    message_id: str
    share_id: str
    payload: bytes = field(repr=False)
    resends: int


def now_ms() -> int:
    """The current time in ms since the epoch, the unit of the log's timestamps."""
    return int(time.time() * 1000)


def record(
    conn: sqlite3.Connection,
    logged: LoggedMessage,
    *,
    keep_seconds: int,
    now: int | None = None,
) -> None:
    """Log a sent message in the caller's transaction (nothing when ``keep_seconds`` is 0).

    A second message to the same peer with the same timestamp is not logged (the channel makes
    timestamps unique, so this only happens after the clock went back): it could not be told
    apart from the first when an error names it.
    """
    if keep_seconds <= 0:
        return
    current = now_ms() if now is None else now
    purge_expired(conn, now=current)
    inserted = conn.execute(
        "INSERT OR IGNORE INTO send_log (peer, sent_at_ms, message_id, share_id, payload,"
        " resends, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            logged.peer,
            logged.sent_at_ms,
            logged.message_id,
            logged.share_id,
            logged.payload,
            logged.resends,
            current + keep_seconds * 1000,
        ),
    ).rowcount
    if not inserted:
        logger.warning(
            "message %s to %s not logged: another message has its timestamp",
            logged.message_id,
            logged.peer,
        )


def find(
    conn: sqlite3.Connection, peer: str, sent_at_ms: int, *, now: int | None = None
) -> LoggedMessage | None:
    """The message sent to ``peer`` at ``sent_at_ms``, unless unknown or expired."""
    row = conn.execute(
        "SELECT message_id, share_id, payload, resends FROM send_log"
        " WHERE peer = ? AND sent_at_ms = ? AND expires_at_ms > ?",
        (peer, sent_at_ms, now_ms() if now is None else now),
    ).fetchone()
    if row is None:
        return None
    return LoggedMessage(peer, sent_at_ms, str(row[0]), str(row[1]), bytes(row[2]), int(row[3]))


def count_resend(conn: sqlite3.Connection, peer: str, sent_at_ms: int) -> None:
    """Count one more resend of a logged message, in the caller's transaction."""
    conn.execute(
        "UPDATE send_log SET resends = resends + 1 WHERE peer = ? AND sent_at_ms = ?",
        (peer, sent_at_ms),
    )


def purge_expired(conn: sqlite3.Connection, *, now: int | None = None) -> int:
    """Delete expired entries; returns how many."""
    current = now_ms() if now is None else now
    return conn.execute("DELETE FROM send_log WHERE expires_at_ms <= ?", (current,)).rowcount


def forget_ended_share(conn: sqlite3.Connection, share_id: str, *, keep: str | None) -> int:
    """Delete a share's entries if the share has ended, except the message ``keep``.

    Returns:
        How many entries were deleted (0 while the share is still open).
    """
    parameters = (share_id, keep, share_id, *_FINAL_STATES)
    return conn.execute(_FORGET_ENDED_SQL, parameters).rowcount
