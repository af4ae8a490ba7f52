"""Checking prekey signatures against an account's identity key, through libsignal.

A signed EC prekey and every Kyber prekey carry an XEdDSA signature by the identity key over
the key's serialized public bytes (33 or 1569 bytes). The server checks them before storing, so
a sender never receives a bundle that libsignal would refuse. The check itself is libsignal's,
reached through the sidecar (:class:`tigress_signal.bridge.libsignal.LibsignalBridge`); no
signature code is written in Python. The server depends only on :class:`SignatureVerifier`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from tigress_signal.errors import BridgeError, SignalProtocolError
from tigress_signal.intermediary.api import ApiError
from tigress_signal.intermediary.entities import KemSignedPreKey, SignedPreKey

logger = logging.getLogger(__name__)


class SignatureVerifier(Protocol):
    """Verifies an XEdDSA signature made with a libsignal identity key."""

    async def verify_signature(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``message`` verifies with the serialized ``public_key``.

        Raises:
            BridgeError: the verifier could not answer.
        """
        ...


async def check_prekey_signatures(
    verifier: SignatureVerifier,
    identity_key: bytes,
    keys: Iterable[tuple[str, SignedPreKey | KemSignedPreKey]],
) -> None:
    """Verify every signed prekey's signature by the identity key; all checks run at once.

    Args:
        verifier: libsignal's verifier.
        identity_key: the account's serialized identity public key.
        keys: (field name for the error message, key) pairs.

    Raises:
        ApiError: 422 ``invalid_signature`` naming the first key that does not verify;
            503 ``unavailable`` when the verifier cannot be reached.
    """
    named = list(keys)
    if not named:
        return
    try:
        results = await asyncio.gather(
            *(_verify(verifier, identity_key, key.public_key, key.signature) for _, key in named)
        )
    except BridgeError as exc:
        logger.error("signature verification is unavailable: %s", exc)
        raise ApiError(
            503,
            "unavailable",
            "signatures cannot be checked right now; try again later",
            headers={"Retry-After": "5"},
        ) from exc
    for (name, key), valid in zip(named, results, strict=True):
        if not valid:
            raise ApiError(
                422,
                "invalid_signature",
                f"the signature of {name} (key id {key.key_id}) does not verify with the "
                "identity key",
            )


async def _verify(
    verifier: SignatureVerifier, identity_key: bytes, public_key: bytes, signature: bytes
) -> bool:
    try:
        return await verifier.verify_signature(identity_key, public_key, signature)
    except SignalProtocolError:
        # libsignal refusing the key or signature bytes themselves is a failed verification
        # of what the client sent, not an outage.
        return False
