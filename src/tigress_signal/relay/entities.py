"""The JSON bodies of the relay API (draft-vinokurov-tigress-http-00), for server and client.

Field names on the wire are the draft's (``displayInformation``, ``imageURL``,
``isPushNotificationSupported``); in Python they are snake_case. The payload's ``data`` is
standard base64 of IV (12 bytes), ciphertext and tag (16 bytes); the relay never sees the key.
Validation is strict: an unknown field, a wrong type or bad base64 is refused with a 422 that
names the field, and never echoes the value.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
)
from pydantic.alias_generators import to_camel

#: The AEAD names of RFC 5116 the drafts allow; both must be implemented.
PayloadType = Literal["AEAD_AES_128_GCM", "AEAD_AES_256_GCM"]
#: AES-GCM's nonce and tag sizes; a payload is at least their sum.
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
#: The rights a recipient may be given: read, write (update), delete.
ACCESS_RIGHT_LETTERS = frozenset("RWD")
DEFAULT_ACCESS_RIGHTS = "RD"

#: The API's headers.
REQUEST_ID_HEADER = "Mailbox-Request-ID"
DEVICE_CLAIM_HEADER = "Mailbox-Device-Claim"
ATTESTATION_HEADER = "Mailbox-Device-Attestation"
#: Our addition, in place of push notifications: the payload version a reader already has,
#: and the version an answer carries (see :mod:`tigress_signal.relay.mailboxes`).
KNOWN_VERSION_HEADER = "Mailbox-Known-Version"
VERSION_HEADER = "Mailbox-Version"


def _decode_base64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value  # built in Python, not read from JSON
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (standard alphabet, with padding)") from None


def _ciphertext(value: bytes) -> bytes:
    if len(value) < GCM_NONCE_SIZE + GCM_TAG_SIZE:
        raise ValueError("is shorter than an AES-GCM nonce and tag")
    return value


def _rfc3339_utc(value: object) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string")
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ValueError("must be an RFC 3339 UTC date-time like 2024-01-31T12:00:00Z") from None
    return parsed.replace(tzinfo=UTC)


def format_expiration(moment: datetime) -> str:
    """An expiration as the drafts write it: ``YYYY-MM-DDThh:mm:ssZ`` in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _access_rights(value: str) -> str:
    if not set(value) <= ACCESS_RIGHT_LETTERS or len(set(value)) != len(value):
        raise ValueError("must be made of the letters R, W and D, each at most once")
    return value


Ciphertext = Annotated[
    bytes,
    PlainValidator(_decode_base64),
    AfterValidator(_ciphertext),
    PlainSerializer(lambda v: base64.b64encode(v).decode("ascii"), return_type=str),
]
Expiration = Annotated[
    datetime,
    PlainValidator(_rfc3339_utc),
    PlainSerializer(format_expiration, return_type=str),
]


class WireModel(BaseModel):
    """A JSON body: camelCase on the wire, strict, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )

    def to_json(self) -> bytes:
        """The body as compact JSON with the wire names."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")


class Payload(WireModel):
    """Encrypted content: ``type`` names the AEAD, ``data`` is IV || ciphertext || tag."""

    type: PayloadType
    data: Ciphertext


class DisplayInformation(WireModel):
    """What a messaging app shows before the link is opened; public, never encrypted."""

    title: str
    description: str
    image_url: Annotated[str, Field(alias="imageURL")]


class NotificationToken(WireModel):
    """A push token of one party's device (accepted, never stored: this relay has no push)."""

    type: Annotated[str, Field(min_length=1, max_length=128)]
    token_data: Annotated[str, Field(min_length=1, max_length=4096)]


class MailboxConfiguration(WireModel):
    """The creator's wishes for the mailbox."""

    access_rights: Annotated[str, AfterValidator(_access_rights)] = DEFAULT_ACCESS_RIGHTS
    expiration: Expiration


class CreateMailboxRequest(WireModel):
    """``POST /v1/m``."""

    payload: Payload
    display_information: DisplayInformation
    notification_token: NotificationToken | None = None
    mailbox_configuration: MailboxConfiguration | None = None


class UpdateMailboxRequest(WireModel):
    """``PUT /v1/m/{id}``: replaces the stored payload."""

    payload: Payload
    notification_token: NotificationToken | None = None


class CreateMailboxResponse(WireModel):
    """The answer to a create: the link without its fragment."""

    url_link: str
    is_push_notification_supported: bool


class UpdateMailboxResponse(WireModel):
    """The answer to an update."""

    is_push_notification_supported: bool


class ReadMailboxResponse(WireModel):
    """``POST /v1/m/{id}``: the current payload, the display information and the expiry."""

    display_information: DisplayInformation
    payload: Payload
    expiration: Expiration
