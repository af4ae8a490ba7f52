"""Shares and received credentials as a wallet application reads them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from tigress_signal.credentials import DigitalKeyHolder, Endorsement, Offer, decode_transfer
from tigress_signal.errors import InvalidTransition, UnknownShare
from tigress_signal.shares.states import Flow, Role, ShareState


@dataclass(frozen=True, slots=True)
class Share:
    """A share as this wallet sees it.

    Attributes:
        share_id: the id the sender chose.
        role: ``"sender"`` or ``"receiver"``.
        peer: the other wallet, as the channel addresses it.
        flow: ``"stateless"`` or ``"stateful"``.
        state: where the share stands.
        credential_format: media type of the credential on offer.
        title: the offer's display title.
        description: the offer's display description.
        expires_at: when the share stops being redeemable.
        answered_by_device: sender side: the device of the peer whose answer was honoured
            (the first to answer), None before any answer.
    """

    share_id: str
    role: Role
    peer: str
    flow: Flow
    state: ShareState
    credential_format: str
    title: str
    description: str
    expires_at: datetime
    answered_by_device: int | None = None


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """A credential received through a share, exactly as it arrived.

    Attributes:
        share_id: the share that delivered it.
        media_type: the credential's media type.
        filename: the sender's file name, when it gave one.
        content: the credential's bytes.
        from_peer: who sent it.
    """

    share_id: str
    media_type: str
    filename: str | None
    content: bytes
    from_peer: str

    def __repr__(self) -> str:
        # Never print credential contents by accident.
        return f"StoredCredential(share_id={self.share_id!r}, media_type={self.media_type!r})"


@dataclass(frozen=True, slots=True)
class DigitalKey:
    """A digital key in the receiver's wallet.

    Attributes:
        endorsement: the owner's signature over the key, its lock, rights and validity.
        holder: the key pair this device made (it answers the lock's challenges).
    """

    endorsement: Endorsement
    holder: DigitalKeyHolder


SHARE_COLUMNS = (
    "share_id, role, peer, flow, state, credential_format, title, description, expires_at,"
    " answered_by_device"
)


def load_share(conn: sqlite3.Connection, share_id: str) -> Share:
    """Read one share.

    Raises:
        UnknownShare: no such share.
    """
    row = conn.execute(
        f"SELECT {SHARE_COLUMNS} FROM shares WHERE share_id = ?",  # noqa: S608
        (share_id,),
    ).fetchone()
    if row is None:
        raise UnknownShare(f"no share {share_id} in this wallet")
    return share_from_row(row)


def stored_offer(conn: sqlite3.Connection, share_id: str) -> Offer:
    """The offer a share started with.

    Raises:
        UnknownShare: no such share.
    """
    row = conn.execute("SELECT offer FROM shares WHERE share_id = ?", (share_id,)).fetchone()
    if row is None:
        raise UnknownShare(f"no share {share_id} in this wallet")
    body = decode_transfer(bytes(row[0])).body
    if not isinstance(body, Offer):
        raise InvalidTransition(f"share {share_id} has no stored offer")
    return body


def share_from_row(row: tuple[object, ...]) -> Share:
    """A :class:`Share` from a row of :data:`SHARE_COLUMNS`."""
    return Share(
        share_id=str(row[0]),
        role=row[1],  # type: ignore[arg-type]
        peer=str(row[2]),
        flow=row[3],  # type: ignore[arg-type]
        state=ShareState(str(row[4])),
        credential_format=str(row[5]),
        title=str(row[6]),
        description=str(row[7]),
        expires_at=datetime.fromisoformat(str(row[8])),
        answered_by_device=None if row[9] is None else int(str(row[9])),
    )
