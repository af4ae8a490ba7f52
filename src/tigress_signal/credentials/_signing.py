"""P-256 ECDSA-SHA256 signatures over canonical, domain-separated signing inputs.

Every signature in the credentials package is made over bytes built by :func:`signing_input`:
a fixed prefix, a label naming what is signed and its version, then each field as a 4-byte
big-endian length followed by the field's bytes. Two different statements therefore never share
a signing input, and a signature made for one purpose (say, a key signing request) cannot be
replayed as another (an endorsement or an unlock response).

Public keys travel as DER SubjectPublicKeyInfo; only P-256 keys in their canonical (uncompressed)
encoding are accepted, so one key has exactly one byte form and comparing bytes compares keys.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: Public keys are given either as a key object or as DER SubjectPublicKeyInfo bytes.
PublicKeyLike = ec.EllipticCurvePublicKey | bytes

#: The length of a DER SubjectPublicKeyInfo of an uncompressed P-256 key.
P256_SPKI_LENGTH = 91

_PREFIX = b"tigress-signal\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


def signing_input(label: str, *fields: bytes) -> bytes:
    """The bytes to sign for one statement: prefix, label, then length-prefixed fields."""
    out = bytearray(_PREFIX)
    out += label.encode("ascii") + b"\x00"
    for field in fields:
        out += len(field).to_bytes(4, "big")
        out += field
    return bytes(out)


def text_field(value: str) -> bytes:
    """A text field of a signing input (UTF-8)."""
    return value.encode("utf-8")


def int_field(value: int) -> bytes:
    """An integer field of a signing input (8 bytes, big-endian, signed)."""
    return value.to_bytes(8, "big", signed=True)


def time_field(value: datetime) -> bytes:
    """An instant as a signing-input field: microseconds since the Unix epoch.

    Two aware datetimes that name the same instant in different time zones give the same bytes.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a signed time must be timezone-aware")
    return int_field((value - _EPOCH) // _ONE_MICROSECOND)


def list_field(items: tuple[str, ...]) -> bytes:
    """A list of text items as one field: each item length-prefixed, in the given order."""
    return b"".join(len(b).to_bytes(4, "big") + b for b in (text_field(i) for i in items))


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 signature over ``data``, DER-encoded."""
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid ECDSA-SHA256 signature over ``data``."""
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a DER SubjectPublicKeyInfo that must hold a P-256 key in canonical form.

    Raises:
        ValueError: the bytes are not such a key; the message says why.
    """
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a DER SubjectPublicKeyInfo public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key (P-256 is required)")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"public key is on curve {key.curve.name}, P-256 is required")
    if public_key_der(key) != der:
        raise ValueError("public key is not in canonical DER form (uncompressed point)")
    return key


def coerce_public_key(key: PublicKeyLike) -> ec.EllipticCurvePublicKey:
    """A P-256 public key object from a key object or DER SubjectPublicKeyInfo bytes.

    Raises:
        ValueError: bytes that are not a canonical P-256 key, or a key on another curve.
    """
    if isinstance(key, bytes):
        return load_public_key(key)
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"public key is on curve {key.curve.name}, P-256 is required")
    return key


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """A short public name for a key: the first 8 bytes of SHA-256 of its DER, in hex."""
    return hashlib.sha256(public_key_der(key)).digest()[:8].hex()


def private_key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """PEM PKCS#8 of a private key, encrypted with ``password`` when one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key_pem(pem: bytes, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Parse a PEM private key that must be a P-256 key.

    Raises:
        ValueError: not a PEM private key, wrong password, or not P-256.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            "not a readable PEM private key (damaged, or the password is wrong or missing)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("private key is not a P-256 key")
    return key
