"""Device passwords: made once, stored salted and hashed, checked on every request.

A device password is 24 random bytes (192 bits) in URL-safe base64, shown to the device once
when its account is created. The database keeps only ``scrypt$<log2 N>$<r>$<p>$<salt>$<hash>``
with a fresh 16-byte salt per password, so a copy of the database does not let anyone act as a
device.

Checking scrypt costs tens of milliseconds and 16 MiB of memory, far too much for every
request of a device that polls or sends often. :class:`Authenticator` therefore remembers the
passwords it has verified, as ``HMAC-SHA256(process key, stored hash || password)``:

* the process key is random and lives only in memory, so the remembered values are useless
  outside this process (unlike a plain fast hash, they cannot be checked against guesses);
* the stored hash is part of the input, so a new password (a new stored hash) never matches
  an entry made for the old one, in this process or after another process changed it;
* only successes are remembered; a wrong password always costs a full scrypt, which keeps
  guessing slow, and at most ``kdf_concurrency`` scrypt runs happen at once (in threads, so
  the event loop keeps serving) to bound what a flood of bad passwords can take.

A fast hash of the password alone would be safe to store, since 192 random bits cannot be
guessed; the slow hash is defence in depth should a password ever be chosen by a person.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from collections import OrderedDict

from tigress_signal.intermediary.api import ApiError, parse_uuid
from tigress_signal.intermediary.entities import MAX_DEVICE_ID, DeviceAddress
from tigress_signal.storage import Database

logger = logging.getLogger(__name__)

#: scrypt cost: N = 2**14, r = 8, p = 1 (16 MiB, about 50 ms on one core).
_SCRYPT_LOG2_N = 14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_PASSWORD_BYTES = 24
#: Longer "passwords" are refused before hashing; ours are 32 characters.
_MAX_PASSWORD_LENGTH = 256
_REALM = 'Basic realm="tigress-signal"'


def new_password() -> str:
    """A fresh device password: 192 random bits, URL-safe base64 without padding."""
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def hash_password(password: str) -> str:
    """The salted scrypt hash of a password, in the form the database stores."""
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(password, salt, log2_n=_SCRYPT_LOG2_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return "$".join(
        (
            "scrypt",
            str(_SCRYPT_LOG2_N),
            str(_SCRYPT_R),
            str(_SCRYPT_P),
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        )
    )


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a stored hash (constant-time comparison).

    A stored value this module cannot read never matches.
    """
    try:
        scheme, log2_n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        actual = _scrypt(
            password, salt, log2_n=int(log2_n), r=int(r), p=int(p), size=len(expected)
        )
    except (ValueError, binascii.Error):
        logger.warning("a stored password hash is not in a known format")
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(
    password: str, salt: bytes, *, log2_n: int, r: int, p: int, size: int = _HASH_BYTES
) -> bytes:
    if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and 16 <= size <= 64):
        raise ValueError("scrypt parameters out of range")
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=2**log2_n,
        r=r,
        p=p,
        maxmem=256 * 1024 * 1024,
        dklen=size,
    )


class Authenticator:
    """Checks HTTP Basic credentials of devices, remembering passwords it has verified.

    Args:
        db: the intermediary's database (table ``devices``).
        cache_size: how many verified passwords to remember (0 remembers none).
        kdf_concurrency: how many scrypt computations may run at once.
    """

    def __init__(
        self, db: Database, *, cache_size: int = 10_000, kdf_concurrency: int = 2
    ) -> None:
        self._db = db
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_key = secrets.token_bytes(32)
        self._kdf_slots = asyncio.Semaphore(kdf_concurrency)

    async def authenticate(self, authorization: str | None) -> DeviceAddress:
        """The device an ``Authorization`` header proves to be.

        Args:
            authorization: the header's value, or None when it is missing.

        Returns:
            The authenticated device.

        Raises:
            ApiError: 401 for a missing or malformed header, an unknown account or device,
                or a wrong password.
        """
        device, password = _parse_basic(authorization)
        stored = await self._db.fetchval(
            "SELECT password_hash FROM devices WHERE account_uuid = $1 AND device_id = $2",
            device.uuid,
            device.device_id,
        )
        # No dummy hash for unknown accounts: account ids are random and are handed to
        # peers anyway, so hiding whether one exists would protect nothing.
        if not isinstance(stored, str):
            raise _unauthorized("wrong account, device or password")
        token = self._cache_token(stored, password)
        if token in self._cache:
            self._cache.move_to_end(token)
            return device
        async with self._kdf_slots:
            valid = await asyncio.to_thread(verify_password, password, stored)
        if not valid:
            raise _unauthorized("wrong account, device or password")
        self._remember_token(token)
        return device

    async def hash_new_password(self, password: str) -> str:
        """:func:`hash_password` in a worker thread, sharing the limit on concurrent hashes.

        Account creation needs no credentials, so without the shared limit a flood of
        creations could take every core.
        """
        async with self._kdf_slots:
            return await asyncio.to_thread(hash_password, password)

    def remember(self, stored: str, password: str) -> None:
        """Record a password as verified without hashing it (the server just made it)."""
        self._remember_token(self._cache_token(stored, password))

    def _cache_token(self, stored: str, password: str) -> bytes:
        message = stored.encode("utf-8") + b"\x00" + password.encode("utf-8")
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def _remember_token(self, token: bytes) -> None:
        if self._cache_size <= 0:
            return
        self._cache[token] = None
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _parse_basic(authorization: str | None) -> tuple[DeviceAddress, str]:
    """Split ``Basic base64(<uuid>[.<device>]:<password>)``; bare ``<uuid>`` is device 1."""
    if authorization is None:
        raise _unauthorized("credentials are required")
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise _unauthorized("use HTTP Basic authentication")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _unauthorized("the Basic credentials are not base64 of UTF-8 text") from None
    user, colon, password = decoded.partition(":")
    if not colon or not password or len(password) > _MAX_PASSWORD_LENGTH:
        raise _unauthorized("the Basic credentials have no usable password")
    account, dot, device_text = user.partition(".")
    device_id = 1
    if dot:
        if not (device_text.isascii() and device_text.isdigit()) or len(device_text) > 3:
            raise _unauthorized("the device id in the user name is not a number")
        device_id = int(device_text)
    if not 1 <= device_id <= MAX_DEVICE_ID:
        raise _unauthorized(f"the device id must be 1..{MAX_DEVICE_ID}")
    try:
        uuid = parse_uuid(account)
    except ApiError:
        raise _unauthorized("the user name is not <account uuid>.<device id>") from None
    return DeviceAddress(uuid, device_id), password


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": _REALM})
