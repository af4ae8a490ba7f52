"""Prekeys: upload (``PUT /v2/keys``), count (``GET /v2/keys``) and bundle fetch.

A bundle fetch hands out, per device, the signed EC prekey, one one-time EC prekey (or none when
the pool is empty) and one one-time Kyber prekey, or the last-resort Kyber prekey when that pool
is empty. One-time keys are deleted as they are handed out, oldest first, in the same
transaction that reads them, so two fetches never receive the same key; the last-resort key is
never deleted. Fetches are rate-limited per (requester account, target account), checked
before any key is taken, so a refused fetch takes nothing.

Key ids are never handed out twice. Every id a device publishes is recorded, per kind, in the
``prekey_ids`` ledger with a digest of its public key (see :mod:`.schema`):

* an upload that reuses a known id with different key material is refused whole with 409
  ``prekey_id_reused``, naming each such key;
* the same id with the same material is accepted (a client retrying an upload), but a one-time
  key that already left the pool (handed out, or replaced by an earlier upload) is not put back;
* ledger rows are pruned once released for longer than the message retention time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import (
    ApiError,
    json_response,
    parse_device_id,
    parse_uuid,
    read_entity,
)
from tigress_signal.intermediary.context import context_of
from tigress_signal.intermediary.entities import (
    DeviceBundle,
    KemSignedPreKey,
    PreKey,
    PreKeyBundle,
    PreKeyCount,
    SetKeysRequest,
    SignedPreKey,
)
from tigress_signal.intermediary.schema import key_digest
from tigress_signal.intermediary.signatures import check_prekey_signatures
from tigress_signal.storage import Connection, Row

AnyKey = PreKey | SignedPreKey | KemSignedPreKey
KeyT = TypeVar("KeyT", PreKey, KemSignedPreKey)

logger = logging.getLogger(__name__)


async def upload_keys(request: Request) -> Response:
    """``PUT /v2/keys``: replace some or all of the device's prekeys."""
    context = context_of(request)
    device = await context.authenticate(request)
    # Signal-Server also has phone-number identities ("pni"); accounts here have only one.
    if request.query_params.get("identity", "aci") != "aci":
        raise ApiError(422, "invalid_request", "identity must be aci: there are no pni keys")
    body = await read_entity(request, SetKeysRequest, context.config.max_body_bytes)
    _refuse_duplicate_ids("preKeys", body.pre_keys)
    _refuse_duplicate_ids("pqPreKeys", body.pq_pre_keys)

    # Every signed key must verify with the account's stored identity key.
    identity_key = await context.db.fetchval(
        "SELECT identity_key FROM accounts WHERE uuid = $1", device.uuid
    )
    if identity_key is None:  # the account went away since authentication
        raise ApiError(401, "unauthorized", "wrong account, device or password")
    signed: list[tuple[str, SignedPreKey | KemSignedPreKey]] = []
    if body.signed_pre_key is not None:
        signed.append(("signedPreKey", body.signed_pre_key))
    if body.pq_last_resort_pre_key is not None:
        signed.append(("pqLastResortPreKey", body.pq_last_resort_pre_key))
    signed += [(f"pqPreKeys[{i}]", key) for i, key in enumerate(body.pq_pre_keys or [])]
    await check_prekey_signatures(context.verifier, bytes(identity_key), signed)

    # Then replace what was sent, all or nothing.
    now = int(time.time() * 1000)
    owner = (device.uuid, device.device_id)
    async with context.db.transaction() as conn:
        ledger = _Ledger(conn, owner, now)
        if body.pre_keys:
            await ledger.load("ec", [k.key_id for k in body.pre_keys])
        kem_ids = [k.key_id for k in body.pq_pre_keys or []]
        if body.pq_last_resort_pre_key is not None:
            kem_ids.append(body.pq_last_resort_pre_key.key_id)
        if kem_ids:
            await ledger.load("kem", kem_ids)
        if body.signed_pre_key is not None:
            await ledger.load("signed", [body.signed_pre_key.key_id])
        ledger.refuse_reuse("preKeys", "ec", body.pre_keys or [])
        ledger.refuse_reuse("pqPreKeys", "kem", body.pq_pre_keys or [])
        if body.pq_last_resort_pre_key is not None:
            ledger.refuse_reuse("pqLastResortPreKey", "kem", [body.pq_last_resort_pre_key])
        if body.signed_pre_key is not None:
            ledger.refuse_reuse("signedPreKey", "signed", [body.signed_pre_key])
        ledger.raise_conflicts()

        if body.pre_keys:
            offered = await ledger.replace_pool("ec", "one_time_prekeys", body.pre_keys)
            await conn.executemany(
                "INSERT INTO one_time_prekeys (account_uuid, device_id, key_id, public_key)"
                " VALUES ($1, $2, $3, $4)",
                [(*owner, key.key_id, key.public_key) for key in offered],
            )
        if body.pq_pre_keys:
            kem_offered = await ledger.replace_pool("kem", "one_time_pq_prekeys", body.pq_pre_keys)
            await conn.executemany(
                "INSERT INTO one_time_pq_prekeys"
                " (account_uuid, device_id, key_id, public_key, signature)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(*owner, k.key_id, k.public_key, k.signature) for k in kem_offered],
            )
        if body.signed_pre_key is not None:
            key = body.signed_pre_key
            previous = await conn.fetchval(
                "SELECT signed_prekey_id FROM devices WHERE account_uuid = $1 AND device_id = $2",
                *owner,
            )
            await ledger.record("signed", [key])
            if previous is not None and int(previous) != key.key_id:
                await ledger.release("signed", [int(previous)])
            await conn.execute(
                "UPDATE devices SET signed_prekey_id = $3, signed_prekey = $4,"
                " signed_prekey_signature = $5 WHERE account_uuid = $1 AND device_id = $2",
                *owner,
                key.key_id,
                key.public_key,
                key.signature,
            )
        if body.pq_last_resort_pre_key is not None:
            kem = body.pq_last_resort_pre_key
            previous = await conn.fetchval(
                "SELECT pq_last_resort_id FROM devices WHERE account_uuid = $1 AND device_id = $2",
                *owner,
            )
            await ledger.record("kem", [kem])
            if previous is not None and int(previous) != kem.key_id:
                await ledger.release("kem", [int(previous)])
            await conn.execute(
                "UPDATE devices SET pq_last_resort_id = $3, pq_last_resort_key = $4,"
                " pq_last_resort_signature = $5 WHERE account_uuid = $1 AND device_id = $2",
                *owner,
                kem.key_id,
                kem.public_key,
                kem.signature,
            )
    return json_response({})


async def prekey_counts(request: Request) -> Response:
    """``GET /v2/keys``: how many one-time EC and Kyber prekeys the device has left."""
    context = context_of(request)
    device = await context.authenticate(request)
    async with context.db.transaction() as conn:
        count = await conn.fetchval(
            "SELECT COUNT(*) FROM one_time_prekeys WHERE account_uuid = $1 AND device_id = $2",
            device.uuid,
            device.device_id,
        )
        pq_count = await conn.fetchval(
            "SELECT COUNT(*) FROM one_time_pq_prekeys WHERE account_uuid = $1 AND device_id = $2",
            device.uuid,
            device.device_id,
        )
        current = await conn.fetchrow(
            "SELECT signed_prekey_id, pq_last_resort_id FROM devices"
            " WHERE account_uuid = $1 AND device_id = $2",
            device.uuid,
            device.device_id,
        )
    return json_response(
        PreKeyCount(
            count=int(count),
            pq_count=int(pq_count),
            signed_pre_key_id=None if current is None else int(current[0]),
            pq_last_resort_pre_key_id=None if current is None else int(current[1]),
        )
    )


async def fetch_bundle(request: Request) -> Response:
    """``GET /v2/keys/{uuid}/{deviceId}``: a prekey bundle, taking one-time keys."""
    context = context_of(request)
    requester = await context.authenticate(request)
    target = parse_uuid(request.path_params["uuid"])
    device_text = request.path_params["device_id"]
    device_id = None if device_text == "*" else parse_device_id(device_text)
    # Before anything is read or taken: a refused fetch must take no key.
    context.limiter.check("bundle_fetch", f"{requester.uuid}>{target}")
    now = int(time.time() * 1000)

    async with context.db.transaction() as conn:
        identity_key = await conn.fetchval(
            "SELECT identity_key FROM accounts WHERE uuid = $1", target
        )
        if identity_key is None:
            raise ApiError(404, "not_found", "no such account")
        if device_id is None:
            rows = await conn.fetch(
                "SELECT * FROM devices WHERE account_uuid = $1 ORDER BY device_id", target
            )
        else:
            rows = await conn.fetch(
                "SELECT * FROM devices WHERE account_uuid = $1 AND device_id = $2",
                target,
                device_id,
            )
        if not rows:
            raise ApiError(404, "not_found", "no such device")
        devices: list[DeviceBundle] = []
        for row in rows:
            ec = await _take_oldest(conn, "one_time_prekeys", "key_id, public_key", row)
            pq = await _take_oldest(
                conn, "one_time_pq_prekeys", "key_id, public_key, signature", row
            )
            owner = (row["account_uuid"], row["device_id"])
            if ec is not None:
                await _Ledger(conn, owner, now).release("ec", [int(ec["key_id"])])
            if pq is not None:
                await _Ledger(conn, owner, now).release("kem", [int(pq["key_id"])])
            if pq is None:
                pq_key = KemSignedPreKey(
                    key_id=row["pq_last_resort_id"],
                    public_key=bytes(row["pq_last_resort_key"]),
                    signature=bytes(row["pq_last_resort_signature"]),
                )
            else:
                pq_key = KemSignedPreKey(
                    key_id=pq["key_id"],
                    public_key=bytes(pq["public_key"]),
                    signature=bytes(pq["signature"]),
                )
            devices.append(
                DeviceBundle(
                    device_id=row["device_id"],
                    registration_id=row["registration_id"],
                    signed_pre_key=SignedPreKey(
                        key_id=row["signed_prekey_id"],
                        public_key=bytes(row["signed_prekey"]),
                        signature=bytes(row["signed_prekey_signature"]),
                    ),
                    pre_key=None
                    if ec is None
                    else PreKey(key_id=ec["key_id"], public_key=bytes(ec["public_key"])),
                    pq_pre_key=pq_key,
                )
            )
    return json_response(PreKeyBundle(identity_key=bytes(identity_key), devices=devices))


async def _take_oldest(conn: Connection, table: str, columns: str, device: Row) -> Row | None:
    """Delete and return the oldest one-time key of a device, or None when none is left."""
    # On PostgreSQL, concurrent fetches must skip a row another transaction is taking
    # instead of waiting for it and then finding it gone; SQLite runs one writer at a time.
    lock = " FOR UPDATE SKIP LOCKED" if conn.dialect == "postgresql" else ""
    return await conn.fetchrow(
        f"DELETE FROM {table} WHERE seq = (SELECT seq FROM {table}"  # noqa: S608 - fixed names
        f" WHERE account_uuid = $1 AND device_id = $2 ORDER BY seq LIMIT 1{lock})"
        f" RETURNING {columns}",
        device["account_uuid"],
        device["device_id"],
    )


def _refuse_duplicate_ids(field: str, keys: list[PreKey] | list[KemSignedPreKey] | None) -> None:
    if keys and len({key.key_id for key in keys}) != len(keys):
        raise ApiError(422, "invalid_request", f"{field}: the key ids must be distinct")


class _Ledger:
    """The ``prekey_ids`` rows of one device, as one upload or fetch needs them."""

    def __init__(self, conn: Connection, owner: tuple[str, int], now: int) -> None:
        self._conn = conn
        self._owner = owner
        self._now = now
        self._known: dict[tuple[str, int], tuple[bytes, bool]] = {}
        self._conflicts: list[dict[str, object]] = []

    async def load(self, kind: str, key_ids: Sequence[int]) -> None:
        """Read the ledger rows of these ids (one range query; ids are mostly consecutive)."""
        rows = await self._conn.fetch(
            "SELECT key_id, digest, released_at FROM prekey_ids WHERE account_uuid = $1"
            " AND device_id = $2 AND kind = $3 AND key_id BETWEEN $4 AND $5",
            *self._owner,
            kind,
            min(key_ids),
            max(key_ids),
        )
        for row in rows:
            self._known[(kind, int(row[0]))] = (bytes(row[1]), row[2] is not None)

    def refuse_reuse(self, field: str, kind: str, keys: Sequence[AnyKey]) -> None:
        """Note each key whose id is known with other material."""
        for key in keys:
            known = self._known.get((kind, key.key_id))
            if known is not None and known[0] != key_digest(key.public_key):
                self._conflicts.append({"field": field, "keyId": key.key_id})

    def raise_conflicts(self) -> None:
        """Refuse the upload if :meth:`refuse_reuse` found any reused id.

        Raises:
            ApiError: 409 ``prekey_id_reused`` listing them.
        """
        if self._conflicts:
            named = ", ".join(f"{c['field']} {c['keyId']}" for c in self._conflicts[:5])
            raise ApiError(
                409,
                "prekey_id_reused",
                f"key ids already used for other keys: {named}; upload keys under new ids",
                reused=self._conflicts,
            )

    async def replace_pool(self, kind: str, table: str, keys: Sequence[KeyT]) -> list[KeyT]:
        """Empty a one-time pool for new keys; returns the keys to offer.

        Keys of the old pool not in the upload are released; keys of the upload that left
        the pool before (handed out or replaced) are dropped, never offered again.
        """
        pooled = {
            int(row[0])
            for row in await self._conn.fetch(
                f"SELECT key_id FROM {table}"  # noqa: S608 - fixed table names
                " WHERE account_uuid = $1 AND device_id = $2",
                *self._owner,
            )
        }
        uploaded = {key.key_id for key in keys}
        await self.release(kind, sorted(pooled - uploaded))
        await self._conn.execute(
            f"DELETE FROM {table} WHERE account_uuid = $1 AND device_id = $2",  # noqa: S608
            *self._owner,
        )
        offered = [
            key
            for key in keys
            if key.key_id in pooled or not self._known.get((kind, key.key_id), (b"", False))[1]
        ]
        await self.record(kind, offered)
        return offered

    async def record(self, kind: str, keys: Sequence[AnyKey]) -> None:
        """Add the keys the ledger does not know yet."""
        new = [key for key in keys if (kind, key.key_id) not in self._known]
        if new:
            await self._conn.executemany(
                "INSERT INTO prekey_ids (account_uuid, device_id, kind, key_id, digest)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(*self._owner, kind, k.key_id, key_digest(k.public_key)) for k in new],
            )
            for key in new:
                self._known[(kind, key.key_id)] = (key_digest(key.public_key), False)

    async def release(self, kind: str, key_ids: Sequence[int]) -> None:
        """Mark ids as no longer offered (handed out or replaced)."""
        if key_ids:
            await self._conn.executemany(
                "UPDATE prekey_ids SET released_at = $5 WHERE account_uuid = $1"
                " AND device_id = $2 AND kind = $3 AND key_id = $4 AND released_at IS NULL",
                [(*self._owner, kind, key_id, self._now) for key_id in key_ids],
            )


async def record_registered_keys(
    conn: Connection,
    account: str,
    device_id: int,
    signed: SignedPreKey,
    last_resort: KemSignedPreKey,
) -> None:
    """Enter a new or re-registered device's signed and last-resort keys in the id ledger.

    Run in the transaction that stores the device, so that a later upload reusing either id
    with other key material is refused like any other.
    """
    await conn.executemany(
        "INSERT INTO prekey_ids (account_uuid, device_id, kind, key_id, digest)"
        " VALUES ($1, $2, $3, $4, $5)",
        [
            (account, device_id, "signed", signed.key_id, key_digest(signed.public_key)),
            (account, device_id, "kem", last_resort.key_id, key_digest(last_resort.public_key)),
        ],
    )
