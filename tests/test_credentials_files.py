"""Credential files: byte-identical round trips of the published samples; media type guesses."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tigress_signal.credentials import (
    ACCESS_TOKEN_MEDIA_TYPE,
    MAX_PROVISIONING_CONTENT_BYTES,
    OCTET_STREAM_MEDIA_TYPE,
    PKPASS_MEDIA_TYPE,
    SD_JWT_VC_MEDIA_TYPE,
    VC_LD_JSON_MEDIA_TYPE,
    VC_MEDIA_TYPE,
    AccessTokenIssuer,
    Offer,
    ProvisioningInformation,
    TransferEnvelope,
    decode_transfer,
    encode_transfer,
    guess_media_type,
    provisioning_from_file,
    sample_credential_files,
    write_credential_file,
)
from tigress_signal.errors import CredentialError

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)

#: The published samples, their SHA-256 as recorded in samples/PROVENANCE.md, and their type.
SAMPLES = {
    "sd-jwt-vc-identity-credential.sd-jwt": (
        "fa6f93a283a9297bd21bb9f4bd455c04ef0b81a14182562f80d72c29becd6ea9",
        SD_JWT_VC_MEDIA_TYPE,
    ),
    "vcdm2-alumni-credential.json": (
        "69a9d616c01ea3e6e5ecf8a606f15c412ab1f8e6318e3193450555a1fdc09665",
        VC_MEDIA_TYPE,
    ),
}

# The example issuer key published with the SD-JWT drafts (public half only).
SD_JWT_EXAMPLE_ISSUER_X = "b28d4MwZMjw8-00CG4xfnn9SLMVMM19SlqZpVb_uNtQ"
SD_JWT_EXAMPLE_ISSUER_Y = "Xv5zWwuoaTgdS6hV43yI6gBwTnjukmFQQnJ_kCxzqk8"


def sample(name: str) -> Path:
    (path,) = [p for p in sample_credential_files() if p.name == name]
    return path


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def offer_and_receive(info: ProvisioningInformation) -> ProvisioningInformation:
    """Send ``info`` in a stateless offer through the wire form and return what arrives."""
    offer = Offer(
        share_id=uuid.uuid4(),
        flow="stateless",
        credential_format=info.media_type,
        title="A credential",
        expires_at=NOW + timedelta(days=1),
        provisioning=info,
    )
    envelope = TransferEnvelope(message_id=uuid.uuid4(), sent_at=NOW, body=offer)
    received = decode_transfer(encode_transfer(envelope)).body
    assert isinstance(received, Offer)
    assert received.provisioning is not None
    return received.provisioning


# -- the published samples ------------------------------------------------------------------


def test_samples_are_shipped_with_the_package() -> None:
    assert sorted(p.name for p in sample_credential_files()) == sorted(SAMPLES)
    provenance = sample_credential_files()[0].with_name("PROVENANCE.md").read_text()
    for name, (digest, _) in SAMPLES.items():
        assert name in provenance
        assert digest in provenance


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_bytes_are_as_published(name: str) -> None:
    digest, _ = SAMPLES[name]
    assert hashlib.sha256(sample(name).read_bytes()).hexdigest() == digest


def test_sd_jwt_sample_is_signed_by_the_published_example_issuer() -> None:
    sd_jwt = sample("sd-jwt-vc-identity-credential.sd-jwt").read_text("ascii")
    issuer_jwt, *disclosures, key_binding = sd_jwt.split("~")
    assert key_binding == ""
    header, payload, signature = issuer_jwt.split(".")
    assert json.loads(b64url(header))["typ"] == "dc+sd-jwt"

    # The issuer's ES256 signature (raw r || s) verifies against the published example key.
    issuer_key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64url(SD_JWT_EXAMPLE_ISSUER_X), "big"),
        int.from_bytes(b64url(SD_JWT_EXAMPLE_ISSUER_Y), "big"),
        ec.SECP256R1(),
    ).public_key()
    raw = b64url(signature)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    issuer_key.verify(der, f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))

    # Every disclosure is one of the digests the issuer signed, and none is missing.
    digests = {
        base64.urlsafe_b64encode(hashlib.sha256(d.encode()).digest()).rstrip(b"=").decode()
        for d in disclosures
    }
    assert digests == set(json.loads(b64url(payload))["_sd"])
    assert len(disclosures) == 9


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_round_trips_byte_identical(name: str, tmp_path: Path) -> None:
    original = sample(name).read_bytes()
    info = provisioning_from_file(sample(name))
    assert info.content == original
    assert info.filename == name
    assert info.media_type == SAMPLES[name][1]

    received = offer_and_receive(info)
    assert received == info
    written = write_credential_file(received, tmp_path)
    assert written == tmp_path / name
    assert written.read_bytes() == original


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_media_type_is_guessed_from_content_alone(name: str) -> None:
    assert guess_media_type(sample(name).read_bytes()) == SAMPLES[name][1]


# -- media type guessing ---------------------------------------------------------------------


def pkpass(names: tuple[str, ...] = ("pass.json", "manifest.json", "signature")) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"{}")
    return buffer.getvalue()


def test_guess_pkpass_from_content_and_extension() -> None:
    assert guess_media_type(pkpass()) == PKPASS_MEDIA_TYPE
    assert guess_media_type(pkpass(("other.txt",))) == OCTET_STREAM_MEDIA_TYPE
    assert guess_media_type(pkpass(("other.txt",)), "boarding.PKPASS") == PKPASS_MEDIA_TYPE
    assert guess_media_type(b"PK\x03\x04 not really a zip") == OCTET_STREAM_MEDIA_TYPE


def test_guess_w3c_vc_needs_the_vcdm2_context_first() -> None:
    vc = {"@context": ["https://www.w3.org/ns/credentials/v2"], "type": ["VerifiableCredential"]}
    assert guess_media_type(json.dumps(vc).encode()) == VC_MEDIA_TYPE
    other = {"@context": ["https://schema.org/"], "type": ["Thing"]}
    assert guess_media_type(json.dumps(other).encode()) == OCTET_STREAM_MEDIA_TYPE
    assert guess_media_type(json.dumps(other).encode(), "thing.vc") == VC_MEDIA_TYPE


def test_guess_sd_jwt_vc_by_header_type() -> None:
    sd_jwt = sample("sd-jwt-vc-identity-credential.sd-jwt").read_bytes()
    assert guess_media_type(sd_jwt + b"\n") == SD_JWT_VC_MEDIA_TYPE

    def with_typ(typ: str) -> bytes:
        header = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "typ": typ}).encode())
        return header.rstrip(b"=") + b".eyJ9.c2ln~WyJhIl0~"

    assert guess_media_type(with_typ("vc+sd-jwt")) == SD_JWT_VC_MEDIA_TYPE
    assert guess_media_type(with_typ("example+sd-jwt")) == OCTET_STREAM_MEDIA_TYPE
    assert guess_media_type(b"abc.def.ghi") == OCTET_STREAM_MEDIA_TYPE


def test_guess_access_token() -> None:
    issuer = AccessTokenIssuer.generate("Gym")
    token = issuer.issue("Dan", ["gym"], NOW, NOW + timedelta(days=30))
    assert guess_media_type(token, "gym.bin") == ACCESS_TOKEN_MEDIA_TYPE


@pytest.mark.parametrize(
    ("content", "filename"),
    [
        (bytes(range(256)), None),
        (b"plain text", "notes.txt"),
        (b"[1, 2, 3]", None),
        (b"{not json", None),
        (b"{" * 5000, None),
    ],
)
def test_guess_falls_back_to_octet_stream(content: bytes, filename: str | None) -> None:
    assert guess_media_type(content, filename) == OCTET_STREAM_MEDIA_TYPE


# -- reading and writing files ---------------------------------------------------------------


def test_given_media_type_wins_and_both_vc_names_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "credential.json"
    path.write_bytes(sample("vcdm2-alumni-credential.json").read_bytes())
    for media_type in (VC_LD_JSON_MEDIA_TYPE, VC_MEDIA_TYPE):
        info = provisioning_from_file(path, media_type=media_type)
        assert info.media_type == media_type
        assert offer_and_receive(info).content == path.read_bytes()


def test_invalid_media_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    path.write_bytes(b"x")
    with pytest.raises(CredentialError, match=r"media_type: .*not a media type"):
        provisioning_from_file(path, media_type="not a type")


def test_suggested_filename_can_be_replaced_and_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    path.write_bytes(b"x")
    assert provisioning_from_file(path, filename="key.bin").filename == "key.bin"
    with pytest.raises(CredentialError, match="path separator"):
        provisioning_from_file(path, filename="../key.bin")


def test_binary_content_round_trips_byte_identical(tmp_path: Path) -> None:
    original = b"\xef\xbb\xbf  " + bytes(range(256)) * 40 + b"\r\n\x00 trailing \n\r\n"
    path = tmp_path / "blob.dat"
    path.write_bytes(original)
    received = offer_and_receive(provisioning_from_file(path))
    out = tmp_path / "out"
    out.mkdir()
    assert write_credential_file(received, out).read_bytes() == original


def test_file_over_64_kib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (MAX_PROVISIONING_CONTENT_BYTES + 1))
    with pytest.raises(CredentialError, match="larger than 65536 bytes"):
        provisioning_from_file(path)
    path.write_bytes(b"x" * MAX_PROVISIONING_CONTENT_BYTES)
    assert len(provisioning_from_file(path).content) == MAX_PROVISIONING_CONTENT_BYTES


def test_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.vc"
    empty.write_bytes(b"")
    with pytest.raises(CredentialError, match="is empty"):
        provisioning_from_file(empty)
    with pytest.raises(CredentialError, match="cannot read credential file"):
        provisioning_from_file(tmp_path / "missing.vc")


def test_writing_never_overwrites(tmp_path: Path) -> None:
    info = ProvisioningInformation(media_type="application/vc", content=b"new", filename="a.vc")
    (tmp_path / "a.vc").write_bytes(b"old")
    with pytest.raises(CredentialError, match="already exists"):
        write_credential_file(info, tmp_path)
    assert (tmp_path / "a.vc").read_bytes() == b"old"


def test_unnamed_content_is_written_as_credential(tmp_path: Path) -> None:
    info = ProvisioningInformation(media_type="application/vc", content=b"{}")
    assert write_credential_file(info, tmp_path) == tmp_path / "credential"
