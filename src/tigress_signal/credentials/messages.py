"""The transfer messages two wallets exchange, and their wire form.

A share moves through these messages (see DESIGN, "The two transfers")::

    stateless:  sender -> Offer(provisioning)          receiver -> Accepted | Declined
    stateful:   sender -> Offer(no provisioning)        receiver -> KeySigningRequest
                sender -> KeyImportRequest(endorsement) receiver -> Accepted
    either side, at any step: Cancelled
    sender, to a receiver with several devices: Taken(device that answered first)

Each message travels inside a :class:`TransferEnvelope` (format version, message id, time sent),
encoded by :func:`encode_transfer` as compact UTF-8 JSON and read back by :func:`decode_transfer`.
Byte strings are standard base64 with padding. Validation is strict: unknown fields, wrong types,
oversize values and non-canonical base64 are refused, and a refusal says which field and why.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from tigress_signal.credentials import _signing
from tigress_signal.errors import CredentialError, MalformedTransferMessage

#: The largest encoded transfer message (envelope included) this package writes or reads:
#: 92 KiB. The self-hosted intermediary accepts at most 96 KiB of ciphertext per message, and
#: libsignal adds at most about 3 KB on top of the plaintext (a PreKey message carries the
#: 1,568-byte Kyber ciphertext, keys and ids; every message adds padding, a header and a MAC).
#: An offer's provisioning content travels as base64 (4 bytes for every 3), so the 64 KiB that
#: :class:`ProvisioningInformation` allows takes 85.3 KiB, leaving room for the longest title,
#: description, file name and media types.
MAX_TRANSFER_MESSAGE_BYTES = 92 * 1024

#: The largest provisioning content (the credential's bytes) a model holds: 64 KiB.
MAX_PROVISIONING_CONTENT_BYTES = 64 * 1024

#: The largest attestation a key signing request may carry.
MAX_ATTESTATION_BYTES = 8 * 1024

#: The transfer message format version this package writes and reads.
TRANSFER_FORMAT_VERSION = 1

MAX_TITLE_CHARS = 120
MAX_DESCRIPTION_CHARS = 1000
MAX_REASON_CHARS = 200
MAX_FILENAME_CHARS = 255
MAX_MEDIA_TYPE_CHARS = 255
#: The highest device id an account's device may have (the intermediary's limit too).
MAX_DEVICE_ID = 127


# -- field types -----------------------------------------------------------------------------


def _bytes_from_base64(value: object, info: ValidationInfo) -> object:
    # Only JSON carries bytes as text; from Python, bytes must already be bytes.
    if info.mode != "json" or not isinstance(value, str):
        return value
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not standard base64 with padding") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise ValueError("not canonical base64 (stray bits in the last character)")
    return raw


def _bytes_to_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


#: Bytes that are standard base64 with padding in JSON, and plain bytes in Python.
Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_bytes_from_base64),
    PlainSerializer(_bytes_to_base64, return_type=str, when_used="json"),
]


def byte_length(minimum: int, maximum: int) -> AfterValidator:
    """A validator bounding a bytes field's length, its message counting bytes."""

    def check(value: bytes) -> bytes:
        if len(value) < minimum:
            raise ValueError(f"is {len(value)} bytes, fewer than the minimum of {minimum}")
        if len(value) > maximum:
            raise ValueError(f"is {len(value)} bytes, more than the maximum of {maximum}")
        return value

    return AfterValidator(check)


_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE_RE = re.compile(rf"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}")
_LOCK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_RIGHT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_media_type(value: str) -> str:
    """Check that ``value`` is a bare media type ``type/subtype`` (RFC 6838 names, no parameters).

    Raises:
        ValueError: it is not.
    """
    if len(value) > MAX_MEDIA_TYPE_CHARS or not _MEDIA_TYPE_RE.fullmatch(value):
        raise ValueError("not a media type of the form type/subtype (e.g. application/vc)")
    return value


def check_lock_id(value: str) -> str:
    """Check a lock id: 1 to 64 characters of letters, digits and ``. _ : -``.

    Raises:
        ValueError: it is not one.
    """
    if not _LOCK_ID_RE.fullmatch(value):
        raise ValueError(
            "a lock id is 1-64 characters of letters, digits and . _ : - (starting with a letter "
            "or digit)"
        )
    return value


def _check_right(value: str) -> str:
    if not _RIGHT_RE.fullmatch(value):
        raise ValueError("a right is 1-32 characters of a-z, 0-9 and _ starting with a letter")
    return value


def check_display_text(value: str, *, multiline: bool = False) -> str:
    """Check text shown to a person: no control characters (bar newline and tab when
    ``multiline``) and no bidirectional formatting characters that could disguise it.

    Raises:
        ValueError: it holds such a character; the message names it.
    """
    for char in value:
        if multiline and char in "\n\t":
            continue
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"contains the control character U+{ord(char):04X}")
        if char in _BIDI_CONTROLS:
            raise ValueError(f"contains the bidirectional formatting character U+{ord(char):04X}")
    return value


def _check_title(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank")
    return check_display_text(value, multiline=False)


def _check_description(value: str) -> str:
    return check_display_text(value, multiline=True)


def _check_reason(value: str) -> str:
    return check_display_text(value, multiline=False)


def _check_filename(value: str) -> str:
    # The receiver may save the credential under this name: it must not leave its folder.
    if value in (".", ".."):
        raise ValueError("is not a file name")
    if "/" in value or "\\" in value:
        raise ValueError("contains a path separator; give a bare file name")
    return check_display_text(value, multiline=False)


def _check_p256_public_key(value: bytes) -> bytes:
    if len(value) != _signing.P256_SPKI_LENGTH:
        raise ValueError(
            f"is {len(value)} bytes; a DER P-256 public key is {_signing.P256_SPKI_LENGTH}"
        )
    _signing.load_public_key(value)
    return value


#: A DER-encoded ECDSA P-256 signature (at most 72 bytes).
EcdsaSignature = Annotated[Base64Bytes, byte_length(8, 72)]
MediaType = Annotated[str, AfterValidator(check_media_type)]
LockId = Annotated[str, AfterValidator(check_lock_id)]
Right = Annotated[str, AfterValidator(_check_right)]
#: DER SubjectPublicKeyInfo of a P-256 public key, uncompressed point (91 bytes).
P256PublicKey = Annotated[Base64Bytes, AfterValidator(_check_p256_public_key)]
Title = Annotated[
    str, Field(min_length=1, max_length=MAX_TITLE_CHARS), AfterValidator(_check_title)
]
Description = Annotated[
    str, Field(max_length=MAX_DESCRIPTION_CHARS), AfterValidator(_check_description)
]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS), AfterValidator(_check_reason)]
FileName = Annotated[
    str, Field(min_length=1, max_length=MAX_FILENAME_CHARS), AfterValidator(_check_filename)
]


class WireModel(BaseModel):
    """Base of every model that travels: strict, closed, immutable, no inputs in errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)


# -- the messages ----------------------------------------------------------------------------


class ProvisioningInformation(WireModel):
    """The credential itself, byte for byte, as a stateless offer carries it.

    Attributes:
        media_type: what the content is (e.g. ``application/dc+sd-jwt``).
        content: the credential's bytes, 1 byte to 64 KiB.
        filename: a suggested bare file name for the receiver, if any.
    """

    media_type: MediaType
    content: Annotated[Base64Bytes, byte_length(1, MAX_PROVISIONING_CONTENT_BYTES)]
    filename: FileName | None = None


class Offer(WireModel):
    """The sender's offer of a credential: the first message of every share.

    A stateless offer carries the credential as ``provisioning``; a stateful offer carries none,
    because the receiver's device will make its own key and ask for it to be endorsed.

    Attributes:
        share_id: the share's id, chosen by the sender.
        flow: ``"stateless"`` or ``"stateful"``.
        credential_format: media type of the credential on offer.
        title: one line shown to the receiver (at most 120 characters).
        description: more text shown to the receiver (at most 1000 characters).
        expires_at: when the offer stops being redeemable.
        provisioning: the credential, present exactly when the flow is stateless.
    """

    type: Literal["offer"] = "offer"
    share_id: UUID
    flow: Literal["stateless", "stateful"]
    credential_format: MediaType
    title: Title
    description: Description = ""
    expires_at: AwareDatetime
    provisioning: ProvisioningInformation | None = None

    @model_validator(mode="after")
    def _provisioning_fits_flow(self) -> Self:
        if self.flow == "stateless" and self.provisioning is None:
            raise ValueError("a stateless offer must carry provisioning information")
        if self.flow == "stateful" and self.provisioning is not None:
            raise ValueError(
                "a stateful offer must not carry provisioning information (the receiver's "
                "device makes its own key)"
            )
        return self


class KeySigningRequest(WireModel):
    """The receiver's request that the owner endorse a key made on the receiver's device.

    Attributes:
        share_id: the share this answers.
        public_key: DER SubjectPublicKeyInfo of the new P-256 key.
        attestation: evidence that the requester holds the key; see
            :class:`~tigress_signal.credentials.digital_key.DigitalKeyHolder` for what the
            software proof of possession does and does not prove.
        nonce: 16 to 64 random bytes chosen by the requester, covered by the attestation.
    """

    type: Literal["key_signing_request"] = "key_signing_request"
    share_id: UUID
    public_key: P256PublicKey
    attestation: Annotated[Base64Bytes, byte_length(1, MAX_ATTESTATION_BYTES)]
    nonce: Annotated[Base64Bytes, byte_length(16, 64)]


class Endorsement(WireModel):
    """The owner's signed statement that one receiver key may operate one lock.

    The owner signs every field but ``signature`` (see
    :func:`~tigress_signal.credentials.digital_key.endorsement_signing_input`).

    Attributes:
        share_id: the share the key was requested in.
        lock_id: the lock the key opens.
        public_key: DER SubjectPublicKeyInfo of the receiver's P-256 key.
        owner_public_key: DER SubjectPublicKeyInfo of the owner's P-256 signing key.
        rights: what the key may do (e.g. ``unlock``, ``lock``), no repeats.
        not_before: first instant the key is good.
        not_after: instant the key stops being good (exclusive).
        serial: a number the owner chose for this endorsement.
        signature: the owner's ECDSA-SHA256 signature, DER-encoded.
    """

    share_id: UUID
    lock_id: LockId
    public_key: P256PublicKey
    owner_public_key: P256PublicKey
    rights: Annotated[tuple[Right, ...], Field(min_length=1, max_length=16)]
    not_before: AwareDatetime
    not_after: AwareDatetime
    serial: Annotated[int, Field(ge=1, lt=2**63)]
    signature: EcdsaSignature

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        seen: set[str] = set()
        for right in self.rights:
            if right in seen:
                raise ValueError(f"rights lists {right!r} more than once")
            seen.add(right)
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self


#: A device id within an account.
DeviceId = Annotated[int, Field(ge=1, le=MAX_DEVICE_ID)]


class KeyImportRequest(WireModel):
    """The owner's answer to a key signing request: the endorsement to import.

    Every device of the receiver's account gets this message; only the one named by
    ``device_id`` made the endorsed key, and the others record the share as taken.

    Attributes:
        share_id: the share this answers; must equal ``endorsement.share_id``.
        endorsement: the owner's signed endorsement of the receiver's key.
        device_id: the receiver's device whose key signing request was endorsed (None from
            senders that do not follow devices: whichever device asked may import it).
    """

    type: Literal["key_import_request"] = "key_import_request"
    share_id: UUID
    endorsement: Endorsement
    device_id: DeviceId | None = None

    @model_validator(mode="after")
    def _same_share(self) -> Self:
        if self.endorsement.share_id != self.share_id:
            raise ValueError("the endorsement is for another share than this request")
        return self


class Accepted(WireModel):
    """The receiver provisioned the credential; the share is complete."""

    type: Literal["accepted"] = "accepted"
    share_id: UUID


class Declined(WireModel):
    """The receiver turned the offer down.

    Attributes:
        share_id: the share declined.
        reason: optional words for the sender, at most 200 characters.
    """

    type: Literal["declined"] = "declined"
    share_id: UUID
    reason: Reason | None = None


class Cancelled(WireModel):
    """Either side withdrew from the share.

    Attributes:
        share_id: the share cancelled.
        reason: optional words for the peer, at most 200 characters.
    """

    type: Literal["cancelled"] = "cancelled"
    share_id: UUID
    reason: Reason | None = None


class Taken(WireModel):
    """The sender's word that another device of the receiver's account answered the offer first.

    A share is redeemed at most once per account: the sender honours the first device that
    answers and sends this to all of them, so the others stop offering the share to their user
    (and drop a copy they may already have stored).

    Attributes:
        share_id: the share taken.
        device_id: the device whose answer the sender honoured.
    """

    type: Literal["taken"] = "taken"
    share_id: UUID
    device_id: DeviceId


#: Any transfer message; ``type`` tells which.
TransferMessage = Annotated[
    Offer | KeySigningRequest | KeyImportRequest | Accepted | Declined | Cancelled | Taken,
    Field(discriminator="type"),
]

TRANSFER_MESSAGE_TYPES: tuple[str, ...] = (
    "offer",
    "key_signing_request",
    "key_import_request",
    "accepted",
    "declined",
    "cancelled",
    "taken",
)


class TransferEnvelope(WireModel):
    """One transfer message with what every message needs around it.

    Attributes:
        version: the format version, 1.
        message_id: unique per message; a receiver drops a second copy of the same id.
        sent_at: when the sender wrote the message.
        body: the transfer message.
    """

    version: Literal[1] = 1
    message_id: UUID
    sent_at: AwareDatetime
    body: TransferMessage


# -- wire form -------------------------------------------------------------------------------


def encode_transfer(envelope: TransferEnvelope) -> bytes:
    """Encode an envelope as compact UTF-8 JSON.

    Args:
        envelope: the envelope to send.

    Returns:
        The bytes to hand to a channel, at most :data:`MAX_TRANSFER_MESSAGE_BYTES`.

    Raises:
        CredentialError: the encoded message would be over the size limit (most likely the
            offer's provisioning content is too large to send).
    """
    data = envelope.model_dump_json().encode("utf-8")
    if len(data) > MAX_TRANSFER_MESSAGE_BYTES:
        raise CredentialError(
            f"the {envelope.body.type} message would be {len(data)} bytes, over the "
            f"{MAX_TRANSFER_MESSAGE_BYTES}-byte limit of a transfer message",
            hint="offer a smaller credential (provisioning content up to 55 KiB always fits)",
        )
    return data


def decode_transfer(data: bytes) -> TransferEnvelope:
    """Read a transfer message written by :func:`encode_transfer`.

    Args:
        data: the decrypted message bytes.

    Returns:
        The validated envelope.

    Raises:
        MalformedTransferMessage: the bytes are oversize, not UTF-8 JSON, of another format
            version, of an unknown message type, or break a field rule; the message names the
            first problems found.
    """
    if len(data) > MAX_TRANSFER_MESSAGE_BYTES:
        raise MalformedTransferMessage(
            f"transfer message is {len(data)} bytes, over the "
            f"{MAX_TRANSFER_MESSAGE_BYTES}-byte limit"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedTransferMessage(
            f"transfer message is not UTF-8 (bad byte at offset {exc.start})"
        ) from exc
    document = _parse_json(text)

    # Check the frame before the fields, so a newer or foreign message is named as such.
    if not isinstance(document, dict):
        raise MalformedTransferMessage("transfer message is not a JSON object")
    version = document.get("version")
    if version is None:
        raise MalformedTransferMessage("transfer message has no version")
    if type(version) is not int:
        raise MalformedTransferMessage("transfer message version is not an integer")
    if version != TRANSFER_FORMAT_VERSION:
        raise MalformedTransferMessage(
            f"transfer message is format version {version}; this wallet reads version "
            f"{TRANSFER_FORMAT_VERSION} only",
            hint="update tigress-signal on the older side",
        )
    body = document.get("body")
    if not isinstance(body, dict):
        raise MalformedTransferMessage("transfer message has no body object")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise MalformedTransferMessage("transfer message body has no type")
    if kind not in TRANSFER_MESSAGE_TYPES:
        raise MalformedTransferMessage(
            f"unknown transfer message type {_shown(kind)} "
            f"(known: {', '.join(TRANSFER_MESSAGE_TYPES)})"
        )

    try:
        return TransferEnvelope.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedTransferMessage(
            f"invalid {kind} message: {describe_validation_error(exc)}"
        ) from exc


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """One line naming each failed field and why, without echoing any input value."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def _parse_json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise MalformedTransferMessage(f"transfer message repeats the key {_shown(key)}")
            result[key] = value
        return result

    def no_constant(name: str) -> Any:
        raise MalformedTransferMessage(f"transfer message contains {name}, which is not JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise MalformedTransferMessage(
            f"transfer message is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise MalformedTransferMessage("transfer message nests too deeply") from exc


def _shown(value: str) -> str:
    # Names taken from a peer's message are quoted and cut short before they reach a log line.
    return repr(value if len(value) <= 40 else value[:40] + "...")
