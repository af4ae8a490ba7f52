"""The stateless sample credential: an access token a venue issues and signs.

A token says that the venue (``issuer``) lets a holder (``subject``, a label such as a guest
name) do what ``scope`` lists (e.g. ``room:214``) between ``not_before`` and ``not_after``. The
issuer signs it with its P-256 key (ECDSA-SHA256), so a door reader holding the issuer's public
key can check it offline. A token is a bearer credential: whoever holds the bytes can use it,
which is why it travels only inside an end-to-end encrypted share.

Its content (media type :data:`ACCESS_TOKEN_MEDIA_TYPE`) is compact UTF-8 JSON::

    {"format": "tigress-signal-access-token/v1",
     "token": {"issuer": ..., "subject": ..., "scope": [...], "not_before": ...,
               "not_after": ..., "token_id": <32 hex digits>, "key_id": <16 hex digits>},
     "signature": <base64 DER ECDSA signature>}

The signature covers a canonical binary encoding of the ``token`` fields, not the JSON text, so
re-serializing the JSON does not break it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Final, Literal, Self

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import AfterValidator, AwareDatetime, Field, ValidationError, model_validator

from tigress_signal.credentials import _signing
from tigress_signal.credentials.messages import (
    MAX_PROVISIONING_CONTENT_BYTES,
    EcdsaSignature,
    WireModel,
    check_display_text,
    describe_validation_error,
)
from tigress_signal.errors import CredentialError

#: Media type of an access token's content.
ACCESS_TOKEN_MEDIA_TYPE = "application/vnd.tigress-signal.access-token+json"  # noqa: S105 (not a secret)

#: The value of the document's ``format`` field.
ACCESS_TOKEN_FORMAT: Final = "tigress-signal-access-token/v1"  # noqa: S105 (not a secret)

_LABEL = "access-token/v1"
_SCOPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-")
_HEX = frozenset("0123456789abcdef")


def _check_label(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank")
    return check_display_text(value)


def _check_scope_item(value: str) -> str:
    if not set(value) <= _SCOPE_CHARS:
        raise ValueError("a scope item is letters, digits and . _ : / - only")
    return value


def _hex_of(length: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value) != length or not set(value) <= _HEX:
            raise ValueError(f"must be {length} lowercase hex digits")
        return value

    return AfterValidator(check)


Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_check_label)]
ScopeItem = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_scope_item)]


class AccessToken(WireModel):
    """What an access token grants, as checked by :func:`verify_access_token`.

    Attributes:
        issuer: who issued it (e.g. ``Hotel Example, Berlin``).
        subject: the holder's label (e.g. a guest name).
        scope: what it grants, 1 to 32 distinct items such as ``room:214``.
        not_before: first instant the token is good.
        not_after: instant it stops being good (exclusive).
        token_id: 16 random bytes in hex, unique per token.
        key_id: the issuer key that signed it (first 8 bytes of SHA-256 of its DER, in hex).
    """

    issuer: Label
    subject: Label
    scope: Annotated[tuple[ScopeItem, ...], Field(min_length=1, max_length=32)]
    not_before: AwareDatetime
    not_after: AwareDatetime
    token_id: Annotated[str, _hex_of(32)]
    key_id: Annotated[str, _hex_of(16)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.scope)) != len(self.scope):
            raise ValueError("scope lists an item more than once")
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self

    def is_valid_at(self, when: datetime) -> bool:
        """Whether ``when`` falls within the token's validity window."""
        return self.not_before <= when < self.not_after


class _AccessTokenDocument(WireModel):
    format: Literal["tigress-signal-access-token/v1"]
    token: AccessToken
    signature: EcdsaSignature


class AccessTokenIssuer:
    """A venue's token issuer: a name and a P-256 signing key."""

    def __init__(self, issuer: str, signing_key: ec.EllipticCurvePrivateKey) -> None:
        """Set up an issuer.

        Args:
            issuer: the venue's name as tokens will state it.
            signing_key: the venue's P-256 private key.

        Raises:
            CredentialError: the key is not on P-256.
        """
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise CredentialError("an access token issuer key must be a P-256 key")
        self._issuer = issuer
        self._signing_key = signing_key
        self._key_id = _signing.key_id(signing_key.public_key())

    @classmethod
    def generate(cls, issuer: str) -> AccessTokenIssuer:
        """An issuer with a fresh signing key."""
        return cls(issuer, _signing.generate_private_key())

    @classmethod
    def from_private_key_pem(
        cls, issuer: str, pem: bytes, password: bytes | None = None
    ) -> AccessTokenIssuer:
        """An issuer whose key was stored with :meth:`private_key_pem`.

        Raises:
            CredentialError: the PEM is damaged, the password is wrong, or the key is not P-256.
        """
        try:
            return cls(issuer, _signing.load_private_key_pem(pem, password))
        except ValueError as exc:
            raise CredentialError(f"cannot load the access token issuer key: {exc}") from exc

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The signing key as PEM PKCS#8, encrypted when ``password`` is given."""
        return _signing.private_key_pem(self._signing_key, password)

    @property
    def issuer(self) -> str:
        """The venue's name as its tokens state it."""
        return self._issuer

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The key verifiers check tokens against."""
        return self._signing_key.public_key()

    @property
    def public_key_der(self) -> bytes:
        """DER SubjectPublicKeyInfo of :attr:`public_key`."""
        return _signing.public_key_der(self.public_key)

    def issue(
        self,
        subject: str,
        scope: Iterable[str],
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        """Issue and sign a token.

        Args:
            subject: the holder's label.
            scope: what the token grants, e.g. ``["room:214", "spa"]``.
            not_before: first instant the token is good (timezone-aware).
            not_after: instant it stops being good (timezone-aware, later than not_before).

        Returns:
            The token's content, to offer with media type :data:`ACCESS_TOKEN_MEDIA_TYPE`.

        Raises:
            CredentialError: a field breaks a rule; the message says which.
        """
        try:
            token = AccessToken(
                issuer=self._issuer,
                subject=subject,
                scope=tuple(scope),
                not_before=not_before,
                not_after=not_after,
                token_id=secrets.token_hex(16),
                key_id=self._key_id,
            )
        except ValidationError as exc:
            raise CredentialError(
                f"cannot issue the access token: {describe_validation_error(exc)}"
            ) from exc
        signature = _signing.sign(self._signing_key, _token_signing_input(token))
        document = _AccessTokenDocument(
            format=ACCESS_TOKEN_FORMAT, token=token, signature=signature
        )
        return document.model_dump_json().encode("utf-8")


def verify_access_token(
    content: bytes,
    issuer_public_key: _signing.PublicKeyLike,
    *,
    now: datetime | None = None,
    check_time: bool = True,
) -> AccessToken:
    """Check an access token's form, issuer signature and (by default) validity window.

    Args:
        content: the token's bytes, as :meth:`AccessTokenIssuer.issue` made them.
        issuer_public_key: the issuer's P-256 public key (key object or DER).
        now: the instant to check validity at; the current time when not given.
        check_time: set to False to check only form and signature, e.g. for a wallet storing
            a token that becomes valid later.

    Returns:
        The verified token.

    Raises:
        CredentialError: the content does not parse, the token was signed by another key or
            altered, or (with ``check_time``) it is not yet or no longer valid.
    """
    if len(content) > MAX_PROVISIONING_CONTENT_BYTES:
        raise CredentialError(f"an access token of {len(content)} bytes is implausibly large")
    try:
        document = _AccessTokenDocument.model_validate_json(content)
    except ValidationError as exc:
        raise CredentialError(
            f"not a valid access token: {describe_validation_error(exc)}"
        ) from exc
    try:
        issuer_key = _signing.coerce_public_key(issuer_public_key)
    except ValueError as exc:
        raise CredentialError(f"unusable issuer public key: {exc}") from exc

    # The key id is only a hint for choosing a key; the signature below is what decides.
    token = document.token
    expected_key_id = _signing.key_id(issuer_key)
    if token.key_id != expected_key_id:
        raise CredentialError(
            f"access token {token.token_id} was signed by issuer key {token.key_id}, "
            f"not by the given key {expected_key_id}"
        )
    if not _signing.verify(issuer_key, document.signature, _token_signing_input(token)):
        raise CredentialError(
            f"access token {token.token_id} does not verify (altered after issue, or forged)"
        )

    if check_time:
        when = datetime.now(UTC) if now is None else now
        if when < token.not_before:
            raise CredentialError(
                f"access token {token.token_id} is not valid before {token.not_before.isoformat()}"
            )
        if when >= token.not_after:
            raise CredentialError(
                f"access token {token.token_id} expired at {token.not_after.isoformat()}"
            )
    return token


def _token_signing_input(token: AccessToken) -> bytes:
    return _signing.signing_input(
        _LABEL,
        _signing.text_field(token.issuer),
        _signing.text_field(token.subject),
        _signing.list_field(token.scope),
        _signing.time_field(token.not_before),
        _signing.time_field(token.not_after),
        _signing.text_field(token.token_id),
        _signing.text_field(token.key_id),
    )
