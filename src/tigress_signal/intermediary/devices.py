"""Several devices per account: link codes, linking, listing and removing devices.

An existing device asks for a link code (``POST /v1/devices/provisioning/code``): 128 random
bits, valid for ``link_code_ttl_seconds`` and for one use, stored only as its SHA-256 digest.
The new device sends the code with its own registration id, signed EC prekey and last-resort
Kyber prekey (``PUT /v1/devices/link``, no credentials: the code is the credential). The keys
must be signed by the account's identity key, which every device of the account shares, as in
Signal. The server picks the lowest free device id and a new password, shown once.

The code is checked before the signatures and taken (deleted) in the transaction that adds the
device, so two devices racing with one code get one device between them. Linking attempts are
rate-limited per client address.

``DELETE /v1/devices/{deviceId}`` removes a device with its keys and messages; a device may
remove itself and the primary device (1) any other, but the primary device stays. Its
WebSocket, in any server process, is closed with 4401.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time

from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import (
    ApiError,
    json_response,
    parse_device_id,
    read_entity,
)
from tigress_signal.intermediary.auth import new_password
from tigress_signal.intermediary.context import client_address, context_of
from tigress_signal.intermediary.entities import (
    MAX_DEVICE_ID,
    DeviceAddress,
    DeviceInfo,
    DeviceLinked,
    DeviceList,
    LinkCode,
    LinkDeviceRequest,
)
from tigress_signal.intermediary.keys import record_registered_keys
from tigress_signal.intermediary.signatures import check_prekey_signatures

logger = logging.getLogger(__name__)

PRIMARY_DEVICE_ID = 1
_CODE_BYTES = 16


async def issue_link_code(request: Request) -> Response:
    """``POST /v1/devices/provisioning/code``: a one-time code to link a new device."""
    context = context_of(request)
    device = await context.authenticate(request)
    code = secrets.token_urlsafe(_CODE_BYTES)
    expires_at = int(time.time() * 1000) + context.config.link_code_ttl_seconds * 1000
    await context.db.execute(
        "INSERT INTO link_codes (code_hash, account_uuid, issued_by, expires_at)"
        " VALUES ($1, $2, $3, $4)",
        _code_hash(code),
        device.uuid,
        device.device_id,
        expires_at,
    )
    return json_response(LinkCode(verification_code=code, expires_at=expires_at))


async def link_device(request: Request) -> Response:
    """``PUT /v1/devices/link``: add a device to the account that issued the code."""
    context = context_of(request)
    context.limiter.check("device_link", client_address(request))
    body = await read_entity(request, LinkDeviceRequest, context.config.max_body_bytes)
    code_hash = _code_hash(body.verification_code)
    now = int(time.time() * 1000)

    # Which account the code is for; the signatures need its identity key.
    row = await context.db.fetchrow(
        "SELECT c.account_uuid, a.identity_key FROM link_codes c"
        " JOIN accounts a ON a.uuid = c.account_uuid"
        " WHERE c.code_hash = $1 AND c.expires_at > $2",
        code_hash,
        now,
    )
    if row is None:
        raise _invalid_code()
    account = str(row[0])
    await check_prekey_signatures(
        context.verifier,
        bytes(row[1]),
        [
            ("signedPreKey", body.signed_pre_key),
            ("pqLastResortPreKey", body.pq_last_resort_pre_key),
        ],
    )
    password = new_password()
    password_hash = await context.authenticator.hash_new_password(password)

    async with context.db.transaction() as conn:
        taken = await conn.execute(
            "DELETE FROM link_codes WHERE code_hash = $1 AND expires_at > $2", code_hash, now
        )
        if taken == 0:
            raise _invalid_code()  # used by a concurrent request meanwhile
        used = {
            int(r[0])
            for r in await conn.fetch(
                "SELECT device_id FROM devices WHERE account_uuid = $1", account
            )
        }
        if len(used) >= context.config.max_devices_per_account:
            raise ApiError(
                409,
                "device_limit_reached",
                f"the account has {len(used)} devices, the most it may have",
                maxDevices=context.config.max_devices_per_account,
            )
        device_id = next(d for d in range(1, MAX_DEVICE_ID + 1) if d not in used)
        await conn.execute(
            "INSERT INTO devices (account_uuid, device_id, registration_id, password_hash,"
            " signed_prekey_id, signed_prekey, signed_prekey_signature,"
            " pq_last_resort_id, pq_last_resort_key, pq_last_resort_signature, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            account,
            device_id,
            body.registration_id,
            password_hash,
            body.signed_pre_key.key_id,
            body.signed_pre_key.public_key,
            body.signed_pre_key.signature,
            body.pq_last_resort_pre_key.key_id,
            body.pq_last_resort_pre_key.public_key,
            body.pq_last_resort_pre_key.signature,
            now,
        )
        await record_registered_keys(
            conn, account, device_id, body.signed_pre_key, body.pq_last_resort_pre_key
        )
    context.authenticator.remember(password_hash, password)
    logger.info("linked device %d to an account", device_id)
    return json_response(DeviceLinked(uuid=account, device_id=device_id, password=password))


async def list_devices(request: Request) -> Response:
    """``GET /v1/devices``: the devices of the caller's account."""
    context = context_of(request)
    device = await context.authenticate(request)
    rows = await context.db.fetch(
        "SELECT device_id, registration_id, created_at FROM devices"
        " WHERE account_uuid = $1 ORDER BY device_id",
        device.uuid,
    )
    return json_response(
        DeviceList(
            devices=[
                DeviceInfo(id=int(r[0]), registration_id=int(r[1]), created=int(r[2]))
                for r in rows
            ]
        )
    )


async def remove_device(request: Request) -> Response:
    """``DELETE /v1/devices/{deviceId}``: remove a device with its keys and messages."""
    context = context_of(request)
    caller = await context.authenticate(request)
    target = parse_device_id(request.path_params["device_id"])
    if target == PRIMARY_DEVICE_ID:
        raise ApiError(403, "forbidden", "the primary device cannot be removed")
    if caller.device_id not in (PRIMARY_DEVICE_ID, target):
        raise ApiError(403, "forbidden", "only the primary device may remove other devices")
    removed = await context.db.execute(
        "DELETE FROM devices WHERE account_uuid = $1 AND device_id = $2", caller.uuid, target
    )
    if removed == 0:
        raise ApiError(404, "not_found", "no such device")
    await context.switchboard.device_removed(DeviceAddress(caller.uuid, target))
    logger.info("removed device %d of an account", target)
    return Response(status_code=204)


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def _invalid_code() -> ApiError:
    return ApiError(403, "invalid_link_code", "the link code is wrong, used or expired")
