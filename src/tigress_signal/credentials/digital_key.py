"""The stateful sample credential: a CCC-style digital key the receiver's device makes itself.

The flow, with the messages of :mod:`~tigress_signal.credentials.messages`::

    receiver  DigitalKeyHolder.generate()                 new P-256 key pair on this device
              holder.signing_request(share_id)  ------>   KeySigningRequest(public key, proof)
    owner     KeyOwner.endorse(request, lock_id, ...)     checks the proof, signs the key
                                                <------   KeyImportRequest(Endorsement)
    receiver  holder.check_endorsement(endorsement, share_id), stores key + endorsement
    at the lock: lock.challenge() -> holder.respond(challenge, lock_id) -> lock.unlock(...)

The private key never leaves the receiver's wallet; the owner only ever sees its public half.

Warning:
    The attestation in a :class:`~tigress_signal.credentials.messages.KeySigningRequest` made
    here is a *software proof of possession*: a signature by the new key over the share id, a
    nonce and the public key. It proves that whoever sent the request held the private key at
    that moment and meant it for this share. It does not prove that the key was made in, or is
    confined to, secure hardware, nor that it cannot be copied off the device; a real CCC key
    would carry a hardware attestation chain from the phone's secure element instead.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from tigress_signal.credentials import _signing
from tigress_signal.credentials.messages import (
    Base64Bytes,
    EcdsaSignature,
    Endorsement,
    KeySigningRequest,
    WireModel,
    byte_length,
    describe_validation_error,
)
from tigress_signal.errors import CredentialError, EndorsementRejected

#: Media type of a digital key as a wallet stores it and as a stateful offer names it.
DIGITAL_KEY_MEDIA_TYPE = "application/vnd.tigress-signal.digital-key+json"

_ATTESTATION_LABEL = "digital-key/key-signing-request/v1"
_ENDORSEMENT_LABEL = "digital-key/endorsement/v1"
_UNLOCK_LABEL = "digital-key/unlock-response/v1"


class ChallengeResponse(WireModel):
    """A key holder's answer to a lock's challenge.

    Attributes:
        challenge: the challenge bytes the lock issued, returned as they came.
        signature: the holder key's ECDSA-SHA256 signature over the challenge bound to the
            lock id (see :func:`unlock_signing_input`).
    """

    challenge: Annotated[Base64Bytes, byte_length(16, 64)]
    signature: EcdsaSignature


class DigitalKeyHolder:
    """The receiver's side of a digital key: a P-256 key pair made on this device.

    Store :meth:`private_key_pem` in the wallet next to the endorsement; load it back with
    :meth:`from_private_key_pem`.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        """Wrap an existing P-256 private key.

        Raises:
            CredentialError: the key is not on P-256.
        """
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise CredentialError("a digital key must be a P-256 key")
        self._private_key = private_key
        self._public_key_der = _signing.public_key_der(private_key.public_key())

    @classmethod
    def generate(cls) -> DigitalKeyHolder:
        """Make a new key pair on this device."""
        return cls(_signing.generate_private_key())

    @classmethod
    def from_private_key_pem(cls, pem: bytes, password: bytes | None = None) -> DigitalKeyHolder:
        """Load a key stored with :meth:`private_key_pem`.

        Raises:
            CredentialError: the PEM is damaged, the password is wrong, or the key is not P-256.
        """
        try:
            return cls(_signing.load_private_key_pem(pem, password))
        except ValueError as exc:
            raise CredentialError(f"cannot load the digital key: {exc}") from exc

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The private key as PEM PKCS#8, encrypted when ``password`` is given."""
        return _signing.private_key_pem(self._private_key, password)

    @property
    def public_key_der(self) -> bytes:
        """DER SubjectPublicKeyInfo of this key (what the owner endorses)."""
        return self._public_key_der

    def signing_request(self, share_id: UUID, nonce: bytes | None = None) -> KeySigningRequest:
        """Ask the owner to endorse this key for a share.

        Args:
            share_id: the share whose offer this answers.
            nonce: 16 to 64 bytes; 32 random bytes when not given.

        Returns:
            The request, its attestation a software proof of possession (see the module's
            warning).
        """
        nonce = secrets.token_bytes(32) if nonce is None else nonce
        message = attestation_signing_input(share_id, nonce, self._public_key_der)
        return KeySigningRequest(
            share_id=share_id,
            public_key=self._public_key_der,
            attestation=_signing.sign(self._private_key, message),
            nonce=nonce,
        )

    def check_endorsement(
        self,
        endorsement: Endorsement,
        share_id: UUID,
        owner_public_key: _signing.PublicKeyLike | None = None,
    ) -> None:
        """Check that an endorsement is for this key and this share, and is signed.

        Args:
            endorsement: what the owner sent back.
            share_id: the share this key was requested in.
            owner_public_key: the owner key to insist on, if this wallet knows it; otherwise
                the signature is checked against the owner key the endorsement names.

        Raises:
            EndorsementRejected: it endorses another key or share, or its signature fails.
        """
        if endorsement.public_key != self._public_key_der:
            raise EndorsementRejected("the endorsement is for another key than this device's")
        if endorsement.share_id != share_id:
            raise EndorsementRejected(
                f"the endorsement is for share {endorsement.share_id}, not {share_id}"
            )
        verify_endorsement(
            endorsement,
            endorsement.owner_public_key if owner_public_key is None else owner_public_key,
        )

    def respond(self, challenge: bytes, lock_id: str) -> ChallengeResponse:
        """Answer a lock's challenge with this key.

        Args:
            challenge: the bytes the lock issued.
            lock_id: the lock that issued them; the signature is bound to it.

        Raises:
            CredentialError: the challenge is not 16 to 64 bytes.
        """
        signature = _signing.sign(self._private_key, unlock_signing_input(lock_id, challenge))
        try:
            return ChallengeResponse(challenge=challenge, signature=signature)
        except ValidationError as exc:
            raise CredentialError(
                f"cannot answer the challenge: {describe_validation_error(exc)}"
            ) from exc


class KeyOwner:
    """The owner's side: the long-term P-256 key whose endorsements a lock trusts."""

    def __init__(self, signing_key: ec.EllipticCurvePrivateKey) -> None:
        """Wrap an existing P-256 signing key.

        Raises:
            CredentialError: the key is not on P-256.
        """
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise CredentialError("an owner key must be a P-256 key")
        self._signing_key = signing_key
        self._public_key_der = _signing.public_key_der(signing_key.public_key())

    @classmethod
    def generate(cls) -> KeyOwner:
        """Make a new owner key (the lock must then be told its public half)."""
        return cls(_signing.generate_private_key())

    @classmethod
    def from_private_key_pem(cls, pem: bytes, password: bytes | None = None) -> KeyOwner:
        """Load a key stored with :meth:`private_key_pem`.

        Raises:
            CredentialError: the PEM is damaged, the password is wrong, or the key is not P-256.
        """
        try:
            return cls(_signing.load_private_key_pem(pem, password))
        except ValueError as exc:
            raise CredentialError(f"cannot load the owner key: {exc}") from exc

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The signing key as PEM PKCS#8, encrypted when ``password`` is given."""
        return _signing.private_key_pem(self._signing_key, password)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The owner's public key, the one a lock is set up with."""
        return self._signing_key.public_key()

    @property
    def public_key_der(self) -> bytes:
        """DER SubjectPublicKeyInfo of the owner's public key."""
        return self._public_key_der

    def verify_request(self, request: KeySigningRequest) -> None:
        """Check a key signing request's proof of possession.

        Raises:
            CredentialError: the attestation is not the requested key's signature over this
                share id, nonce and key.
        """
        key = _signing.load_public_key(request.public_key)
        message = attestation_signing_input(request.share_id, request.nonce, request.public_key)
        if not _signing.verify(key, request.attestation, message):
            raise CredentialError(
                f"the key signing request for share {request.share_id} does not prove "
                "possession of its key (the attestation does not verify)"
            )

    def endorse(
        self,
        request: KeySigningRequest,
        lock_id: str,
        rights: Iterable[str],
        not_before: datetime,
        not_after: datetime,
    ) -> Endorsement:
        """Check a key signing request, then sign its key for a lock.

        Args:
            request: the receiver's key signing request.
            lock_id: the lock the key will open.
            rights: what the key may do, e.g. ``("unlock", "lock")``.
            not_before: first instant the key is good (timezone-aware).
            not_after: instant it stops being good (timezone-aware, later than not_before).

        Returns:
            The signed endorsement, with a fresh random serial.

        Raises:
            CredentialError: the request's proof of possession fails, or the terms are invalid
                (unknown lock id form, no rights, repeated rights, naive or reversed times).
        """
        self.verify_request(request)
        try:
            # Validate the terms before signing, so nothing invalid is ever signed.
            unsigned = Endorsement(
                share_id=request.share_id,
                lock_id=lock_id,
                public_key=request.public_key,
                owner_public_key=self._public_key_der,
                rights=tuple(rights),
                not_before=not_before,
                not_after=not_after,
                serial=secrets.randbelow(2**63 - 1) + 1,
                signature=bytes(8),
            )
        except ValidationError as exc:
            raise CredentialError(f"cannot endorse: {describe_validation_error(exc)}") from exc
        signature = _signing.sign(self._signing_key, endorsement_signing_input(unsigned))
        return unsigned.model_copy(update={"signature": signature})


def verify_endorsement(endorsement: Endorsement, owner_public_key: _signing.PublicKeyLike) -> None:
    """Check that an endorsement names this owner key and carries its valid signature.

    Args:
        endorsement: the endorsement to check.
        owner_public_key: the owner key to check against (key object or DER).

    Raises:
        EndorsementRejected: the endorsement names another owner key, or the signature fails.
    """
    try:
        owner_key = _signing.coerce_public_key(owner_public_key)
    except ValueError as exc:
        raise CredentialError(f"unusable owner public key: {exc}") from exc
    if endorsement.owner_public_key != _signing.public_key_der(owner_key):
        raise EndorsementRejected(
            "the endorsement was made by another owner key "
            f"({_signing.key_id(_signing.load_public_key(endorsement.owner_public_key))}, "
            f"expected {_signing.key_id(owner_key)})"
        )
    if not _signing.verify(
        owner_key, endorsement.signature, endorsement_signing_input(endorsement)
    ):
        raise EndorsementRejected(
            f"the owner signature on endorsement {endorsement.serial} does not verify "
            "(altered after signing, or not signed by the owner)"
        )


def attestation_signing_input(share_id: UUID, nonce: bytes, public_key_der: bytes) -> bytes:
    """What the new key signs in a key signing request: share id, nonce and the key itself."""
    return _signing.signing_input(_ATTESTATION_LABEL, share_id.bytes, nonce, public_key_der)


def endorsement_signing_input(endorsement: Endorsement) -> bytes:
    """What the owner signs: every field of the endorsement except the signature."""
    return _signing.signing_input(
        _ENDORSEMENT_LABEL,
        _signing.text_field(endorsement.lock_id),
        endorsement.public_key,
        endorsement.owner_public_key,
        _signing.list_field(endorsement.rights),
        _signing.time_field(endorsement.not_before),
        _signing.time_field(endorsement.not_after),
        _signing.int_field(endorsement.serial),
        endorsement.share_id.bytes,
    )


def unlock_signing_input(lock_id: str, challenge: bytes) -> bytes:
    """What a key holder signs to answer a lock: the lock's id and its challenge."""
    return _signing.signing_input(_UNLOCK_LABEL, _signing.text_field(lock_id), challenge)
