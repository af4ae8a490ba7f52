"""Transfer messages: each validation rule, and the envelope's wire form."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

import tigress_signal.credentials.messages as messages_module
from tigress_signal.credentials import (
    MAX_PROVISIONING_CONTENT_BYTES,
    MAX_TRANSFER_MESSAGE_BYTES,
    Accepted,
    Cancelled,
    Declined,
    DigitalKeyHolder,
    Endorsement,
    KeyImportRequest,
    KeyOwner,
    KeySigningRequest,
    Offer,
    ProvisioningInformation,
    Taken,
    TransferEnvelope,
    decode_transfer,
    encode_transfer,
)
from tigress_signal.errors import CredentialError, MalformedTransferMessage

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
SHARE = uuid.UUID("6f1d2c3b-4a59-4e8f-9a7b-1c2d3e4f5a6b")


def p256_der() -> bytes:
    return DigitalKeyHolder.generate().public_key_der


def provisioning(**changes: Any) -> ProvisioningInformation:
    fields: dict[str, Any] = {
        "media_type": "application/vc",
        "content": b'{"hello": "world"}',
        "filename": "hello.vc",
    }
    fields.update(changes)
    return ProvisioningInformation(**fields)


def offer(**changes: Any) -> Offer:
    fields: dict[str, Any] = {
        "share_id": SHARE,
        "flow": "stateless",
        "credential_format": "application/vc",
        "title": "Room 214, Hotel Example",
        "description": "Check-in from 15:00.\nBreakfast included.",
        "expires_at": NOW + timedelta(days=2),
        "provisioning": provisioning(),
    }
    fields.update(changes)
    return Offer(**fields)


def endorsement() -> Endorsement:
    holder = DigitalKeyHolder.generate()
    return KeyOwner.generate().endorse(
        holder.signing_request(SHARE),
        lock_id="front-door",
        rights=("unlock", "lock"),
        not_before=NOW,
        not_after=NOW + timedelta(days=7),
    )


def envelope(body: Any) -> TransferEnvelope:
    return TransferEnvelope(message_id=uuid.uuid4(), sent_at=NOW, body=body)


def rejection(excinfo: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(excinfo.value)


# -- Offer -------------------------------------------------------------------------------------


def test_stateless_offer_with_provisioning_is_valid() -> None:
    made = offer()
    assert made.type == "offer"
    assert made.provisioning is not None
    assert made.provisioning.content == b'{"hello": "world"}'


def test_stateful_offer_without_provisioning_is_valid() -> None:
    assert offer(flow="stateful", provisioning=None).provisioning is None


def test_stateless_offer_requires_provisioning() -> None:
    with pytest.raises(ValidationError, match="stateless offer must carry provisioning"):
        offer(provisioning=None)


def test_stateful_offer_forbids_provisioning() -> None:
    with pytest.raises(ValidationError, match="stateful offer must not carry provisioning"):
        offer(flow="stateful")


def test_offer_flow_must_be_known() -> None:
    with pytest.raises(ValidationError, match="flow"):
        offer(flow="oneshot")


def test_title_at_most_120_characters() -> None:
    assert offer(title="t" * 120).title == "t" * 120
    with pytest.raises(ValidationError, match=r"title\n.*at most 120 characters"):
        offer(title="t" * 121)


@pytest.mark.parametrize("title", ["", "   "])
def test_title_must_not_be_empty_or_blank(title: str) -> None:
    with pytest.raises(ValidationError, match="title"):
        offer(title=title)


def test_title_rejects_control_characters_and_newlines() -> None:
    with pytest.raises(ValidationError, match=r"control character U\+000A"):
        offer(title="two\nlines")
    with pytest.raises(ValidationError, match=r"control character U\+001B"):
        offer(title="\x1b[31mred")


def test_title_rejects_bidirectional_override() -> None:
    with pytest.raises(ValidationError, match=r"bidirectional formatting character U\+202E"):
        offer(title="invoice\u202efdp.exe")


def test_description_at_most_1000_characters_and_may_span_lines() -> None:
    assert offer(description="d\n" * 500).description == "d\n" * 500
    with pytest.raises(ValidationError, match=r"description\n.*at most 1000 characters"):
        offer(description="d" * 1001)
    with pytest.raises(ValidationError, match=r"control character U\+0007"):
        offer(description="bell\x07")


def test_expires_at_must_be_timezone_aware() -> None:
    with pytest.raises(ValidationError, match=r"expires_at\n.*timezone"):
        offer(expires_at=datetime(2030, 5, 3, 12, 0))


@pytest.mark.parametrize(
    "media_type",
    ["application", "application/", "/vc", "application/vc; charset=utf-8", "text/ plain", ""],
)
def test_credential_format_must_be_a_bare_media_type(media_type: str) -> None:
    with pytest.raises(ValidationError, match="not a media type"):
        offer(credential_format=media_type)


def test_offer_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError, match=r"extra_field\n.*Extra inputs are not permitted"):
        Offer.model_validate({**offer().model_dump(), "extra_field": 1})


def test_models_are_immutable() -> None:
    made = offer()
    with pytest.raises(ValidationError, match="frozen"):
        made.title = "changed"  # type: ignore[misc]


# -- ProvisioningInformation -----------------------------------------------------------------


def test_provisioning_content_bounds() -> None:
    assert len(provisioning(content=b"x" * MAX_PROVISIONING_CONTENT_BYTES).content) == 65536
    with pytest.raises(
        ValidationError, match=r"content\n.*is 65537 bytes, more than the maximum of 65536"
    ):
        provisioning(content=b"x" * (MAX_PROVISIONING_CONTENT_BYTES + 1))
    with pytest.raises(
        ValidationError, match=r"content\n.*is 0 bytes, fewer than the minimum of 1"
    ):
        provisioning(content=b"")


def test_provisioning_content_must_be_bytes_in_python() -> None:
    # From Python, text is not silently taken for base64 or UTF-8.
    with pytest.raises(ValidationError, match=r"content\n.*valid bytes"):
        provisioning(content="aGVsbG8=")


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("../../.bashrc", "path separator"),
        ("dir/file.vc", "path separator"),
        ("dir\\file.vc", "path separator"),
        ("..", "not a file name"),
        (".", "not a file name"),
        ("a\x00b", "control character"),
        ("", "at least 1 character"),
        ("f" * 256, "at most 255 characters"),
    ],
)
def test_provisioning_filename_must_be_a_safe_bare_name(filename: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        provisioning(filename=filename)


def test_provisioning_filename_is_optional() -> None:
    assert provisioning(filename=None).filename is None


# -- KeySigningRequest -------------------------------------------------------------------------


def ksr(**changes: Any) -> KeySigningRequest:
    fields: dict[str, Any] = {
        "share_id": SHARE,
        "public_key": p256_der(),
        "attestation": b"\x30" * 70,
        "nonce": b"n" * 32,
    }
    fields.update(changes)
    return KeySigningRequest(**fields)


def test_key_signing_request_nonce_is_16_to_64_bytes() -> None:
    assert ksr(nonce=b"n" * 16).nonce == b"n" * 16
    assert ksr(nonce=b"n" * 64).nonce == b"n" * 64
    with pytest.raises(
        ValidationError, match=r"nonce\n.*is 15 bytes, fewer than the minimum of 16"
    ):
        ksr(nonce=b"n" * 15)
    with pytest.raises(
        ValidationError, match=r"nonce\n.*is 65 bytes, more than the maximum of 64"
    ):
        ksr(nonce=b"n" * 65)


def test_key_signing_request_public_key_must_be_p256_spki() -> None:
    with pytest.raises(ValidationError, match="is 10 bytes; a DER P-256 public key is 91"):
        ksr(public_key=b"0123456789")
    with pytest.raises(ValidationError, match="not a DER SubjectPublicKeyInfo"):
        ksr(public_key=b"\x00" * 91)


def test_key_signing_request_rejects_other_curves() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = p384.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValidationError, match="a DER P-256 public key is 91"):
        ksr(public_key=der)


def test_key_signing_request_attestation_bounds() -> None:
    with pytest.raises(
        ValidationError, match=r"attestation\n.*is 0 bytes, fewer than the minimum of 1"
    ):
        ksr(attestation=b"")
    with pytest.raises(
        ValidationError, match=r"attestation\n.*is 8193 bytes, more than the maximum of 8192"
    ):
        ksr(attestation=b"a" * 8193)


# -- Endorsement and KeyImportRequest ----------------------------------------------------------


def test_key_import_request_share_must_match_endorsement() -> None:
    made = endorsement()
    assert KeyImportRequest(share_id=SHARE, endorsement=made).endorsement == made
    with pytest.raises(ValidationError, match="endorsement is for another share"):
        KeyImportRequest(share_id=uuid.uuid4(), endorsement=made)


def endorsement_fields(**changes: Any) -> dict[str, Any]:
    fields = endorsement().model_dump()
    fields.update(changes)
    return fields


def test_endorsement_rights_rules() -> None:
    with pytest.raises(ValidationError, match="rights lists 'unlock' more than once"):
        Endorsement(**endorsement_fields(rights=("unlock", "unlock")))
    with pytest.raises(ValidationError, match=r"rights\n.*at least 1 item"):
        Endorsement(**endorsement_fields(rights=()))
    with pytest.raises(ValidationError, match="a right is 1-32 characters"):
        Endorsement(**endorsement_fields(rights=("Unlock!",)))


def test_endorsement_validity_must_run_forwards() -> None:
    with pytest.raises(ValidationError, match="not_after must be later than not_before"):
        Endorsement(**endorsement_fields(not_before=NOW, not_after=NOW))


def test_endorsement_serial_and_lock_id_rules() -> None:
    with pytest.raises(ValidationError, match=r"serial\n.*greater than or equal to 1"):
        Endorsement(**endorsement_fields(serial=0))
    with pytest.raises(ValidationError, match="a lock id is 1-64 characters"):
        Endorsement(**endorsement_fields(lock_id="front door"))


# -- Accepted, Declined, Cancelled ------------------------------------------------------------


def test_answers_carry_the_share_id() -> None:
    assert Accepted(share_id=SHARE).type == "accepted"
    assert Declined(share_id=SHARE).reason is None
    assert Cancelled(share_id=SHARE, reason="changed my mind").reason == "changed my mind"


def test_declined_reason_at_most_200_characters() -> None:
    assert Declined(share_id=SHARE, reason="r" * 200).reason == "r" * 200
    with pytest.raises(ValidationError, match=r"reason\n.*at most 200 characters"):
        Declined(share_id=SHARE, reason="r" * 201)


def test_cancelled_reason_bounded_and_printable() -> None:
    with pytest.raises(ValidationError, match=r"reason\n.*at most 200 characters"):
        Cancelled(share_id=SHARE, reason="r" * 201)
    with pytest.raises(ValidationError, match="control character"):
        Cancelled(share_id=SHARE, reason="a\rb")


def test_taken_and_key_import_request_name_a_device_1_to_127() -> None:
    assert Taken(share_id=SHARE, device_id=127).device_id == 127
    for bad in (0, 128):
        with pytest.raises(ValidationError, match="device_id"):
            Taken(share_id=SHARE, device_id=bad)
        with pytest.raises(ValidationError, match="device_id"):
            KeyImportRequest(share_id=SHARE, endorsement=endorsement(), device_id=bad)
    with pytest.raises(ValidationError, match="device_id"):
        Taken(share_id=SHARE)  # type: ignore[call-arg]
    # A key import request from a sender that does not follow devices names none.
    assert KeyImportRequest(share_id=SHARE, endorsement=endorsement()).device_id is None


# -- the wire form ---------------------------------------------------------------------------


def all_messages() -> list[Any]:
    holder = DigitalKeyHolder.generate()
    return [
        offer(),
        offer(flow="stateful", provisioning=None),
        holder.signing_request(SHARE),
        KeyImportRequest(share_id=SHARE, endorsement=endorsement()),
        Accepted(share_id=SHARE),
        Declined(share_id=SHARE, reason="no thanks"),
        Cancelled(share_id=SHARE),
        KeyImportRequest(share_id=SHARE, endorsement=endorsement(), device_id=2),
        Taken(share_id=SHARE, device_id=3),
    ]


@pytest.mark.parametrize("body", all_messages(), ids=lambda m: f"{m.type}")
def test_every_message_round_trips(body: Any) -> None:
    sent = envelope(body)
    data = encode_transfer(sent)
    received = decode_transfer(data)
    assert received == sent
    assert received.body == body
    assert encode_transfer(received) == data


def test_encoding_is_compact_utf8_json_with_standard_base64() -> None:
    data = encode_transfer(envelope(offer(title="Zimmer 214 \u2013 Grüße")))
    document = json.loads(data.decode("utf-8"))
    compact = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    assert data == compact
    assert document["version"] == 1
    assert document["body"]["type"] == "offer"
    content = document["body"]["provisioning"]["content"]
    assert base64.b64decode(content, validate=True) == b'{"hello": "world"}'


def test_bytes_use_standard_alphabet_with_padding() -> None:
    data = encode_transfer(envelope(offer(provisioning=provisioning(content=b"\xfb\xff"))))
    assert b'"content":"+/8="' in data


def replace_in(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data, old
    return data.replace(old, new, 1)


@pytest.fixture
def offer_bytes() -> bytes:
    return encode_transfer(envelope(offer(provisioning=provisioning(content=b"\xfb\xff"))))


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        (b'"+/8"', "not standard base64 with padding"),
        (b'"-_8="', "not standard base64 with padding"),
        (b'"+/8=\\n"', "not standard base64 with padding"),
        (b'"+/9="', "not canonical base64"),
        (b"42", "valid bytes"),
    ],
)
def test_decode_rejects_bad_base64(offer_bytes: bytes, encoded: bytes, reason: str) -> None:
    bad = replace_in(offer_bytes, b'"+/8="', encoded)
    with pytest.raises(MalformedTransferMessage, match=r"provisioning.content: .*" + reason):
        decode_transfer(bad)


def test_decode_rejects_wrong_version(offer_bytes: bytes) -> None:
    bad = replace_in(offer_bytes, b'"version":1', b'"version":2')
    with pytest.raises(MalformedTransferMessage, match=r"format version 2; .* version 1 only"):
        decode_transfer(bad)


@pytest.mark.parametrize(
    ("version", "reason"),
    [(b"true", "version is not an integer"), (b'"1"', "version is not an integer")],
)
def test_decode_rejects_non_integer_version(
    offer_bytes: bytes, version: bytes, reason: str
) -> None:
    with pytest.raises(MalformedTransferMessage, match=reason):
        decode_transfer(replace_in(offer_bytes, b'"version":1', b'"version":' + version))


def test_decode_rejects_missing_version(offer_bytes: bytes) -> None:
    with pytest.raises(MalformedTransferMessage, match="has no version"):
        decode_transfer(replace_in(offer_bytes, b'"version":1,', b""))


def test_decode_rejects_unknown_message_type(offer_bytes: bytes) -> None:
    bad = replace_in(offer_bytes, b'"type":"offer"', b'"type":"gift"')
    with pytest.raises(MalformedTransferMessage, match="unknown transfer message type 'gift'"):
        decode_transfer(bad)


def test_decode_rejects_body_without_type(offer_bytes: bytes) -> None:
    with pytest.raises(MalformedTransferMessage, match="body has no type"):
        decode_transfer(replace_in(offer_bytes, b'"type":"offer",', b""))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"version": 1}', "no body object"),
        (b'{"version": 1, "body": []}', "no body object"),
        (b'{"version": 1, "version": 1}', "repeats the key 'version'"),
        (b'{"version": NaN}', "contains NaN"),
        (b'{"version": 1, "body": \xff}', "not UTF-8"),
        (b"[" * 50_000, "nests too deeply|not JSON"),
    ],
)
def test_decode_rejects_what_is_not_our_json(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedTransferMessage, match=reason):
        decode_transfer(data)


def test_decode_names_the_failed_field(offer_bytes: bytes) -> None:
    bad = replace_in(offer_bytes, b'"title":"Room 214, Hotel Example"', b'"title":""')
    with pytest.raises(MalformedTransferMessage, match=r"invalid offer message: body\..*title"):
        decode_transfer(bad)


def test_decode_rejects_extra_fields_in_envelope_and_body(offer_bytes: bytes) -> None:
    with pytest.raises(MalformedTransferMessage, match=r"extra.*Extra inputs are not permitted"):
        decode_transfer(replace_in(offer_bytes, b'"version":1,', b'"version":1,"extra":0,'))
    with pytest.raises(MalformedTransferMessage, match=r"gift.*Extra inputs are not permitted"):
        decode_transfer(replace_in(offer_bytes, b'"type":"offer",', b'"type":"offer","gift":0,'))


def test_decode_rejects_bad_uuid_and_naive_time(offer_bytes: bytes) -> None:
    document = json.loads(offer_bytes)
    document["body"]["share_id"] = "not-a-uuid"
    with pytest.raises(MalformedTransferMessage, match=r"share_id: .*UUID"):
        decode_transfer(json.dumps(document).encode())
    document = json.loads(offer_bytes)
    document["sent_at"] = "2030-05-01T12:00:00"
    with pytest.raises(MalformedTransferMessage, match=r"sent_at: .*timezone"):
        decode_transfer(json.dumps(document).encode())


def test_decode_does_not_echo_rejected_values(offer_bytes: bytes) -> None:
    secret = "SECRET-VALUE-" + "x" * 200
    bad = replace_in(
        offer_bytes, b'"title":"Room 214, Hotel Example"', f'"title":"{secret}"'.encode()
    )
    with pytest.raises(MalformedTransferMessage) as excinfo:
        decode_transfer(bad)
    assert "SECRET-VALUE" not in str(excinfo.value)
    assert "at most 120 characters" in str(excinfo.value)


def test_decode_rejects_oversize_before_parsing() -> None:
    limit = MAX_TRANSFER_MESSAGE_BYTES
    with pytest.raises(
        MalformedTransferMessage, match=rf"{limit + 1} bytes, over the {limit}-byte limit"
    ):
        decode_transfer(b" " * (limit + 1))


def test_offer_of_the_largest_content_fits_even_with_the_longest_fields() -> None:
    content = bytes(range(256)) * (MAX_PROVISIONING_CONTENT_BYTES // 256)
    longest = "\N{GRINNING FACE}"  # four bytes in UTF-8
    media_type = "a" * 127 + "/" + "b" * 127
    big = offer(
        title=longest * 120,
        description=longest * 1000,
        credential_format=media_type,
        provisioning=provisioning(content=content, media_type=media_type, filename=longest * 255),
    )
    data = encode_transfer(envelope(big))
    assert len(data) <= MAX_TRANSFER_MESSAGE_BYTES
    received = decode_transfer(data).body
    assert isinstance(received, Offer)
    assert received.provisioning is not None
    assert received.provisioning.content == content


def test_encode_refuses_an_offer_over_the_message_limit(monkeypatch) -> None:
    # Valid models always fit the real limit; a lower one shows the check is made.
    monkeypatch.setattr(messages_module, "MAX_TRANSFER_MESSAGE_BYTES", 60 * 1024)
    big = offer(provisioning=provisioning(content=b"x" * MAX_PROVISIONING_CONTENT_BYTES))
    with pytest.raises(CredentialError, match=r"offer message would be .* over the 61440-byte"):
        encode_transfer(envelope(big))


def test_decode_rejects_an_oversize_message_that_is_otherwise_valid(monkeypatch) -> None:
    monkeypatch.setattr(messages_module, "MAX_TRANSFER_MESSAGE_BYTES", 60 * 1024)
    content = b"x" * MAX_PROVISIONING_CONTENT_BYTES
    document = json.loads(encode_transfer(envelope(offer())))
    document["body"]["provisioning"]["content"] = base64.b64encode(content).decode()
    data = json.dumps(document, separators=(",", ":")).encode()
    assert len(data) > 60 * 1024
    with pytest.raises(MalformedTransferMessage, match="over the 61440-byte limit"):
        decode_transfer(data)
