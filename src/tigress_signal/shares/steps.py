"""Share steps: what one user action or one incoming message does to a share.

A step is worked out first, by reading the wallet (:func:`plan_message`, :func:`plan_accept`,
...), and carried out afterwards, inside the transaction that also stores the reply's
ciphertext (see :mod:`tigress_signal.shares.service`). Working it out never writes; carrying it
out never decides anything: the transaction first checks that the share is still in the state
the step was worked out from, then runs the step's writes.

A receiver's account may have several devices, each with its own copy of the share. On the
sender's side the first device that answers (accepts, declines, asks for a key or cancels) is
recorded in ``shares.answered_by_device`` and is the only one honoured from then on; a later
answer from another device gets ``Taken`` back and never an endorsement. When the peer is known
to have several devices, the first answer is followed by ``Taken`` (or, stateful, by the
``KeyImportRequest`` naming the winner), so the other devices stop offering the share.

Note:
    The sender's own other devices learn nothing of the shares it sends: there are no sync
    transcripts between one's own devices. A reply that reaches another device of the sender's
    account is refused there as a message for an unknown share; only the device that sent the
    offer completes it.
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
    Taken,
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
    *,
    device_id: int = 1,
    own_device: int = 1,
) -> Step:
    """What a transfer message from ``peer`` does.

    Args:
        conn: the wallet's connection (read only here).
        peer: the sender of the message.
        envelope: the message.
        now: the current time, for expiry.
        owner_key: this wallet's owner key for a lock id (to endorse key signing requests).
        device_id: which of the peer's devices sent the message.
        own_device: this wallet's own device id within its account.

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
    if not isinstance(message, Cancelled | Taken) and share.expires_at <= now:
        raise ShareExpired(f"share {share_id} expired at {share.expires_at.isoformat()}")
    if share.role == "receiver" and isinstance(message, Taken | KeyImportRequest):
        taken_by = message.device_id
        if taken_by is not None and taken_by != own_device:
            return _plan_taken(conn, share, taken_by)
        if isinstance(message, Taken):
            # The sender honoured this device's answer; the notice was for the other devices.
            return Step(share_id, peer, "received taken (this device answered first)", share.state)
    first_answer = False
    if share.role == "sender" and not isinstance(message, Taken):
        winner = share.answered_by_device
        if winner is not None and winner != device_id:
            # Another device of the peer answered first: this one is told, nothing changes.
            return Step(
                share_id,
                peer,
                f"received {message.type} from device {device_id}, taken by device {winner}",
                share.state,
                reply=Taken(share_id=message.share_id, device_id=winner),
                summary=f"Already taken on another device: {share.title}",
            )
        first_answer = winner is None
    new_state = next_state(share.role, share.flow, share.state, message.type)
    step = Step(share_id, peer, f"received {message.type}", share.state)
    if first_answer:
        step.writes.append(_winner_write(share_id, device_id))
        if not isinstance(message, KeySigningRequest) and _several_devices(conn, peer):
            step.reply = Taken(share_id=message.share_id, device_id=device_id)
            step.summary = f"Taken on another device: {share.title}"
    if isinstance(message, KeySigningRequest):
        terms = json.loads(_private(conn, share_id))
        endorsement = owner_key(terms["lock_id"]).endorse(
            message,
            lock_id=terms["lock_id"],
            rights=tuple(terms["rights"]),
            not_before=datetime.fromisoformat(terms["not_before"]),
            not_after=datetime.fromisoformat(terms["not_after"]),
        )
        step.reply = KeyImportRequest(
            share_id=message.share_id, endorsement=endorsement, device_id=device_id
        )
        step.summary = f"Key endorsed: {share.title}"
    elif isinstance(message, KeyImportRequest):
        step.writes.append(_key_write(conn, share, message.endorsement))
        step.reply = Accepted(share_id=message.share_id)
        step.summary = f"Key received: {share.title}"
    step.writes.append(_state_write(share_id, new_state))
    return step


def _plan_taken(conn: sqlite3.Connection, share: Share, winner: int) -> Step:
    """Another device of this account answered first: keep nothing of the share here."""
    name = f"received taken (device {winner} answered first)"
    if share.state is ShareState.TAKEN:
        return Step(share.share_id, share.peer, name, share.state)  # a second notice
    new_state = next_state(share.role, share.flow, share.state, "taken")

    def drop(conn: sqlite3.Connection) -> None:
        # A stateless credential accepted here lost the race: the account holds it once, on
        # the winning device. A key pair made here was never endorsed and is of no use.
        conn.execute("DELETE FROM credentials WHERE share_id = ?", (share.share_id,))
        conn.execute("UPDATE shares SET private = x'' WHERE share_id = ?", (share.share_id,))

    return Step(
        share.share_id,
        share.peer,
        name,
        share.state,
        [drop, _state_write(share.share_id, new_state)],
    )


def _several_devices(conn: sqlite3.Connection, peer: str) -> bool:
    """Whether ``peer`` is known to have more than one device (so others got the offer too)."""
    row = conn.execute("SELECT count(*) FROM peer_devices WHERE peer = ?", (peer,)).fetchone()
    return int(row[0]) > 1


def _winner_write(share_id: str, device_id: int) -> Write:
    def write(conn: sqlite3.Connection) -> None:
        taken = conn.execute(
            "UPDATE shares SET answered_by_device = ?"
            " WHERE share_id = ? AND answered_by_device IS NULL",
            (device_id, share_id),
        ).rowcount
        if taken == 0:
            raise InvalidTransition(f"share {share_id} was answered by another device meanwhile")

    return write


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
