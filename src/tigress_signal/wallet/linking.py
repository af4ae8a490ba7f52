"""Linking a new device to a wallet's account: the link request and the link answer.

All devices of an account share its identity key pair, as in Signal, and the intermediary must
never see the private half. So the new device and an existing one exchange two lines of text,
copied by the user, much like Signal's QR-code provisioning:

1. The new device makes an ephemeral P-256 key pair, keeps the private half in its (otherwise
   empty) wallet folder, and shows a **link request**: ``tslink1-req.`` followed by the
   unpadded base64url of the uncompressed public point (65 bytes).
2. The existing device gets a one-time link code from the intermediary and seals
   :class:`LinkSecrets` (server, account, identity key pair, code) to the request's key: a fresh
   ephemeral P-256 key, ECDH with the request's key, HKDF-SHA256 over the shared secret (the
   info binds both public keys), AES-256-GCM with a random nonce. The **link answer** is
   ``tslink1-ans.`` and the unpadded base64url of: the request's fingerprint (8 bytes), the
   ephemeral public point (65), the nonce (12) and the ciphertext with its tag. Fingerprint and
   ephemeral point are the additional authenticated data, so neither can be swapped.
3. The new device opens the answer with its private key and links itself
   (:meth:`tigress_signal.wallet.wallet.Wallet.finish_link`).

These are standard primitives from ``cryptography``; no Signal-protocol cryptography is done
here. The fingerprint lets the new device tell an answer made for another request from a
damaged one, and is shown on both devices so the user can check they match.

Warning:
    Whoever holds a link answer and the request's private key holds the account's identity key.
    The answer must be pasted only into the user's own new device, and a request must come from
    that device: an existing device cannot tell a request from an attacker's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tigress_signal.errors import InvalidLinkAnswer, InvalidLinkRequest, StoreError

#: What every link request and link answer starts with (format version 1).
REQUEST_PREFIX = "tslink1-req."
ANSWER_PREFIX = "tslink1-ans."

_POINT_BYTES = 65  # an uncompressed P-256 point
_FINGERPRINT_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = _FINGERPRINT_BYTES + _POINT_BYTES + _NONCE_BYTES
#: Far more than any answer needs (an identity key pair, a URL, a code); a longer one is refused
#: before any work is done on it.
_MAX_ANSWER_CHARS = 8192
_MAX_REQUEST_CHARS = 256
_HKDF_INFO = b"tigress-signal device link v1"
_TRUST_POLICIES = ("tofu", "always", "verify")


@dataclass(frozen=True, slots=True)
class LinkSecrets:
    """What an existing device hands a new one, sealed in the link answer.

    Attributes:
        server_url: the intermediary the account lives on.
        account_id: the account's id.
        identity_key_pair: the account's serialized libsignal identity key pair (a secret).
        identity_public_key: its public half.
        link_code: the intermediary's one-time link code (a secret until used).
        code_expires_at: when the code expires, in milliseconds since the epoch.
        trust_policy: the existing wallet's trust policy, which the new device takes over.
    """

    server_url: str
    account_id: str
    identity_key_pair: bytes
    identity_public_key: bytes
    link_code: str
    code_expires_at: int
    trust_policy: str

    def __repr__(self) -> str:
        # The default would print the identity key pair and the link code.
        return f"LinkSecrets(account_id={self.account_id!r}, server_url={self.server_url!r})"


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """A parsed link request.

    Attributes:
        public_key: the new device's ephemeral public key.
        fingerprint: the first 8 bytes of SHA-256 over the encoded point.
    """

    public_key: ec.EllipticCurvePublicKey
    fingerprint: bytes

    @property
    def check_code(self) -> str:
        """The fingerprint as a person compares it on both devices, e.g. ``3fa2-91c0-...``."""
        return format_check_code(self.fingerprint)


def make_link_request() -> tuple[str, bytes, str]:
    """A new ephemeral key pair and its link request.

    Returns:
        The request line, the private key (PKCS#8 PEM, to be kept until the link is finished),
        and the request's check code.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    point = _point(private_key.public_key())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return REQUEST_PREFIX + _b64url(point), pem, format_check_code(_fingerprint(point))


def request_of(private_key_pem: bytes) -> tuple[str, str]:
    """The link request line and check code for a kept private key (to show them again).

    Raises:
        StoreError: the kept key does not load (the waiting folder was damaged).
    """
    public = _load_private(private_key_pem).public_key()
    point = _point(public)
    return REQUEST_PREFIX + _b64url(point), format_check_code(_fingerprint(point))


def parse_link_request(text: str) -> LinkRequest:
    """Read a link request line.

    Raises:
        InvalidLinkRequest: the text is not a link request, is cut short, or is damaged.
    """
    line = text.strip()
    if line.startswith(ANSWER_PREFIX):
        raise InvalidLinkRequest(
            "this is a link answer, not a link request",
            hint="paste the answer into 'wallet link-finish' on the new device",
        )
    if not line.startswith(REQUEST_PREFIX):
        raise InvalidLinkRequest(f"not a link request (it starts with {REQUEST_PREFIX!r})")
    if len(line) > _MAX_REQUEST_CHARS:
        raise InvalidLinkRequest(
            f"the link request is longer than {_MAX_REQUEST_CHARS} characters"
        )
    point = _unb64url(line.removeprefix(REQUEST_PREFIX), InvalidLinkRequest, "link request")
    if len(point) != _POINT_BYTES:
        raise InvalidLinkRequest(
            f"the link request holds {len(point)} bytes instead of {_POINT_BYTES};"
            " it was cut short or changed"
        )
    try:
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise InvalidLinkRequest("the link request's key is not a P-256 point") from exc
    return LinkRequest(public_key, _fingerprint(point))


def seal_link_answer(request: LinkRequest, secrets: LinkSecrets) -> str:
    """Encrypt ``secrets`` so that only the holder of the request's private key can read them."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    ephemeral_point = _point(ephemeral.public_key())
    key = _answer_key(
        ephemeral.exchange(ec.ECDH(), request.public_key),
        _point(request.public_key),
        ephemeral_point,
    )
    nonce = os.urandom(_NONCE_BYTES)
    header = request.fingerprint + ephemeral_point + nonce
    plaintext = json.dumps(
        {
            "server_url": secrets.server_url,
            "account_id": secrets.account_id,
            "identity_key_pair": base64.b64encode(secrets.identity_key_pair).decode("ascii"),
            "identity_public_key": base64.b64encode(secrets.identity_public_key).decode("ascii"),
            "link_code": secrets.link_code,
            "code_expires_at": secrets.code_expires_at,
            "trust_policy": secrets.trust_policy,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    sealed = AESGCM(key).encrypt(nonce, plaintext, header)
    return ANSWER_PREFIX + _b64url(header + sealed)


def open_link_answer(text: str, private_key_pem: bytes) -> LinkSecrets:
    """Decrypt a link answer with the kept private key of the request it answers.

    Raises:
        InvalidLinkAnswer: the text is not a link answer, is cut short, was made for another
            request, or was changed on the way (the AES-GCM tag does not verify).
        StoreError: ``private_key_pem`` does not load (the waiting folder was damaged).
    """
    line = text.strip()
    if line.startswith(REQUEST_PREFIX):
        raise InvalidLinkAnswer(
            "this is a link request, not a link answer",
            hint="paste the request into 'wallet link' on the existing device",
        )
    if not line.startswith(ANSWER_PREFIX):
        raise InvalidLinkAnswer(f"not a link answer (it starts with {ANSWER_PREFIX!r})")
    if len(line) > _MAX_ANSWER_CHARS:
        raise InvalidLinkAnswer(f"the link answer is longer than {_MAX_ANSWER_CHARS} characters")
    data = _unb64url(line.removeprefix(ANSWER_PREFIX), InvalidLinkAnswer, "link answer")
    if len(data) < _HEADER_BYTES + _TAG_BYTES + 2:
        raise InvalidLinkAnswer(
            f"the link answer holds only {len(data)} bytes; it was cut short when copied",
            hint=_COPY_ANSWER_HINT,
        )
    private_key = _load_private(private_key_pem)
    own_point = _point(private_key.public_key())
    fingerprint = data[:_FINGERPRINT_BYTES]
    if fingerprint != _fingerprint(own_point):
        raise InvalidLinkAnswer(
            f"this link answer was made for another link request (check code"
            f" {format_check_code(fingerprint)}, this device's is"
            f" {format_check_code(_fingerprint(own_point))})",
            hint="answer this device's own request with 'wallet link' on the existing device",
        )
    ephemeral_point = data[_FINGERPRINT_BYTES : _FINGERPRINT_BYTES + _POINT_BYTES]
    nonce = data[_FINGERPRINT_BYTES + _POINT_BYTES : _HEADER_BYTES]
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral_point)
    except ValueError as exc:
        raise InvalidLinkAnswer(
            "the link answer is damaged (its key is not a P-256 point)"
        ) from exc
    key = _answer_key(private_key.exchange(ec.ECDH(), ephemeral), own_point, ephemeral_point)
    try:
        plaintext = AESGCM(key).decrypt(nonce, data[_HEADER_BYTES:], data[:_HEADER_BYTES])
    except InvalidTag as exc:
        raise InvalidLinkAnswer(
            "the link answer does not decrypt: it was cut short or changed on the way"
        ) from exc
    return _secrets_from(plaintext)


def format_check_code(fingerprint: bytes) -> str:
    """A fingerprint as four groups of four hex digits."""
    digits = fingerprint.hex()
    return "-".join(digits[i : i + 4] for i in range(0, len(digits), 4))


# -- helpers ----------------------------------------------------------------------------------


def _secrets_from(plaintext: bytes) -> LinkSecrets:
    # The tag verified, so this was written by a device holding a link code for the account;
    # the fields are still checked, so a buggy or older writer gets a clear refusal.
    try:
        document = json.loads(plaintext)
        if not isinstance(document, dict):
            raise TypeError("not an object")
        texts = {
            name: document[name]
            for name in ("server_url", "account_id", "link_code", "trust_policy")
        }
        if not all(isinstance(value, str) and value for value in texts.values()):
            raise TypeError("a text field is empty or not text")
        expires_at = document["code_expires_at"]
        if type(expires_at) is not int:
            raise TypeError("code_expires_at is not an integer")
        key_pair = base64.b64decode(document["identity_key_pair"], validate=True)
        public_key = base64.b64decode(document["identity_public_key"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidLinkAnswer(f"the link answer's contents are not understood ({exc})") from exc
    if texts["trust_policy"] not in _TRUST_POLICIES:
        raise InvalidLinkAnswer("the link answer names an unknown trust policy")
    return LinkSecrets(
        server_url=texts["server_url"],
        account_id=texts["account_id"],
        identity_key_pair=key_pair,
        identity_public_key=public_key,
        link_code=texts["link_code"],
        code_expires_at=expires_at,
        trust_policy=texts["trust_policy"],
    )


def _answer_key(shared: bytes, request_point: bytes, ephemeral_point: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_HKDF_INFO + request_point + ephemeral_point,
    ).derive(shared)


def _load_private(pem: bytes) -> ec.EllipticCurvePrivateKey:
    # The key was written by make_link_request; one that does not load means the waiting
    # folder's store was damaged, and no answer can be opened with it any more.
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise StoreError(
            "the link request key this folder kept is damaged", hint=_DAMAGED_KEY_HINT
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StoreError(
            "the link request key this folder kept is damaged (not a P-256 key)",
            hint=_DAMAGED_KEY_HINT,
        )
    return key


_DAMAGED_KEY_HINT = "start again with 'wallet link-request' in a new folder"


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _fingerprint(point: bytes) -> bytes:
    return hashlib.sha256(point).digest()[:_FINGERPRINT_BYTES]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(
    text: str, error: type[InvalidLinkRequest] | type[InvalidLinkAnswer], what: str
) -> bytes:
    # A copying mistake needs the same line copied again, not a new request or answer; the
    # request's own hint already says so, the answer's asks for a new answer, so it is replaced.
    hint = _COPY_ANSWER_HINT if error is InvalidLinkAnswer else None
    if not text:
        raise error(f"the {what} has nothing after its prefix: it was cut short", hint=hint)
    if any(c not in _B64URL_ALPHABET for c in text):
        raise error(f"the {what} holds characters that are not base64url", hint=hint)
    if len(text) % 4 == 1:
        # No base64 text has this length: characters were lost when it was copied.
        raise error(f"the {what} was cut short when copied", hint=hint)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise error(f"the {what} is not base64url text", hint=hint) from exc


_COPY_ANSWER_HINT = "copy the whole line 'wallet link' printed on the existing device"


_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
