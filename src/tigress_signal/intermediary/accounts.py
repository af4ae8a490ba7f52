"""Accounts: ``POST /v1/accounts`` and ``GET /v1/accounts/whoami``.

An account is created with its identity key, its first device's registration id, signed EC
prekey and last-resort Kyber prekey; the server picks the account id (a random UUID) and the
device password, and shows the password once. Creation needs no credentials; it is
rate-limited per client address. Further devices are linked (:mod:`.devices`).
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import json_response, read_entity
from tigress_signal.intermediary.auth import new_password
from tigress_signal.intermediary.context import client_address, context_of
from tigress_signal.intermediary.entities import AccountCreated, AccountCreateRequest, WhoAmI
from tigress_signal.intermediary.schema import key_digest
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
        await conn.executemany(
            "INSERT INTO prekey_ids (account_uuid, device_id, kind, key_id, digest)"
            " VALUES ($1, $2, $3, $4, $5)",
            [
                (
                    account_id,
                    PRIMARY_DEVICE_ID,
                    "signed",
                    body.signed_pre_key.key_id,
                    key_digest(body.signed_pre_key.public_key),
                ),
                (
                    account_id,
                    PRIMARY_DEVICE_ID,
                    "kem",
                    body.pq_last_resort_pre_key.key_id,
                    key_digest(body.pq_last_resort_pre_key.public_key),
                ),
            ],
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
