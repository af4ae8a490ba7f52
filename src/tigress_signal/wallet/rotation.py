"""Rotating a wallet's signed prekey and last-resort Kyber prekey on a schedule.

Every bundle the server hands out carries the device's signed EC prekey, and the last-resort
Kyber prekey once the one-time Kyber pool is empty. Those two keys are used again and again, so
the wallet replaces them every :attr:`RotationPolicy.interval`: it makes a new key with an id
from its counters (an id is never used twice), stores the private half, and only then uploads
the public half.

A replaced key is not deleted at once. A peer may have fetched a bundle just before the
rotation, and its first message may wait at the server for as long as the server keeps
undelivered messages, so the old private key is kept for :attr:`RotationPolicy.grace` after it
was replaced, then deleted. Last-resort Kyber keys within that time are all named to the
sidecar as last-resort keys, so that using one (even twice) never deletes it.

The ``rotating_prekeys`` table of the wallet store tracks each key: made (``created_at``),
taken by the server (``published_at``), replaced by a newer one (``retired_at``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from tigress_signal.bridge.libsignal import LibsignalBridge, SignedPreKey
from tigress_signal.bridge.records import RecordChange, RecordKind
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.wallet.store import WalletStore

log = logging.getLogger(__name__)

RotatingKind = Literal["signed_prekey", "last_resort_kyber"]

#: Which libsignal record and which id counter each rotating kind uses. Last-resort Kyber keys
#: share the one-time Kyber keys' counter: the server keeps one id space for both.
_RECORD_KIND: dict[RotatingKind, RecordKind] = {
    "signed_prekey": "signed_prekey",
    "last_resort_kyber": "kyber_prekey",
}
_COUNTER: dict[RotatingKind, str] = {
    "signed_prekey": "signed_prekey",
    "last_resort_kyber": "kyber_prekey",
}


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When keys are replaced and how long replaced keys are kept.

    Attributes:
        interval: a published signed prekey or last-resort Kyber key is replaced this long
            after it was published.
        grace: a replaced key's private half is kept this long, then deleted. It must be at
            least as long as the intermediary keeps undelivered messages.
    """

    interval: timedelta
    grace: timedelta


@dataclass(frozen=True, slots=True)
class Rotation:
    """What one rotation run did.

    Attributes:
        signed_prekey_id: the id of the signed prekey published now, or None.
        last_resort_kyber_id: the id of the last-resort Kyber key published now, or None.
        deleted: how many replaced keys were deleted because their grace period ended.
    """

    signed_prekey_id: int | None
    last_resort_kyber_id: int | None
    deleted: int


def record_registered_keys(
    conn: sqlite3.Connection, *, signed_prekey_id: int, last_resort_kyber_id: int, now: datetime
) -> None:
    """Note the keys a wallet registered with as published, in the caller's transaction."""
    stamp = _text(now)
    conn.executemany(
        "INSERT INTO rotating_prekeys (kind, key_id, created_at, published_at)"
        " VALUES (?, ?, ?, ?)",
        [
            ("signed_prekey", signed_prekey_id, stamp, stamp),
            ("last_resort_kyber", last_resort_kyber_id, stamp, stamp),
        ],
    )


def last_resort_kyber_ids(store: WalletStore) -> list[int]:
    """Every last-resort Kyber key id whose private half the wallet still keeps."""
    rows = store.connection.execute(
        "SELECT key_id FROM rotating_prekeys WHERE kind = 'last_resort_kyber' ORDER BY key_id"
    ).fetchall()
    return [int(key_id) for (key_id,) in rows]


async def rotate_prekeys(
    store: WalletStore,
    bridge: LibsignalBridge,
    client: IntermediaryClient,
    policy: RotationPolicy,
    *,
    reopen: Callable[[], Awaitable[None]],
    now: datetime | None = None,
) -> Rotation:
    """Replace the keys that are due, then delete replaced keys whose grace period has ended.

    Args:
        store: the wallet store.
        bridge: its libsignal sidecar.
        client: a client authenticated as this wallet.
        policy: the rotation interval and grace period.
        reopen: opens the sidecar's identity again, naming :func:`last_resort_kyber_ids` as
            the last-resort keys; called after a new last-resort key is stored and before it
            is uploaded, so that no message can use it while the sidecar would delete it.
        now: the current time (tests move it forward); default the clock.

    Raises:
        ServerApiError: the server refused the upload.
        ChannelError: the server cannot be reached.
        BridgeError: the sidecar could not make the keys.
        StoreError: the wallet store failed.
    """
    moment = datetime.now(UTC) if now is None else now
    due = [kind for kind in _RECORD_KIND if _is_due(store, kind, moment, policy.interval)]
    signed: SignedPreKey | None = None
    last_resort: SignedPreKey | None = None
    if "signed_prekey" in due:
        signed = await _make_key(store, bridge, "signed_prekey", moment)
    if "last_resort_kyber" in due:
        last_resort = await _make_key(store, bridge, "last_resort_kyber", moment)
        await reopen()

    # The private halves are stored; now the server may hand the public ones out.
    if signed is not None or last_resort is not None:
        await client.upload_keys(
            signed_prekey=None if signed is None else signed.public(),
            pq_last_resort_prekey=None if last_resort is None else last_resort.public(),
        )
        with store.transaction() as conn:
            if signed is not None:
                _mark_published(conn, "signed_prekey", signed.key_id, moment)
            if last_resort is not None:
                _mark_published(conn, "last_resort_kyber", last_resort.key_id, moment)
        log.info(
            "rotated prekeys: signed prekey %s, last-resort Kyber prekey %s",
            "unchanged" if signed is None else f"now id {signed.key_id}",
            "unchanged" if last_resort is None else f"now id {last_resort.key_id}",
        )

    deleted = await _delete_expired(store, bridge, moment - policy.grace)
    return Rotation(
        None if signed is None else signed.key_id,
        None if last_resort is None else last_resort.key_id,
        deleted,
    )


def _is_due(store: WalletStore, kind: RotatingKind, now: datetime, interval: timedelta) -> bool:
    row = store.connection.execute(
        "SELECT MAX(published_at) FROM rotating_prekeys"
        " WHERE kind = ? AND published_at IS NOT NULL AND retired_at IS NULL",
        (kind,),
    ).fetchone()
    if row is None or row[0] is None:
        return True
    return datetime.fromisoformat(row[0]) + interval <= now


async def _make_key(
    store: WalletStore, bridge: LibsignalBridge, kind: RotatingKind, now: datetime
) -> SignedPreKey:
    """Make and store a new key of ``kind``, not yet published."""
    with store.transaction() as conn:
        key_id = store.next_ids(conn, _COUNTER[kind], 1)
    stamp_ms = int(now.timestamp() * 1000)
    if kind == "signed_prekey":
        key = await bridge.generate_signed_prekey(key_id, stamp_ms)
    else:
        (key,) = await bridge.generate_kyber_prekeys(key_id, 1, stamp_ms)
    with store.transaction() as conn:
        # A key made earlier whose upload failed may still have reached the server (the
        # answer was lost, say): it is retired now and kept through the grace period.
        conn.execute(
            "UPDATE rotating_prekeys SET retired_at = ?"
            " WHERE kind = ? AND published_at IS NULL AND retired_at IS NULL",
            (_text(now), kind),
        )
        store.apply_changes(conn, [RecordChange(_RECORD_KIND[kind], str(key_id), key.record)])
        conn.execute(
            "INSERT INTO rotating_prekeys (kind, key_id, created_at) VALUES (?, ?, ?)",
            (kind, key_id, _text(now)),
        )
    return key


def _mark_published(
    conn: sqlite3.Connection, kind: RotatingKind, key_id: int, now: datetime
) -> None:
    stamp = _text(now)
    conn.execute(
        "UPDATE rotating_prekeys SET retired_at = ?"
        " WHERE kind = ? AND key_id != ? AND retired_at IS NULL",
        (stamp, kind, key_id),
    )
    conn.execute(
        "UPDATE rotating_prekeys SET published_at = ? WHERE kind = ? AND key_id = ?",
        (stamp, kind, key_id),
    )


async def _delete_expired(
    store: WalletStore, bridge: LibsignalBridge, retired_before: datetime
) -> int:
    """Delete the keys retired at or before ``retired_before``; returns how many."""
    rows = store.connection.execute(
        "SELECT kind, key_id, retired_at FROM rotating_prekeys WHERE retired_at IS NOT NULL"
    ).fetchall()
    expired: list[tuple[RotatingKind, int]] = [
        (kind, int(key_id))
        for kind, key_id, retired_at in rows
        if datetime.fromisoformat(retired_at) <= retired_before
    ]
    if not expired:
        return 0
    changes = [RecordChange(_RECORD_KIND[kind], str(key_id), None) for kind, key_id in expired]
    # The uses seen of a deleted last-resort key guard against replays it can no longer decrypt.
    for kind, key_id in expired:
        if kind == "last_resort_kyber":
            used = store.connection.execute(
                "SELECT key FROM records WHERE kind = 'kyber_used' AND key LIKE ?",
                (f"{key_id}:%",),
            ).fetchall()
            changes += [RecordChange("kyber_used", str(key), None) for (key,) in used]
    with store.transaction() as conn:
        store.apply_changes(conn, changes)
        conn.executemany("DELETE FROM rotating_prekeys WHERE kind = ? AND key_id = ?", expired)
    # The sidecar may hold a working copy; without it the key is gone for good.
    await bridge.evict(changes)
    log.info("deleted %d replaced prekey(s) whose grace period ended", len(expired))
    return len(expired)


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
