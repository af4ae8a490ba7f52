"""Share steps: what one user action or one incoming message does to a share.

A step is worked out first, by reading the wallet (:func:`plan_message`, :func:`plan_accept`,
...), and carried out afterwards, inside the transaction that also stores the reply's
ciphertext (see :mod:`tigress_signal.shares.service`). Working it out never writes; carrying it
out never decides anything: the transaction first checks that the share is still in the state
the step was worked out from, then runs the step's writes.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from tigress_signal.credentials import (
    DIGITAL_KEY_MEDIA_TYPE,
    Accepted,
    Cancelled,
    Declined,
    DigitalKeyHolder,
    Endorsement,
    KeyImportRequest,
    KeyOwner,
    KeySigningRequest,
    Offer,
    TransferEnvelope,
    TransferMessage,
    decode_transfer,
    encode_transfer,
)
from tigress_signal.errors import InvalidTransition, ShareExpired, UnknownShare
from tigress_signal.shares.states import ShareState, next_state
from tigress_signal.shares.view import Share, load_share, stored_offer
from tigress_signal.wallet.store import utc_now_text

Write = Callable[[sqlite3.Connection], None]


@dataclass(slots=True)
class Step:
    """One change to one share, worked out and waiting to be carried out.

    Attributes:
        share_id: the share.
        peer: the other wallet, to which ``reply`` goes.
        name: what happens, for the log (``"offer"``, ``"received accepted"``, ...).
        expected: the state the share must still be in (None: it must not exist yet).
        writes: the database writes, run in the step's transaction.
        reply: the transfer message to send, if any.
        summary: a line describing the reply for channels a person may read.
    """

    share_id: str
    peer: str
    name: str
    expected: ShareState | None
    writes: list[Write] = field(default_factory=list)
    reply: TransferMessage | None = None
    summary: str = ""


def check_expected(conn: sqlite3.Connection, step: Step) -> None:
    """Refuse to carry out a step whose share moved since the step was worked out."""
    row = conn.execute("SELECT state FROM shares WHERE share_id = ?", (step.share_id,)).fetchone()
    current = None if row is None else ShareState(str(row[0]))
    if current != step.expected:
        raise InvalidTransition(
            f"share {step.share_id} changed while {step.name} was being prepared"
        )


# -- user actions ---------------------------------------------------------------------------


def plan_offer(peer: str, offer: Offer, envelope: TransferEnvelope, private: bytes) -> Step:
    """Start a share on the sender's side: store it and send the offer."""
    share_id = str(offer.share_id)

    def insert(conn: sqlite3.Connection) -> None:
        _insert_share(conn, "sender", peer, offer, envelope, private)

    return Step(
        share_id,
        peer,
        "offer",
        None,
        [insert],
        reply=offer,
        summary=f"Credential offer: {offer.title}",
    )


def plan_accept(conn: sqlite3.Connection, share_id: str) -> Step:
    """The receiver accepts an offer.

    Stateless: the credential is stored and ``Accepted`` sent. Stateful: this device makes a key
    pair and sends a key signing request.
    """
    share = load_share(conn, share_id)
    new_state = next_state(share.role, share.flow, share.state, "user:accept")
    offer = stored_offer(conn, share_id)
    step = Step(share_id, share.peer, "accept", share.state, summary=f"Accepted: {share.title}")
    if share.flow == "stateless":
        provisioning = offer.provisioning
        if provisioning is None:  # the Offer model forbids it; kept for the type checker
            raise InvalidTransition(f"share {share_id} has no provisioning information")
        step.writes.append(
            _credential_write(
                share, provisioning.media_type, provisioning.filename, provisioning.content
            )
        )
        step.reply = Accepted(share_id=offer.share_id)
    else:
        holder = DigitalKeyHolder.generate()
        step.reply = holder.signing_request(offer.share_id, secrets.token_bytes(32))
        step.writes.append(_private_write(share_id, holder.private_key_pem()))
    step.writes.append(_state_write(share_id, new_state))
    return step


def plan_decline(conn: sqlite3.Connection, share_id: str, reason: str | None) -> Step:
    """The receiver declines an offer."""
    share = load_share(conn, share_id)
    new_state = next_state(share.role, share.flow, share.state, "user:decline")
    return Step(
        share_id,
        share.peer,
        "decline",
        share.state,
        [_state_write(share_id, new_state)],
        reply=Declined(share_id=uuid.UUID(share_id), reason=reason),
        summary=f"Declined: {share.title}",
    )


def plan_cancel(conn: sqlite3.Connection, share_id: str, reason: str | None) -> Step:
    """Either side withdraws from a share that has not ended."""
    share = load_share(conn, share_id)
    new_state = next_state(share.role, share.flow, share.state, "user:cancel")
    return Step(
        share_id,
        share.peer,
        "cancel",
        share.state,
        [_state_write(share_id, new_state)],
        reply=Cancelled(share_id=uuid.UUID(share_id), reason=reason),
        summary=f"Cancelled: {share.title}",
    )


# -- incoming messages ----------------------------------------------------------------------


def plan_message(
    conn: sqlite3.Connection,
    peer: str,
    envelope: TransferEnvelope,
    now: datetime,
    owner_key: Callable[[str], KeyOwner],
) -> Step:
    """What a transfer message from ``peer`` does.

    Raises:
        ShareError: the message does not fit (unknown share, wrong peer, wrong state, expired).
        CredentialError: its contents do not check out (attestation, endorsement).
    """
    message = envelope.body
    if isinstance(message, Offer):
        return _plan_received_offer(conn, peer, message, envelope, now)
    share_id = str(message.share_id)
    share = load_share(conn, share_id)
    # Only the share's own peer may move it; anyone else learns nothing about it.
    if share.peer != peer:
        raise UnknownShare(f"no share {share_id} with {peer}")
    if not isinstance(message, Cancelled) and share.expires_at <= now:
        raise ShareExpired(f"share {share_id} expired at {share.expires_at.isoformat()}")
    new_state = next_state(share.role, share.flow, share.state, message.type)
    step = Step(share_id, peer, f"received {message.type}", share.state)
    if isinstance(message, KeySigningRequest):
        terms = json.loads(_private(conn, share_id))
        endorsement = owner_key(terms["lock_id"]).endorse(
            message,
            lock_id=terms["lock_id"],
            rights=tuple(terms["rights"]),
            not_before=datetime.fromisoformat(terms["not_before"]),
            not_after=datetime.fromisoformat(terms["not_after"]),
        )
        step.reply = KeyImportRequest(share_id=message.share_id, endorsement=endorsement)
        step.summary = f"Key endorsed: {share.title}"
    elif isinstance(message, KeyImportRequest):
        step.writes.append(_key_write(conn, share, message.endorsement))
        step.reply = Accepted(share_id=message.share_id)
        step.summary = f"Key received: {share.title}"
    step.writes.append(_state_write(share_id, new_state))
    return step


def _plan_received_offer(
    conn: sqlite3.Connection,
    peer: str,
    offer: Offer,
    envelope: TransferEnvelope,
    now: datetime,
) -> Step:
    share_id = str(offer.share_id)
    if conn.execute("SELECT 1 FROM shares WHERE share_id = ?", (share_id,)).fetchone():
        raise InvalidTransition(f"share {share_id} already exists in this wallet")
    if offer.expires_at <= now:
        raise ShareExpired(f"offer {share_id} arrived after its expiry")

    def insert(conn: sqlite3.Connection) -> None:
        _insert_share(conn, "receiver", peer, offer, envelope, b"")

    return Step(share_id, peer, "received offer", None, [insert])


# -- writes ---------------------------------------------------------------------------------


def _insert_share(
    conn: sqlite3.Connection,
    role: str,
    peer: str,
    offer: Offer,
    envelope: TransferEnvelope,
    private: bytes,
) -> None:
    now = utc_now_text()
    conn.execute(
        "INSERT INTO shares (share_id, role, peer, flow, state, credential_format, title,"
        " description, expires_at, created_at, updated_at, offer, private)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            str(offer.share_id),
            role,
            peer,
            offer.flow,
            ShareState.OFFERED.value,
            offer.credential_format,
            offer.title,
            offer.description,
            offer.expires_at.isoformat(),
            now,
            now,
            encode_transfer(envelope),
            private,
        ),
    )


def _state_write(share_id: str, state: ShareState) -> Write:
    def write(conn: sqlite3.Connection) -> None:
        set_state(conn, share_id, state)

    return write


def set_state(conn: sqlite3.Connection, share_id: str, state: ShareState) -> None:
    """Move a share to ``state``."""
    conn.execute(
        "UPDATE shares SET state = ?, updated_at = ? WHERE share_id = ?",
        (state.value, utc_now_text(), share_id),
    )


def _private_write(share_id: str, value: bytes) -> Write:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE shares SET private = ? WHERE share_id = ?", (value, share_id))

    return write


def _private(conn: sqlite3.Connection, share_id: str) -> bytes:
    row = conn.execute("SELECT private FROM shares WHERE share_id = ?", (share_id,)).fetchone()
    return bytes(row[0]) if row else b""


def _key_write(conn: sqlite3.Connection, share: Share, endorsement: Endorsement) -> Write:
    holder = DigitalKeyHolder.from_private_key_pem(_private(conn, share.share_id))
    holder.check_endorsement(endorsement, uuid.UUID(share.share_id))
    content = json.dumps(
        {
            "endorsement": endorsement.model_dump(mode="json"),
            "private_key_pem": holder.private_key_pem().decode(),
        },
        sort_keys=True,
    ).encode()
    return _credential_write(share, DIGITAL_KEY_MEDIA_TYPE, None, content)


def _credential_write(
    share: Share, media_type: str, filename: str | None, content: bytes
) -> Write:
    def write(conn: sqlite3.Connection) -> None:
        try:
            conn.execute(
                "INSERT INTO credentials (share_id, media_type, filename, content, from_peer,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (share.share_id, media_type, filename, content, share.peer, utc_now_text()),
            )
        except sqlite3.IntegrityError as exc:
            # The state machine already prevents this; the primary key is the last line of
            # defence against redeeming one share twice.
            raise InvalidTransition(f"share {share.share_id} was already redeemed") from exc

    return write


def offer_of(payload: bytes) -> Offer | None:
    """The offer inside an encoded transfer message, or None if it holds something else."""
    body = decode_transfer(payload).body
    return body if isinstance(body, Offer) else None
