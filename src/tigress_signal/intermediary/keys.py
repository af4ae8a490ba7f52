"""Prekeys: upload (``PUT /v2/keys``), count (``GET /v2/keys``) and bundle fetch.

A bundle fetch hands out, per device, the signed EC prekey, one one-time EC prekey (or none when
the pool is empty) and one one-time Kyber prekey, or the last-resort Kyber prekey when that pool
is empty. One-time keys are deleted as they are handed out, oldest first, in the same
transaction that reads them, so two fetches never receive the same key; the last-resort key is
never deleted.
"""

from __future__ import annotations

import logging

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
from tigress_signal.intermediary.signatures import check_prekey_signatures
from tigress_signal.storage import Connection, Row

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
    owner = (device.uuid, device.device_id)
    async with context.db.transaction() as conn:
        if body.pre_keys:
            await conn.execute(
                "DELETE FROM one_time_prekeys WHERE account_uuid = $1 AND device_id = $2", *owner
            )
            await conn.executemany(
                "INSERT INTO one_time_prekeys (account_uuid, device_id, key_id, public_key)"
                " VALUES ($1, $2, $3, $4)",
                [(*owner, key.key_id, key.public_key) for key in body.pre_keys],
            )
        if body.pq_pre_keys:
            await conn.execute(
                "DELETE FROM one_time_pq_prekeys WHERE account_uuid = $1 AND device_id = $2",
                *owner,
            )
            await conn.executemany(
                "INSERT INTO one_time_pq_prekeys"
                " (account_uuid, device_id, key_id, public_key, signature)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(*owner, k.key_id, k.public_key, k.signature) for k in body.pq_pre_keys],
            )
        if body.signed_pre_key is not None:
            key = body.signed_pre_key
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
    return json_response(PreKeyCount(count=int(count), pq_count=int(pq_count)))


async def fetch_bundle(request: Request) -> Response:
    """``GET /v2/keys/{uuid}/{deviceId}``: a prekey bundle, taking one-time keys."""
    context = context_of(request)
    await context.authenticate(request)
    target = parse_uuid(request.path_params["uuid"])
    device_text = request.path_params["device_id"]
    device_id = None if device_text == "*" else parse_device_id(device_text)

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
