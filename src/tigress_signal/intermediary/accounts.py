"""Accounts: ``POST /v1/accounts``, ``PUT /v1/accounts/identity`` and ``GET /v1/accounts/whoami``.

An account is created with its identity key, its first device's registration id, signed EC
prekey and last-resort Kyber prekey; the server picks the account id (a random UUID) and the
device password, and shows the password once. Creation needs no credentials; it is
rate-limited per client address. Further devices are linked (:mod:`.devices`).

Registering again (``PUT /v1/accounts/identity``) is what a reinstalled wallet does: the
account keeps its id, but everything tied to the old identity key goes. Signal-Server does the
same on re-registration, and the choices follow it where they apply:

* Only the primary device may do it, with its current credentials (Signal-Server asks for a
  verified phone number instead; this server has no numbers, so the primary device's password
  stands in for that proof). The body is the one of account creation: the new identity key,
  a new registration id, and a signed EC prekey and last-resort Kyber prekey signed by the new
  key (checked before anything is stored).
* The identity key is replaced, the primary device gets the new registration id and keys and a
  new password (shown once in the answer; the old one stops working at once), and the other
  devices are removed, since they were linked to the old identity.
* Every one-time prekey of the account and the prekey id ledger are deleted (they belong to the
  old identity, and the new install starts its key ids afresh), and so are the messages waiting
  for the account's devices: they are encrypted for the old identity, which the new install
  cannot decrypt (Signal-Server clears the queue too). Their senders are not told; their
  wallets learn about the change from the 410 (stale device) answer to their next send.
* Open WebSockets of the account's devices are closed with 4401, like a removed device's.
* It is rate-limited per account with the account-creation limit (429 with Retry-After).
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import ApiError, json_response, read_entity
from tigress_signal.intermediary.auth import new_password
from tigress_signal.intermediary.context import client_address, context_of
from tigress_signal.intermediary.entities import (
    AccountCreated,
    AccountCreateRequest,
    DeviceAddress,
    WhoAmI,
)
from tigress_signal.intermediary.keys import record_registered_keys
from tigress_signal.intermediary.signatures import check_prekey_signatures

logger = logging.getLogger(__name__)

#: The device an account is created with.
PRIMARY_DEVICE_ID = 1


async def create_account(request: Request) -> Response:
    """``POST /v1/accounts``: register an identity and its first device."""
    context = context_of(request)
    # Registration is open; each one costs a password hash and two signature checks.
    context.limiter.check("account_creation", client_address(request))
    body = await read_entity(request, AccountCreateRequest, context.config.max_body_bytes)

    # Both signed keys must verify with the new identity key before anything is stored.
    await check_prekey_signatures(
        context.verifier,
        body.identity_key,
        [
            ("signedPreKey", body.signed_pre_key),
            ("pqLastResortPreKey", body.pq_last_resort_pre_key),
        ],
    )

    account_id = str(uuid.uuid4())
    password = new_password()
    password_hash = await context.authenticator.hash_new_password(password)
    now = int(time.time() * 1000)
    async with context.db.transaction() as conn:
        await conn.execute(
            "INSERT INTO accounts (uuid, identity_key, created_at) VALUES ($1, $2, $3)",
            account_id,
            body.identity_key,
            now,
        )
        await conn.execute(
            "INSERT INTO devices (account_uuid, device_id, registration_id, password_hash,"
            " signed_prekey_id, signed_prekey, signed_prekey_signature,"
            " pq_last_resort_id, pq_last_resort_key, pq_last_resort_signature, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            account_id,
            PRIMARY_DEVICE_ID,
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
            conn, account_id, PRIMARY_DEVICE_ID, body.signed_pre_key, body.pq_last_resort_pre_key
        )
    # The device's first request should not pay for a password hash the server just made.
    context.authenticator.remember(password_hash, password)
    logger.debug("created account %s", account_id)
    return json_response(
        AccountCreated(uuid=account_id, device_id=PRIMARY_DEVICE_ID, password=password)
    )


async def whoami(request: Request) -> Response:
    """``GET /v1/accounts/whoami``: the account and device the credentials belong to."""
    device = await context_of(request).authenticate(request)
    return json_response(WhoAmI(uuid=device.uuid, device_id=device.device_id))


async def replace_identity(request: Request) -> Response:
    """``PUT /v1/accounts/identity``: register the account again with a new identity key."""
    context = context_of(request)
    device = await context.authenticate(request)
    if device.device_id != PRIMARY_DEVICE_ID:
        raise ApiError(403, "forbidden", "only the primary device may register the account again")
    # As costly as a creation (a password hash, two signature checks): the same limit, per
    # account, so that one account cannot spend the server's hashing time in a loop.
    context.limiter.check("account_creation", f"identity:{device.uuid}")
    body = await read_entity(request, AccountCreateRequest, context.config.max_body_bytes)
    await check_prekey_signatures(
        context.verifier,
        body.identity_key,
        [
            ("signedPreKey", body.signed_pre_key),
            ("pqLastResortPreKey", body.pq_last_resort_pre_key),
        ],
    )

    password = new_password()
    password_hash = await context.authenticator.hash_new_password(password)
    now = int(time.time() * 1000)
    account = device.uuid
    async with context.db.transaction() as conn:
        rows = await conn.fetch(
            "SELECT device_id FROM devices WHERE account_uuid = $1 ORDER BY device_id", account
        )
        device_ids = [int(r[0]) for r in rows]
        await conn.execute(
            "UPDATE accounts SET identity_key = $2 WHERE uuid = $1", account, body.identity_key
        )
        # Linked devices go with their keys, messages and presence (ON DELETE CASCADE).
        await conn.execute(
            "DELETE FROM devices WHERE account_uuid = $1 AND device_id <> $2",
            account,
            PRIMARY_DEVICE_ID,
        )
        for table in ("one_time_prekeys", "one_time_pq_prekeys", "messages", "prekey_ids"):
            await conn.execute(f"DELETE FROM {table} WHERE account_uuid = $1", account)  # noqa: S608 - fixed names
        await conn.execute("DELETE FROM link_codes WHERE account_uuid = $1", account)
        await conn.execute(
            "UPDATE devices SET registration_id = $3, password_hash = $4,"
            " signed_prekey_id = $5, signed_prekey = $6, signed_prekey_signature = $7,"
            " pq_last_resort_id = $8, pq_last_resort_key = $9, pq_last_resort_signature = $10,"
            " created_at = $11"
            " WHERE account_uuid = $1 AND device_id = $2",
            account,
            PRIMARY_DEVICE_ID,
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
            conn, account, PRIMARY_DEVICE_ID, body.signed_pre_key, body.pq_last_resort_pre_key
        )
    context.authenticator.remember(password_hash, password)
    # Connections made with the old identity end; the new install connects with its password.
    for device_id in device_ids:
        await context.switchboard.device_removed(DeviceAddress(account, device_id))
    logger.info(
        "an account registered again with a new identity (%d device(s) removed)",
        len(device_ids) - 1,
    )
    return json_response(
        AccountCreated(uuid=account, device_id=PRIMARY_DEVICE_ID, password=password)
    )
