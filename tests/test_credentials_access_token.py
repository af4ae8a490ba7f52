"""The stateless access token: issue, verify, and every way a token is refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tigress_signal.credentials import (
    ACCESS_TOKEN_MEDIA_TYPE,
    AccessTokenIssuer,
    guess_media_type,
    verify_access_token,
)
from tigress_signal.errors import CredentialError

CHECK_IN = datetime(2030, 6, 1, 15, 0, tzinfo=UTC)
CHECK_OUT = datetime(2030, 6, 4, 11, 0, tzinfo=UTC)
DURING = datetime(2030, 6, 2, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def hotel() -> AccessTokenIssuer:
    return AccessTokenIssuer.generate("Hotel Example, Berlin")


@pytest.fixture
def token(hotel: AccessTokenIssuer) -> bytes:
    return hotel.issue("Alice Guest", ["room:214", "spa"], CHECK_IN, CHECK_OUT)


def edited(content: bytes, change: Any) -> bytes:
    document = json.loads(content)
    change(document)
    return json.dumps(document).encode()


def test_issued_token_verifies(hotel: AccessTokenIssuer, token: bytes) -> None:
    verified = verify_access_token(token, hotel.public_key, now=DURING)
    assert verified.issuer == "Hotel Example, Berlin"
    assert verified.subject == "Alice Guest"
    assert verified.scope == ("room:214", "spa")
    assert verified.not_before == CHECK_IN
    assert verified.not_after == CHECK_OUT
    assert len(verified.token_id) == 32
    assert verified.is_valid_at(DURING)
    assert not verified.is_valid_at(CHECK_OUT)


def test_issuer_key_may_be_given_as_der(hotel: AccessTokenIssuer, token: bytes) -> None:
    assert verify_access_token(token, hotel.public_key_der, now=DURING).subject == "Alice Guest"


def test_tokens_are_unique(hotel: AccessTokenIssuer) -> None:
    ids = {
        verify_access_token(
            hotel.issue("Bob", ["room:1"], CHECK_IN, CHECK_OUT), hotel.public_key, now=DURING
        ).token_id
        for _ in range(10)
    }
    assert len(ids) == 10


def test_token_content_is_compact_json_of_its_media_type(token: bytes) -> None:
    document = json.loads(token)
    assert document["format"] == "tigress-signal-access-token/v1"
    assert set(document) == {"format", "token", "signature"}
    assert guess_media_type(token) == ACCESS_TOKEN_MEDIA_TYPE
    assert b"\n" not in token


def test_reformatted_json_still_verifies(hotel: AccessTokenIssuer, token: bytes) -> None:
    # The signature covers the fields, not the JSON text.
    pretty = json.dumps(json.loads(token), indent=4, sort_keys=True).encode()
    assert verify_access_token(pretty, hotel.public_key, now=DURING).subject == "Alice Guest"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Mallory"),
        ("scope", ["room:214", "spa", "penthouse"]),
        ("not_after", "2031-01-01T00:00:00Z"),
        ("not_before", "2030-06-01T14:00:00Z"),
        ("issuer", "Hotel Example, Munich"),
        ("token_id", "0" * 32),
    ],
)
def test_tampered_token_fails(
    hotel: AccessTokenIssuer, token: bytes, field: str, value: object
) -> None:
    tampered = edited(token, lambda d: d["token"].__setitem__(field, value))
    with pytest.raises(CredentialError, match=r"does not verify \(altered after issue"):
        verify_access_token(tampered, hotel.public_key, now=DURING)


def test_tampered_signature_fails(hotel: AccessTokenIssuer, token: bytes) -> None:
    def flip(document: dict[str, Any]) -> None:
        signature = bytearray(base64.b64decode(document["signature"]))
        signature[-1] ^= 0x01
        document["signature"] = base64.b64encode(bytes(signature)).decode()

    with pytest.raises(CredentialError, match="does not verify"):
        verify_access_token(edited(token, flip), hotel.public_key, now=DURING)


def test_token_of_another_issuer_fails(hotel: AccessTokenIssuer, token: bytes) -> None:
    rival = AccessTokenIssuer.generate("Hotel Example, Berlin")
    with pytest.raises(CredentialError, match=r"signed by issuer key [0-9a-f]{16}, not by"):
        verify_access_token(token, rival.public_key, now=DURING)


def test_forger_cannot_borrow_the_issuers_key_id(hotel: AccessTokenIssuer) -> None:
    forger = AccessTokenIssuer.generate("Hotel Example, Berlin")
    forged = forger.issue("Mallory", ["room:214"], CHECK_IN, CHECK_OUT)
    real_key_id = json.loads(hotel.issue("x", ["y"], CHECK_IN, CHECK_OUT))["token"]["key_id"]
    relabelled = edited(forged, lambda d: d["token"].__setitem__("key_id", real_key_id))
    with pytest.raises(CredentialError, match="does not verify"):
        verify_access_token(relabelled, hotel.public_key, now=DURING)


def test_token_not_yet_valid_fails(hotel: AccessTokenIssuer, token: bytes) -> None:
    with pytest.raises(CredentialError, match="not valid before 2030-06-01T15:00"):
        verify_access_token(token, hotel.public_key, now=CHECK_IN - timedelta(seconds=1))


def test_expired_token_fails(hotel: AccessTokenIssuer, token: bytes) -> None:
    with pytest.raises(CredentialError, match="expired at 2030-06-04T11:00"):
        verify_access_token(token, hotel.public_key, now=CHECK_OUT)


def test_validity_window_can_be_skipped(hotel: AccessTokenIssuer, token: bytes) -> None:
    verified = verify_access_token(token, hotel.public_key, check_time=False)
    assert verified.not_before == CHECK_IN


def test_default_time_is_now(hotel: AccessTokenIssuer) -> None:
    now = datetime.now(UTC)
    current = hotel.issue("Carol", ["gym"], now - timedelta(hours=1), now + timedelta(hours=1))
    assert verify_access_token(current, hotel.public_key).subject == "Carol"
    with pytest.raises(CredentialError, match="not valid before"):
        verify_access_token(
            hotel.issue("Carol", ["gym"], now + timedelta(hours=1), now + timedelta(hours=2)),
            hotel.public_key,
        )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json", "not a valid access token"),
        (b"{}", "format: Field required"),
        (b'{"format": "jwt", "token": {}, "signature": ""}', "format: Input should be"),
        (b"x" * 70_000, "implausibly large"),
    ],
)
def test_malformed_content_fails(hotel: AccessTokenIssuer, content: bytes, reason: str) -> None:
    with pytest.raises(CredentialError, match=reason):
        verify_access_token(content, hotel.public_key, now=DURING)


def test_extra_fields_are_refused(hotel: AccessTokenIssuer, token: bytes) -> None:
    padded = edited(token, lambda d: d["token"].__setitem__("admin", True))
    with pytest.raises(CredentialError, match=r"token\.admin: Extra inputs are not permitted"):
        verify_access_token(padded, hotel.public_key, now=DURING)


@pytest.mark.parametrize(
    ("subject", "scope", "not_before", "not_after", "reason"),
    [
        ("Alice", [], CHECK_IN, CHECK_OUT, "scope"),
        ("Alice", ["spa", "spa"], CHECK_IN, CHECK_OUT, "scope lists an item more than once"),
        ("Alice", ["room 214"], CHECK_IN, CHECK_OUT, "a scope item is letters"),
        ("Alice", ["spa"], CHECK_OUT, CHECK_IN, "not_after must be later"),
        ("", ["spa"], CHECK_IN, CHECK_OUT, "subject"),
        ("Alice\u202e", ["spa"], CHECK_IN, CHECK_OUT, "bidirectional"),
        ("Alice", ["spa"], datetime(2030, 6, 1), CHECK_OUT, "timezone"),  # naive on purpose
    ],
)
def test_issuer_refuses_invalid_tokens(
    hotel: AccessTokenIssuer,
    subject: str,
    scope: list[str],
    not_before: datetime,
    not_after: datetime,
    reason: str,
) -> None:
    with pytest.raises(CredentialError, match=reason):
        hotel.issue(subject, scope, not_before, not_after)


def test_unusable_issuer_key_is_refused(token: bytes) -> None:
    with pytest.raises(CredentialError, match="unusable issuer public key"):
        verify_access_token(token, b"not a key", now=DURING)


def test_issuer_key_survives_storage_as_pem(hotel: AccessTokenIssuer, token: bytes) -> None:
    restored = AccessTokenIssuer.from_private_key_pem(hotel.issuer, hotel.private_key_pem())
    assert restored.public_key_der == hotel.public_key_der
    again = restored.issue("Alice Guest", ["room:214"], CHECK_IN, CHECK_OUT)
    assert verify_access_token(again, hotel.public_key, now=DURING).issuer == hotel.issuer
    with pytest.raises(CredentialError, match="cannot load the access token issuer key"):
        AccessTokenIssuer.from_private_key_pem("x", b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
