"""The JSON bodies of the intermediary API, shared by the server and its client.

Field names on the wire are Signal-Server's (camelCase); in Python they are the same names in
snake_case (``signedPreKey`` is ``signed_pre_key``). Byte fields are standard base64 with
padding on the wire and :class:`bytes` in Python. Validation is strict: a number sent as a
string, a float for an integer, or base64 with stray characters is refused, so a client bug
shows up as a 422 naming the field instead of a guess by the server.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

#: libsignal's serialized EC public key: a type byte (5, Curve25519) and 32 key bytes.
EC_PUBLIC_KEY_SIZE = 33
EC_KEY_TYPE = 0x05
#: libsignal's serialized Kyber1024 public key: a type byte (8) and 1568 key bytes.
KEM_PUBLIC_KEY_SIZE = 1569
KEM_KEY_TYPE = 0x08
#: An XEdDSA signature.
SIGNATURE_SIZE = 64
#: Device ids libsignal accepts in a protocol address.
MAX_DEVICE_ID = 127
#: Registration ids Signal-Server accepts (``Device.MAX_REGISTRATION_ID``).
MAX_REGISTRATION_ID = 0x3FFF
#: Prekey ids Signal-Server accepts.
MAX_KEY_ID = 2**31 - 1
#: Most keys of one kind in one upload, and most messages in one page.
MAX_KEYS_PER_UPLOAD = 100
MAX_MESSAGES_PER_PAGE = 100
#: Envelope types this server carries: 1 a libsignal Whisper message, 3 a PreKey message, 8 a
#: libsignal PlaintextContent (a decryption-error message, Signal-Server's PLAINTEXT_CONTENT).
ENVELOPE_CIPHERTEXT = 1
ENVELOPE_PREKEY = 3
ENVELOPE_PLAINTEXT_CONTENT = 8
ENVELOPE_TYPES = (ENVELOPE_CIPHERTEXT, ENVELOPE_PREKEY, ENVELOPE_PLAINTEXT_CONTENT)


def _decode_base64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value  # built in Python, not read from JSON
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (standard alphabet, with padding)") from None


def _encode_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


Base64Bytes = Annotated[
    bytes,
    PlainValidator(_decode_base64),
    PlainSerializer(_encode_base64, return_type=str),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


def _ec_public_key(value: bytes) -> bytes:
    if len(value) != EC_PUBLIC_KEY_SIZE or value[0] != EC_KEY_TYPE:
        raise ValueError(f"must be a {EC_PUBLIC_KEY_SIZE}-byte EC public key of type 5")
    return value


def _kem_public_key(value: bytes) -> bytes:
    if len(value) != KEM_PUBLIC_KEY_SIZE or value[0] != KEM_KEY_TYPE:
        raise ValueError(f"must be a {KEM_PUBLIC_KEY_SIZE}-byte Kyber1024 public key of type 8")
    return value


def _signature(value: bytes) -> bytes:
    if len(value) != SIGNATURE_SIZE:
        raise ValueError(f"must be a {SIGNATURE_SIZE}-byte signature")
    return value


EcPublicKey = Annotated[Base64Bytes, AfterValidator(_ec_public_key)]
KemPublicKey = Annotated[Base64Bytes, AfterValidator(_kem_public_key)]
Signature = Annotated[Base64Bytes, AfterValidator(_signature)]
KeyId = Annotated[int, Field(ge=0, le=MAX_KEY_ID)]
DeviceId = Annotated[int, Field(ge=1, le=MAX_DEVICE_ID)]
RegistrationId = Annotated[int, Field(ge=1, le=MAX_REGISTRATION_ID)]
Timestamp = Annotated[int, Field(ge=0, le=2**63 - 1)]


def _envelope_type(value: int) -> int:
    if value not in ENVELOPE_TYPES:
        raise ValueError(
            "must be 1 (a Whisper message), 3 (a PreKey message)"
            " or 8 (plaintext content: a decryption-error message)"
        )
    return value


EnvelopeType = Annotated[
    int,
    AfterValidator(_envelope_type),
    WithJsonSchema({"type": "integer", "enum": list(ENVELOPE_TYPES)}),
]


class WireModel(BaseModel):
    """Base of every body: camelCase on the wire, snake_case in Python, strict, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        frozen=True,
        extra="ignore",  # as Signal-Server: unknown fields are ignored, for compatibility
    )

    def to_json(self) -> bytes:
        """The body as JSON with the wire's field names."""
        return self.model_dump_json(by_alias=True).encode("utf-8")


# -- keys ------------------------------------------------------------------------------------


class PreKey(WireModel):
    """A one-time EC prekey's public half."""

    key_id: KeyId
    public_key: EcPublicKey


class SignedPreKey(WireModel):
    """The signed EC prekey: signed by the identity key over ``public_key``."""

    key_id: KeyId
    public_key: EcPublicKey
    signature: Signature


class KemSignedPreKey(WireModel):
    """A Kyber prekey (one-time or last-resort): signed by the identity key over ``public_key``."""

    key_id: KeyId
    public_key: KemPublicKey
    signature: Signature


class SetKeysRequest(WireModel):
    """``PUT /v2/keys``: every part optional; a non-empty list replaces that kind's keys."""

    pre_keys: Annotated[list[PreKey], Field(max_length=MAX_KEYS_PER_UPLOAD)] | None = None
    signed_pre_key: SignedPreKey | None = None
    pq_pre_keys: Annotated[list[KemSignedPreKey], Field(max_length=MAX_KEYS_PER_UPLOAD)] | None = (
        None
    )
    pq_last_resort_pre_key: KemSignedPreKey | None = None


class PreKeyCount(WireModel):
    """``GET /v2/keys``: how many one-time keys of each kind the server still holds.

    ``signedPreKeyId`` and ``pqLastResortPreKeyId`` (not in Signal-Server's answer) name the
    signed and last-resort keys the server hands out now, so a wallet can check a rotation
    took effect; they are absent in answers of older servers.
    """

    count: int
    pq_count: int
    signed_pre_key_id: KeyId | None = None
    pq_last_resort_pre_key_id: KeyId | None = None


class DeviceBundle(WireModel):
    """One device's part of a prekey bundle."""

    device_id: DeviceId
    registration_id: RegistrationId
    signed_pre_key: SignedPreKey
    pre_key: PreKey | None
    pq_pre_key: KemSignedPreKey


class PreKeyBundle(WireModel):
    """``GET /v2/keys/{uuid}/{deviceId}``: what a sender needs to start sessions."""

    identity_key: EcPublicKey
    devices: list[DeviceBundle]


# -- accounts --------------------------------------------------------------------------------


class AccountCreateRequest(WireModel):
    """``POST /v1/accounts``."""

    identity_key: EcPublicKey
    registration_id: RegistrationId
    signed_pre_key: SignedPreKey
    pq_last_resort_pre_key: KemSignedPreKey


class AccountCreated(WireModel):
    """The answer to account creation; the only time the password is shown."""

    uuid: str
    device_id: DeviceId
    password: str

    def __repr__(self) -> str:
        # Keep the password out of logs and tracebacks that print the object.
        return f"AccountCreated(uuid={self.uuid!r}, device_id={self.device_id}, password=...)"

    __str__ = __repr__


class LinkCode(WireModel):
    """``POST /v1/devices/provisioning/code``: a one-time code to link a new device."""

    verification_code: str
    expires_at: Timestamp


class LinkDeviceRequest(WireModel):
    """``PUT /v1/devices/link``: a new device's keys, signed by the account's identity key."""

    verification_code: Annotated[str, Field(min_length=1, max_length=128)]
    registration_id: RegistrationId
    signed_pre_key: SignedPreKey
    pq_last_resort_pre_key: KemSignedPreKey


class DeviceLinked(AccountCreated):
    """The answer to linking: the new device's credentials, shown only here."""

    def __repr__(self) -> str:
        return f"DeviceLinked(uuid={self.uuid!r}, device_id={self.device_id}, password=...)"

    __str__ = __repr__


class DeviceInfo(WireModel):
    """One device of an account."""

    id: DeviceId
    registration_id: RegistrationId
    created: Timestamp


class DeviceList(WireModel):
    """``GET /v1/devices``."""

    devices: list[DeviceInfo]


class WhoAmI(WireModel):
    """``GET /v1/accounts/whoami``."""

    uuid: str
    device_id: DeviceId


# -- messages --------------------------------------------------------------------------------


class OutgoingMessage(WireModel):
    """One ciphertext for one device of the recipient."""

    type: EnvelopeType
    destination_device_id: DeviceId
    destination_registration_id: RegistrationId
    content: Base64Bytes


class OutgoingMessageList(WireModel):
    """``PUT /v1/messages/{uuid}``: one entry per device of the recipient."""

    messages: Annotated[list[OutgoingMessage], Field(max_length=MAX_DEVICE_ID)]
    online: bool = False
    urgent: bool = True
    timestamp: Timestamp = 0


class SendResult(WireModel):
    """The answer to a send."""

    needs_sync: bool


class Envelope(WireModel):
    """A stored message as its recipient receives it."""

    guid: str
    type: int
    timestamp: int
    source_uuid: str
    source_device: int
    destination_uuid: str
    content: Base64Bytes
    server_timestamp: int
    urgent: bool = True


class MessagePage(WireModel):
    """``GET /v1/messages``: the oldest stored messages, and whether more are stored."""

    messages: list[Envelope]
    more: bool


class ErrorBody(WireModel):
    """Every error answer carries at least these two fields."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


class MismatchedDevicesBody(ErrorBody):
    """409 of a send: the device ids to add and to drop."""

    missing_devices: list[int]
    extra_devices: list[int]


class StaleDevicesBody(ErrorBody):
    """410 of a send: the devices that registered again."""

    stale_devices: list[int]


class RateLimitedBody(ErrorBody):
    """429: seconds to wait, as in the ``Retry-After`` header."""

    retry_after: int


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    """A device of an account, as the server names it.

    Attributes:
        uuid: the account id (lower-case UUID text).
        device_id: the device, 1..127.
    """

    uuid: str
    device_id: int

    def __str__(self) -> str:
        return f"{self.uuid}.{self.device_id}"
