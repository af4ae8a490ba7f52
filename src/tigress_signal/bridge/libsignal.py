"""Async Python client of the libsignal sidecar (``bridge/sidecar.mjs``).

:class:`LibsignalBridge` starts the Node.js sidecar, speaks its newline-delimited JSON protocol
(``docs/architecture.md``, "Sidecar protocol") and turns answers into frozen dataclasses and
errors into the classes of :mod:`tigress_signal.errors`. Calls for one peer run one at a time;
calls for different peers are in flight together and matched to their answers by id. When the
sidecar needs a record it does not hold it asks; the bridge answers from its
:class:`~tigress_signal.bridge.records.RecordSource`.

If the sidecar dies, calls in flight fail with :class:`~tigress_signal.errors.BridgeUnavailable`
and the next call starts a new sidecar, sends ``open`` again and lets the sidecar rebuild its
cache through ``load`` requests. Nothing is lost: the durable copy of every record lives in the
wallet, and a call whose answer never arrived changed nothing there.

Example::

    async with LibsignalBridge(wallet_store) as bridge:
        await bridge.open(identity_key_pair, registration_id, ProtocolAddress(my_id, 1))
        result = await bridge.encrypt(ProtocolAddress(peer_id, 1), payload)
        wallet_store.apply_changes(conn, result.changes)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import enum
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tigress_signal.bridge.records import (
    RECORD_KINDS,
    IdentityChanged,
    RecordChange,
    RecordKind,
    RecordSource,
)
from tigress_signal.errors import (
    BridgeError,
    BridgeProtocolError,
    BridgeUnavailable,
    DuplicateMessage,
    InvalidMessage,
    InvalidSignature,
    NoSession,
    SignalProtocolError,
    UnknownPreKey,
    UntrustedIdentity,
)

logger = logging.getLogger(__name__)

#: Environment variable naming the sidecar script, instead of ``bridge/sidecar.mjs`` in the repo.
SIDECAR_ENV = "TIGRESS_SIGNAL_SIDECAR"
#: Environment variable naming the Node.js executable, instead of ``node`` on the PATH.
NODE_ENV = "TIGRESS_SIGNAL_NODE"

TrustPolicy = Literal["tofu", "always", "verify"]

_SETUP_HINT = "run make setup"
# One line can carry a batch of Kyber prekeys (about 8 KB each in base64).
_LINE_LIMIT = 64 * 1024 * 1024
_STDERR_KEPT = 20
# Above this many bytes waiting for the sidecar, a caller waits for the pipe to drain.
_WRITE_BUFFER_HIGH = 1024 * 1024
# Bytes asked for per read of the sidecar's output (a pipe holds 64 KiB by default).
_READ_SIZE = 256 * 1024


class MessageType(enum.IntEnum):
    """libsignal's ciphertext message types that carry a one-to-one message."""

    WHISPER = 2
    """A message on an established session (envelope type 1 on the intermediary)."""
    PREKEY = 3
    """A first message that also sets up the session at the receiver (envelope type 3)."""


@dataclass(frozen=True, slots=True)
class ProtocolAddress:
    """A peer's device as libsignal addresses it.

    Attributes:
        name: the peer's account id (a UUID string).
        device_id: the device number, 1..127.
    """

    name: str
    device_id: int = 1

    def to_json(self) -> dict[str, Any]:
        """The protocol's ``{"name", "deviceId"}`` form."""
        return {"name": self.name, "deviceId": self.device_id}


@dataclass(frozen=True, slots=True)
class BridgeHealth:
    """What ``ping`` reports about a running sidecar.

    Attributes:
        libsignal_version: the version of ``@signalapp/libsignal-client`` it loaded.
        pid: the sidecar's process id.
    """

    libsignal_version: str
    pid: int


@dataclass(frozen=True, slots=True)
class GeneratedIdentity:
    """A new identity key pair and registration id.

    Attributes:
        identity_key_pair: serialized ``IdentityKeyPair`` (a secret: store it, never log it).
        public_key: the identity public key (33 bytes), as uploaded to the server.
        registration_id: this install's registration id, 1..16383.
    """

    identity_key_pair: bytes = field(repr=False)
    public_key: bytes
    registration_id: int


@dataclass(frozen=True, slots=True)
class BundlePreKey:
    """The public half of a one-time EC prekey, as a bundle carries it."""

    key_id: int
    public_key: bytes

    def to_json(self) -> dict[str, Any]:
        """The protocol's ``{"keyId", "publicKey"}`` form."""
        return {"keyId": self.key_id, "publicKey": _b64(self.public_key)}


@dataclass(frozen=True, slots=True)
class BundleSignedPreKey:
    """The public half of a signed EC prekey or a Kyber prekey, with its signature."""

    key_id: int
    public_key: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The protocol's ``{"keyId", "publicKey", "signature"}`` form."""
        return {
            "keyId": self.key_id,
            "publicKey": _b64(self.public_key),
            "signature": _b64(self.signature),
        }


@dataclass(frozen=True, slots=True)
class PreKey:
    """A new one-time EC prekey.

    Attributes:
        key_id: its id.
        public_key: the public half (33 bytes), for the server.
        record: serialized ``PreKeyRecord`` with the private half (a secret), for the wallet.
    """

    key_id: int
    public_key: bytes
    record: bytes = field(repr=False)

    def public(self) -> BundlePreKey:
        """The part a bundle (and the server) carries."""
        return BundlePreKey(self.key_id, self.public_key)


@dataclass(frozen=True, slots=True)
class SignedPreKey:
    """A new signed EC prekey or Kyber prekey.

    Attributes:
        key_id: its id.
        public_key: the public half (33 bytes EC, 1569 bytes Kyber), for the server.
        signature: the identity key's signature over ``public_key``.
        record: serialized ``SignedPreKeyRecord`` or ``KyberPreKeyRecord`` (a secret).
    """

    key_id: int
    public_key: bytes
    signature: bytes
    record: bytes = field(repr=False)

    def public(self) -> BundleSignedPreKey:
        """The part a bundle (and the server) carries."""
        return BundleSignedPreKey(self.key_id, self.public_key, self.signature)


#: A Kyber prekey has the same parts as a signed EC prekey.
KyberPreKey = SignedPreKey


@dataclass(frozen=True, slots=True)
class PreKeyBundle:
    """Everything needed to start a session with one device of a peer.

    Attributes:
        registration_id: the device's registration id.
        device_id: the device number.
        identity_key: the peer's identity public key (33 bytes).
        signed_prekey: the device's signed EC prekey.
        pq_prekey: a one-time or the last-resort Kyber prekey.
        prekey: a one-time EC prekey, or None when the server had none left.
    """

    registration_id: int
    device_id: int
    identity_key: bytes
    signed_prekey: BundleSignedPreKey
    pq_prekey: BundleSignedPreKey
    prekey: BundlePreKey | None = None

    @classmethod
    def from_server(cls, identity_key: str, device: Mapping[str, Any]) -> PreKeyBundle:
        """Build a bundle from the intermediary's ``GET /v2/keys`` answer.

        Args:
            identity_key: the answer's base64 ``identityKey``.
            device: one entry of the answer's ``devices`` list.

        Raises:
            InvalidMessage: a field is missing or not base64.
        """
        try:
            one = device.get("preKey")
            return cls(
                registration_id=int(device["registrationId"]),
                device_id=int(device["deviceId"]),
                identity_key=_unb64(identity_key),
                signed_prekey=_signed_from_json(device["signedPreKey"]),
                pq_prekey=_signed_from_json(device["pqPreKey"]),
                prekey=None
                if one is None
                else BundlePreKey(int(one["keyId"]), _unb64(one["publicKey"])),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise InvalidMessage(f"prekey bundle does not parse: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        """The protocol's bundle form."""
        return {
            "registrationId": self.registration_id,
            "deviceId": self.device_id,
            "identityKey": _b64(self.identity_key),
            "signedPreKey": self.signed_prekey.to_json(),
            "preKey": None if self.prekey is None else self.prekey.to_json(),
            "pqPreKey": self.pq_prekey.to_json(),
        }


@dataclass(frozen=True, slots=True)
class SessionResult:
    """What processing a prekey bundle changed.

    Attributes:
        changes: records to commit (the new session, a first-seen identity).
        identity_changes: peers whose identity key differed from the stored one.
    """

    changes: tuple[RecordChange, ...]
    identity_changes: tuple[IdentityChanged, ...]


@dataclass(frozen=True, slots=True)
class EncryptResult:
    """An encrypted message and the records encrypting it changed.

    Attributes:
        message_type: PREKEY until the peer has answered on the session, then WHISPER.
        ciphertext: the serialized libsignal message.
        changes: records to commit before the ciphertext leaves the device.
        identity_changes: peers whose identity key differed from the stored one.
    """

    message_type: MessageType
    ciphertext: bytes
    changes: tuple[RecordChange, ...]
    identity_changes: tuple[IdentityChanged, ...]


@dataclass(frozen=True, slots=True)
class DecryptResult:
    """A decrypted message and the records decrypting it changed.

    Attributes:
        plaintext: the message.
        changes: records to commit together with the message's effect.
        identity_changes: peers whose identity key differed from the stored one (only under
            ``always``, which accepts and stores the new key; the other policies refuse it).
    """

    plaintext: bytes = field(repr=False)
    changes: tuple[RecordChange, ...]
    identity_changes: tuple[IdentityChanged, ...]


@dataclass(frozen=True, slots=True)
class DecryptionError:
    """A peer device's report that it could not decrypt a message this wallet sent.

    Attributes:
        timestamp: the sender timestamp (ms) of the message that failed, as its envelope had it.
        device_id: the device of this account that sent that message.
        ratchet_key: the sender ratchet key the failed message carried (33 bytes), if any.
        current_session_broken: whether this wallet's current session with the reporting
            device is the one that broke (there is none, or its ratchet key is the reported
            one); when False the failed message was on an older session and the current one
            can be kept.
    """

    timestamp: int
    device_id: int
    ratchet_key: bytes | None
    current_session_broken: bool


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """The safety number of two identities; both peers compute the same one.

    Attributes:
        digits: 60 digits to compare by reading them out.
        scannable: the bytes a QR code carries.
    """

    digits: str
    scannable: bytes


_ERROR_KINDS: dict[str, type[SignalProtocolError]] = {
    "duplicate_message": DuplicateMessage,
    "invalid_message": InvalidMessage,
    "no_session": NoSession,
    "unknown_prekey": UnknownPreKey,
    "invalid_signature": InvalidSignature,
    "bad_request": SignalProtocolError,
}


class LibsignalBridge:
    """A running libsignal sidecar and a typed async API over it.

    Args:
        record_source: where missing records come from (the wallet store). Without one, every
            ``load`` is answered "no such record", which suits keys held only in memory.
        node: the Node.js executable; default ``$TIGRESS_SIGNAL_NODE`` or ``node`` on the PATH.
        sidecar: the sidecar script; default ``$TIGRESS_SIGNAL_SIDECAR`` or
            ``bridge/sidecar.mjs`` in the source tree.
        call_timeout: seconds one call may take before the sidecar is deemed wedged, killed,
            and the call fails with BridgeUnavailable; None waits forever.
        start_timeout: seconds the sidecar may take to start and answer ``ping``.
        close_timeout: seconds :meth:`aclose` waits for a clean exit before terminating it.
    """

    def __init__(
        self,
        record_source: RecordSource | None = None,
        *,
        node: str | None = None,
        sidecar: str | os.PathLike[str] | None = None,
        call_timeout: float | None = 60.0,
        start_timeout: float = 20.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.record_source = record_source
        self._node = node
        self._sidecar = sidecar
        self._call_timeout = call_timeout
        self._start_timeout = start_timeout
        self._close_timeout = close_timeout

        self._running: _Sidecar | None = None
        self._alive = False
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._abandoned: set[int] = set()
        self._unanswered: set[int] = set()
        self._ids = itertools.count(1)
        self._start_lock = asyncio.Lock()
        self._peer_locks: dict[str, _PeerLock] = {}
        self._open_params: dict[str, Any] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_KEPT)
        self._starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def pid(self) -> int | None:
        """The running sidecar's process id, or None when none is running."""
        running = self._running
        return running.process.pid if running is not None and self._alive else None

    @property
    def starts(self) -> int:
        """How many sidecar processes this bridge has started (restarts included)."""
        return self._starts

    async def start(self) -> None:
        """Start the sidecar and check that it answers.

        Calling it on a running bridge does nothing; calling it after :meth:`aclose` starts a
        new sidecar.

        Raises:
            BridgeUnavailable: Node.js, the script or its npm packages are missing, or the
                sidecar did not answer ``ping`` in time.
        """
        self._closed = False
        await self._ensure_running()

    async def aclose(self) -> None:
        """Stop the sidecar: close its stdin, wait, then terminate or kill it.

        Calls still in flight fail with BridgeUnavailable. Safe to call more than once.
        """
        self._closed = True
        async with self._start_lock:
            await self._stop_process()

    async def ping(self) -> BridgeHealth:
        """Check that the sidecar answers (starting it if needed).

        Returns:
            The libsignal version and the sidecar's process id.

        Raises:
            BridgeUnavailable: the sidecar is not running and would not start.
        """
        result = await self._call("ping", {})
        return BridgeHealth(str(result["libsignalVersion"]), int(result["pid"]))

    # -- keys --------------------------------------------------------------------------------

    async def generate_identity(self) -> GeneratedIdentity:
        """Generate an identity key pair and a registration id (needs no ``open``)."""
        result = await self._call("generateIdentity", {})
        return GeneratedIdentity(
            identity_key_pair=_unb64(result["identityKeyPair"]),
            public_key=_unb64(result["publicKey"]),
            registration_id=int(result["registrationId"]),
        )

    async def open(
        self,
        identity_key_pair: bytes,
        registration_id: int,
        address: ProtocolAddress,
        *,
        trust_policy: TrustPolicy = "tofu",
        last_resort_kyber_ids: Iterable[int] = (),
    ) -> None:
        """Tell the sidecar whose wallet it works for.

        Must come before the calls that use the local identity. Calling it again replaces the
        settings (for example after a new last-resort Kyber key); with another identity the
        sidecar drops its cache. After a sidecar restart the bridge sends it again by itself.

        Args:
            identity_key_pair: serialized ``IdentityKeyPair`` from :meth:`generate_identity`.
            registration_id: this install's registration id.
            address: this wallet's own account id and device.
            trust_policy: ``tofu`` trusts a peer's first identity key and refuses a different
                one both ways (:class:`UntrustedIdentity`, naming the refused key); ``always``
                trusts every key and replaces the stored one; ``verify`` receives like
                ``tofu`` but sends only to a key stored as a ``verified_identity`` record.
            last_resort_kyber_ids: ids of the Kyber prekeys that are last-resort keys; those
                are kept after use, every other Kyber prekey is deleted when used.

        Raises:
            SignalProtocolError: a parameter was refused (e.g. not an identity key pair).
        """
        params = {
            "identityKeyPair": _b64(identity_key_pair),
            "registrationId": registration_id,
            "address": address.to_json(),
            "trustPolicy": trust_policy,
            "lastResortKyberIds": sorted(set(last_resort_kyber_ids)),
        }
        await self._call("open", params)
        self._open_params = params

    async def generate_prekeys(self, start_id: int, count: int) -> tuple[PreKey, ...]:
        """Generate one-time EC prekeys with ids ``start_id .. start_id + count - 1``.

        The wallet stores the records before the public halves are uploaded.
        """
        result = await self._call("generatePreKeys", {"startId": start_id, "count": count})
        return tuple(
            PreKey(int(k["keyId"]), _unb64(k["publicKey"]), _unb64(k["record"]))
            for k in result["preKeys"]
        )

    async def generate_signed_prekey(
        self, key_id: int, timestamp_ms: int | None = None
    ) -> SignedPreKey:
        """Generate a signed EC prekey, signed by the opened identity.

        Args:
            key_id: its id.
            timestamp_ms: its creation time; default now.
        """
        stamp = _now_ms() if timestamp_ms is None else timestamp_ms
        result = await self._call("generateSignedPreKey", {"keyId": key_id, "timestamp": stamp})
        return _signed_prekey(result)

    async def generate_kyber_prekeys(
        self, start_id: int, count: int, timestamp_ms: int | None = None
    ) -> tuple[KyberPreKey, ...]:
        """Generate signed Kyber prekeys (one-time or, with ``count=1``, a last-resort key).

        Whether a Kyber key is a last-resort key is decided by ``open(last_resort_kyber_ids)``.
        """
        stamp = _now_ms() if timestamp_ms is None else timestamp_ms
        params = {"startId": start_id, "count": count, "timestamp": stamp}
        result = await self._call("generateKyberPreKeys", params)
        return tuple(_signed_prekey(k) for k in result["pqPreKeys"])

    async def verify_signature(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the identity ``public_key``'s signature over ``message``.

        Raises:
            SignalProtocolError: ``public_key`` is not a serialized public key.
        """
        params = {
            "publicKey": _b64(public_key),
            "message": _b64(message),
            "signature": _b64(signature),
        }
        result = await self._call("verifySignature", params)
        return bool(result["valid"])

    async def safety_number(
        self, local_id: str, local_key: bytes, remote_id: str, remote_key: bytes
    ) -> SafetyNumber:
        """The safety number of this wallet's identity and a peer's.

        Both sides get the same digits when each passes its own id and key as ``local``.
        """
        params = {
            "localId": local_id,
            "localKey": _b64(local_key),
            "remoteId": remote_id,
            "remoteKey": _b64(remote_key),
        }
        result = await self._call("safetyNumber", params)
        return SafetyNumber(str(result["digits"]), _unb64(result["scannable"]))

    # -- sessions and messages ---------------------------------------------------------------

    async def process_prekey_bundle(
        self, address: ProtocolAddress, bundle: PreKeyBundle
    ) -> SessionResult:
        """Start a session (PQXDH) with a peer's device from its prekey bundle.

        Raises:
            UntrustedIdentity: the bundle's identity key differs from the trusted one.
            InvalidSignature: a prekey signature does not verify against the identity key.
        """
        params = {"address": address.to_json(), "bundle": bundle.to_json()}
        result = await self._peer_call(address.name, "processPreKeyBundle", params)
        return SessionResult(_changes(result), _events(result))

    async def encrypt(self, address: ProtocolAddress, plaintext: bytes) -> EncryptResult:
        """Encrypt a message for a peer's device.

        Raises:
            NoSession: there is no session with that device.
            UntrustedIdentity: the session's identity key is no longer the trusted one.
        """
        params = {"address": address.to_json(), "plaintext": bytes(plaintext)}
        result = await self._peer_call(address.name, "encrypt", params)
        return EncryptResult(
            MessageType(int(result["type"])),
            _bytes(result, result["ciphertext"]),
            _changes(result),
            _events(result),
        )

    async def decrypt(
        self, address: ProtocolAddress, message_type: int, ciphertext: bytes
    ) -> DecryptResult:
        """Decrypt a message from a peer's device.

        Args:
            address: the sender.
            message_type: 2 (Whisper) or 3 (PreKey), see :class:`MessageType`.
            ciphertext: the serialized libsignal message.

        Raises:
            DuplicateMessage: the message was already decrypted.
            InvalidMessage: the message is malformed or tampered with.
            NoSession: a Whisper message arrived with no session to decrypt it.
            UnknownPreKey: a PreKey message names a prekey this wallet does not hold.
            UntrustedIdentity: the sender's identity key is not the trusted one (``tofu``,
                ``verify``); its ``identity_key`` is the refused key. Nothing changed.
        """
        params = {
            "address": address.to_json(),
            "type": int(message_type),
            "ciphertext": bytes(ciphertext),
        }
        result = await self._peer_call(address.name, "decrypt", params)
        plaintext = _bytes(result, result["plaintext"])
        return DecryptResult(plaintext, _changes(result), _events(result))

    async def decryption_error(
        self, ciphertext: bytes, message_type: int, timestamp: int, sender_device_id: int
    ) -> bytes:
        """Make a decryption-error message about a message that could not be decrypted.

        The answer is libsignal's ``DecryptionErrorMessage`` wrapped in a ``PlaintextContent``,
        ready to travel unencrypted as envelope type 8 to the device that sent the message.

        Args:
            ciphertext: the message that failed, as it arrived.
            message_type: its type, 2 (Whisper) or 3 (PreKey).
            timestamp: the sender timestamp of its envelope (ms).
            sender_device_id: the device that sent it.

        Raises:
            InvalidMessage: ``ciphertext`` is not a libsignal message of that type (a message
                that does not even parse names no session to repair).
            SignalProtocolError: a parameter was refused.
        """
        params = {
            "ciphertext": bytes(ciphertext),
            "type": int(message_type),
            "timestamp": int(timestamp),
            "senderDeviceId": int(sender_device_id),
        }
        result = await self._call("decryptionError", params)
        return _bytes(result, result["content"])

    async def read_decryption_error(
        self, address: ProtocolAddress, content: bytes
    ) -> DecryptionError:
        """Read a decryption-error message from a peer's device (envelope type 8 content).

        Nothing changes: the caller decides whether to start a new session and resend.

        Args:
            address: the peer device that sent the error (and failed to decrypt).
            content: the envelope's content, a serialized ``PlaintextContent``.

        Raises:
            InvalidMessage: ``content`` is not a PlaintextContent holding a decryption error.
        """
        params = {"address": address.to_json(), "content": bytes(content)}
        result = await self._peer_call(address.name, "readDecryptionError", params)
        ratchet_key = result.get("ratchetKey")
        return DecryptionError(
            timestamp=int(result["timestamp"]),
            device_id=int(result["deviceId"]),
            ratchet_key=None if ratchet_key is None else _bytes(result, ratchet_key),
            current_session_broken=bool(result["currentSessionBroken"]),
        )

    async def evict(self, records: Iterable[RecordChange | tuple[RecordKind, str]]) -> None:
        """Drop records from the sidecar's cache so the next use reloads the wallet's copy.

        Call it when committing a call's changes failed, or after the wallet wrote a record
        itself (for example the identity key a person has just verified).
        """
        listed = [
            {"kind": r.kind, "key": r.key}
            if isinstance(r, RecordChange)
            else {"kind": r[0], "key": r[1]}
            for r in records
        ]
        if listed:
            await self._call("evict", {"records": listed})

    # -- calls -------------------------------------------------------------------------------

    async def _peer_call(self, name: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_call`, one at a time for each peer."""
        peer = self._peer_locks.get(name)
        if peer is None:
            peer = self._peer_locks[name] = _PeerLock()
        peer.users += 1
        try:
            async with peer.lock:
                return await self._call(method, params)
        finally:
            peer.users -= 1
            if peer.users == 0:
                del self._peer_locks[name]

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        sidecar = await self._ensure_running()
        answer = await self._request(sidecar, method, params)
        error = answer.get("error")
        if error is not None:
            raise _error_from(method, error)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise BridgeProtocolError(f"sidecar answered {method} without a result")
        blobs = answer.get("blobs")
        if blobs is not None:
            result["blobs"] = blobs  # where the byte fields given as blob indices are
        return result

    async def _request(
        self, sidecar: _Sidecar, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self._loop().create_future()
        self._pending[request_id] = future
        try:
            await self._write(sidecar, _request_frame(request_id, method, params))
            async with asyncio.timeout(self._call_timeout):
                return await future
        except TimeoutError:
            logger.error(
                "libsignal sidecar did not answer %s within %s s; restarting it",
                method,
                self._call_timeout,
            )
            self._kill(sidecar)
            raise BridgeUnavailable(
                f"the libsignal sidecar did not answer {method} in time"
            ) from None
        except asyncio.CancelledError:
            # The sidecar still finishes the call and caches its changes, which the caller
            # will never commit: have them evicted when the answer comes (see _dispatch).
            if future.done() and not future.cancelled() and future.exception() is None:
                self._evict_changes(sidecar, future.result())
            elif request_id in self._pending:
                self._abandoned.add(request_id)
            raise
        finally:
            if request_id not in self._abandoned:
                self._pending.pop(request_id, None)

    async def _write(self, sidecar: _Sidecar, line: bytes) -> None:
        if not self._alive or sidecar is not self._running or sidecar.stdin < 0:
            raise BridgeUnavailable("the libsignal sidecar is not running")
        self._send(sidecar, line)
        if sidecar.queued > _WRITE_BUFFER_HIGH:
            await self._drained(sidecar)

    def _send(self, sidecar: _Sidecar, data: bytes) -> None:
        # Lines sent in one event-loop turn go out in one write at the end of the turn: the
        # sidecar wakes once for the lot, and only once this process is about to wait (writing
        # at once measured slower: the woken sidecar competes with the rest of this turn).
        if sidecar is not self._running or sidecar.stdin < 0:
            return  # an answer for a sidecar that has been replaced or is closing
        sidecar.outgoing.append(data)
        sidecar.queued += len(data)
        if len(sidecar.outgoing) == 1:
            self._loop().call_soon(self._flush, sidecar)

    def _flush(self, sidecar: _Sidecar) -> None:
        """Write what waits for the sidecar; keep what the pipe does not take for later."""
        if sidecar.stdin < 0 or not sidecar.outgoing:
            return
        data = sidecar.outgoing[0] if len(sidecar.outgoing) == 1 else b"".join(sidecar.outgoing)
        try:
            written = os.write(sidecar.stdin, data)
        except BlockingIOError:
            written = 0
        except OSError:
            logger.warning("writing to the libsignal sidecar failed; it will be restarted")
            self._kill(sidecar)
            self._close_input(sidecar)
            return
        rest = data[written:]
        sidecar.outgoing = [rest] if rest else []
        sidecar.queued = len(rest)
        if rest and not sidecar.writing:
            sidecar.writing = True
            self._loop().add_writer(sidecar.stdin, self._flush, sidecar)
        elif not rest:
            if sidecar.writing:
                sidecar.writing = False
                self._loop().remove_writer(sidecar.stdin)
            sidecar.wake_writers(None)

    async def _drained(self, sidecar: _Sidecar) -> None:
        waiter: asyncio.Future[None] = self._loop().create_future()
        sidecar.drain_waiters.append(waiter)
        try:
            await waiter
        except ConnectionError as exc:
            raise BridgeUnavailable("the libsignal sidecar stopped reading its input") from exc

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # -- the sidecar process -----------------------------------------------------------------

    async def _ensure_running(self) -> _Sidecar:
        sidecar = self._running
        if sidecar is not None and self._alive:
            return sidecar
        async with self._start_lock:
            sidecar = self._running
            if sidecar is not None and self._alive:
                return sidecar
            if self._closed:
                raise BridgeUnavailable("the libsignal bridge is closed")
            if sidecar is not None:
                # The previous sidecar died: reap it before starting the next one.
                await self._stop_process()
                logger.warning("libsignal sidecar exited; starting a new one")
            return await self._spawn()

    async def _spawn(self) -> _Sidecar:
        node = self._node or os.environ.get(NODE_ENV) or shutil.which("node")
        if node is None:
            raise BridgeUnavailable(f"Node.js (node) was not found on the PATH; {_SETUP_HINT}")
        script = locate_sidecar(self._sidecar)
        self._stderr_tail.clear()
        # Our own pipes for the protocol, read and written straight from the event loop
        # without stream objects in between; stderr stays an asyncio stream.
        child_stdin, stdin = os.pipe()
        stdout, child_stdout = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                node,
                str(script),
                stdin=child_stdin,
                stdout=child_stdout,
                stderr=asyncio.subprocess.PIPE,
                cwd=script.parent,
                limit=_LINE_LIMIT,
            )
        except BaseException as exc:
            os.close(stdin)
            os.close(stdout)
            if isinstance(exc, OSError):
                raise BridgeUnavailable(
                    f"could not start the libsignal sidecar with {node}: {exc}; {_SETUP_HINT}"
                ) from exc
            raise
        finally:
            os.close(child_stdin)
            os.close(child_stdout)
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        sidecar = _Sidecar(process, stdin, stdout)
        self._running = sidecar
        self._alive = True
        self._starts += 1
        self._loop().add_reader(stdout, self._on_readable, sidecar)
        self._tasks = [
            asyncio.create_task(self._read_diagnostics(process), name="libsignal-sidecar-stderr"),
        ]

        # Health check, then restore the wallet's identity if one was opened before.
        try:
            async with asyncio.timeout(self._start_timeout):
                answer = await self._request(sidecar, "ping", {})
                if self._open_params is not None:
                    reopened = await self._request(sidecar, "open", self._open_params)
                    if "error" in reopened:
                        raise _error_from("open", reopened["error"])
        except (TimeoutError, BridgeError) as exc:
            await self._stop_process()
            tail = " | ".join(self._stderr_tail)
            raise BridgeUnavailable(
                f"the libsignal sidecar did not start ({exc or 'no answer'})"
                + (f": {tail}" if tail else "")
            ) from exc
        version = answer.get("result", {}).get("libsignalVersion")
        logger.info("libsignal sidecar started (pid %d, libsignal %s)", process.pid, version)
        return sidecar

    async def _stop_process(self) -> None:
        sidecar = self._running
        if sidecar is None:
            return
        process = sidecar.process
        self._alive = False
        self._close_input(sidecar)  # the sidecar exits when its stdin closes
        try:
            await asyncio.wait_for(process.wait(), self._close_timeout)
        except TimeoutError:
            logger.warning("libsignal sidecar (pid %d) did not exit; terminating it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self._close_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        # The process is gone: take in what it wrote last, then close its output.
        while sidecar.stdout >= 0 and self._on_readable(sidecar):
            pass
        self._output_ended(sidecar)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._fail_pending(BridgeUnavailable("the libsignal sidecar was stopped"))
        self._running = None

    def _close_input(self, sidecar: _Sidecar) -> None:
        if sidecar.stdin < 0:
            return
        if sidecar.writing:
            sidecar.writing = False
            self._loop().remove_writer(sidecar.stdin)
        os.close(sidecar.stdin)
        sidecar.stdin = -1
        sidecar.outgoing = []
        sidecar.queued = 0
        sidecar.wake_writers(ConnectionResetError("the sidecar's input is closed"))

    def _kill(self, sidecar: _Sidecar) -> None:
        if self._running is sidecar:
            self._alive = False
        with contextlib.suppress(ProcessLookupError):
            sidecar.process.kill()

    def _fail_pending(self, error: BridgeUnavailable) -> None:
        pending, self._pending = self._pending, {}
        self._abandoned.clear()
        self._unanswered.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
                # Nobody may be waiting any more (an abandoned call): don't warn about it.
                future.exception()

    def _on_readable(self, sidecar: _Sidecar) -> bool:
        """Read what the sidecar wrote and dispatch every complete message, in this loop turn.

        Returns:
            Whether there may be more to read (False at the end of the output or when the pipe
            is empty for now).
        """
        try:
            # Into a buffer kept for the purpose: a fresh _READ_SIZE object per read would cost
            # a large allocation and a shrink for every answer.
            size = os.readv(sidecar.stdout, (sidecar.buffer,))
        except BlockingIOError:
            return False
        except OSError as exc:
            logger.error("reading the libsignal sidecar's output failed: %s", exc)
            self._kill(sidecar)
            size = 0
        if size == 0:
            self._output_ended(sidecar)
            return False
        data = sidecar.view[:size].tobytes()
        if sidecar.partial:
            # Only join the pieces once they hold a whole line, or all of the awaited blobs.
            sidecar.partial.append(data)
            sidecar.partial_size += size
            awaiting = sidecar.awaiting
            if awaiting is None and data.find(b"\n") < 0:
                if sidecar.partial_size > _LINE_LIMIT:
                    logger.error("the libsignal sidecar wrote a line over %d bytes", _LINE_LIMIT)
                    self._kill(sidecar)
                    sidecar.partial, sidecar.partial_size = [], 0
                return True
            if awaiting is not None and sidecar.partial_size < awaiting[1]:
                return True
            data = b"".join(sidecar.partial)
            sidecar.partial, sidecar.partial_size = [], 0
        self._take(sidecar, data)
        return True

    def _take(self, sidecar: _Sidecar, data: bytes) -> None:
        """Dispatch the messages in ``data``; keep an incomplete one's bytes for later."""
        start = 0
        while True:
            awaiting = sidecar.awaiting
            if awaiting is not None:
                message, size = awaiting
                if len(data) - start < size:
                    break
                blobs = []
                for length in message["blobs"]:
                    blobs.append(data[start : start + length])
                    start += length
                message["blobs"] = blobs
                sidecar.awaiting = None
                self._dispatch(sidecar, message)
                continue
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            try:
                message = json.loads(line)
                lengths = message.get("blobs")
            except (ValueError, TypeError, AttributeError):
                logger.error(
                    "libsignal sidecar wrote a line that is not our protocol; restarting it"
                )
                self._kill(sidecar)
                continue
            if lengths is None:
                self._dispatch(sidecar, message)
                continue
            size = _blobs_size(lengths)
            if size < 0:
                logger.error("libsignal sidecar announced malformed blobs; restarting it")
                self._kill(sidecar)
                return
            sidecar.awaiting = (message, size)
        if start < len(data):
            sidecar.partial.append(data[start:] if start else data)
            sidecar.partial_size = len(data) - start

    def _output_ended(self, sidecar: _Sidecar) -> None:
        if sidecar.stdout >= 0:
            self._loop().remove_reader(sidecar.stdout)
            os.close(sidecar.stdout)
            sidecar.stdout = -1
        if self._running is sidecar:
            self._alive = False
            self._fail_pending(BridgeUnavailable("the libsignal sidecar exited mid-call"))

    async def _read_diagnostics(self, process: asyncio.subprocess.Process) -> None:
        stderr = process.stderr
        assert stderr is not None
        with contextlib.suppress(ValueError, ConnectionError):
            while line := await stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self._stderr_tail.append(text)
                logger.warning("sidecar: %s", text)

    def _dispatch(self, sidecar: _Sidecar, message: Any) -> None:
        try:
            message_id = message["id"]
        except (TypeError, KeyError):
            logger.error("libsignal sidecar wrote a line that is not our protocol; restarting it")
            self._kill(sidecar)
            return
        if message.get("method") == "load":
            self._answer_load(sidecar, message_id, message.get("params") or {})
            return
        if message_id in self._unanswered:
            self._unanswered.discard(message_id)
            return
        future = self._pending.get(message_id)
        if message_id in self._abandoned:
            self._abandoned.discard(message_id)
            self._pending.pop(message_id, None)
            self._evict_changes(sidecar, message)
        if future is None:
            logger.warning("libsignal sidecar answered unknown request %r", message_id)
        elif not future.done():
            future.set_result(message)

    def _answer_load(self, sidecar: _Sidecar, load_id: str, params: dict[str, Any]) -> None:
        kind, key = params.get("kind"), params.get("key")
        answer: dict[str, Any]
        if kind not in RECORD_KINDS or not isinstance(key, str):
            logger.error("libsignal sidecar asked for an unknown record kind %r", kind)
            answer = {"id": load_id, "error": {"kind": "bad_request", "message": "unknown kind"}}
        elif self.record_source is None:
            answer = {"id": load_id, "result": {"value": None}}
        else:
            try:
                value = self.record_source.load_record(kind, key)
            except Exception:
                logger.exception("loading a %s record for the libsignal sidecar failed", kind)
                answer = {"id": load_id, "error": {"kind": "internal", "message": "load failed"}}
            else:
                encoded = None if value is None else _b64(value)
                answer = {"id": load_id, "result": {"value": encoded}}
        self._send(sidecar, _dumps(answer))

    def _evict_changes(self, sidecar: _Sidecar, message: dict[str, Any]) -> None:
        changes = (message.get("result") or {}).get("changes") or []
        if not changes or sidecar is not self._running or sidecar.stdin < 0:
            return
        records = [{"kind": c["kind"], "key": c["key"]} for c in changes]
        request_id = next(self._ids)
        self._unanswered.add(request_id)
        request = {"id": request_id, "method": "evict", "params": {"records": records}}
        self._send(sidecar, _dumps(request))
        logger.info("evicted %d records of a cancelled call from the sidecar", len(records))


class _Sidecar:
    """A running sidecar: its process and the parent's non-blocking ends of its stdin and
    stdout pipes (-1 once closed), with what is waiting to be written and a partial line."""

    __slots__ = (
        "awaiting",
        "buffer",
        "drain_waiters",
        "outgoing",
        "partial",
        "partial_size",
        "process",
        "queued",
        "stdin",
        "stdout",
        "view",
        "writing",
    )

    def __init__(self, process: asyncio.subprocess.Process, stdin: int, stdout: int) -> None:
        self.process = process
        self.stdin = stdin
        self.stdout = stdout
        self.outgoing: list[bytes] = []
        self.queued = 0
        self.writing = False  # whether the loop watches stdin for room to write the rest
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.partial: list[bytes] = []
        self.partial_size = 0
        # A message whose line has been read, and the byte count of the blobs that follow it.
        self.awaiting: tuple[dict[str, Any], int] | None = None
        self.buffer = bytearray(_READ_SIZE)
        self.view = memoryview(self.buffer)

    def wake_writers(self, error: BaseException | None) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


@dataclass(slots=True)
class _PeerLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def locate_sidecar(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find the sidecar script and check that its npm packages are installed.

    Args:
        explicit: a path to use instead of ``$TIGRESS_SIGNAL_SIDECAR`` or the source tree's
            ``bridge/sidecar.mjs``.

    Raises:
        BridgeUnavailable: the script or ``node_modules/@signalapp/libsignal-client`` is missing.
    """
    configured = explicit or os.environ.get(SIDECAR_ENV)
    if configured:
        script = Path(configured).expanduser().resolve()
    else:
        # src/tigress_signal/bridge/libsignal.py -> the repository root is three levels up.
        script = Path(__file__).resolve().parents[3] / "bridge" / "sidecar.mjs"
    if not script.is_file():
        raise BridgeUnavailable(
            f"libsignal sidecar script not found at {script} (set {SIDECAR_ENV}, or {_SETUP_HINT})"
        )
    package = script.parent / "node_modules" / "@signalapp" / "libsignal-client"
    if not package.is_dir():
        raise BridgeUnavailable(
            f"the sidecar's npm packages are not installed in {script.parent}; {_SETUP_HINT}"
        )
    return script


def _error_from(method: str, error: Any) -> BridgeError:
    if not isinstance(error, dict):
        return BridgeProtocolError(f"sidecar answered {method} with a malformed error")
    kind = error.get("kind")
    message = str(error.get("message") or kind)
    code = error.get("code")
    libsignal_code = code if isinstance(code, int) else None
    if kind == "untrusted_identity":
        peer = str(error.get("peer") or "")
        refused = error.get("identityKey")
        try:
            identity_key = _unb64(refused) if isinstance(refused, str) else None
        except ValueError:
            identity_key = None
        return UntrustedIdentity(
            f"{method}: identity key of {peer} is not trusted",
            peer=peer,
            identity_key=identity_key,
            operation=method,
            libsignal_code=libsignal_code,
        )
    cls = _ERROR_KINDS.get(str(kind))
    if cls is not None:
        return cls(f"{method}: {message}", operation=method, libsignal_code=libsignal_code)
    return BridgeError(f"libsignal sidecar failed in {method}: {message}")


def _changes(result: dict[str, Any]) -> tuple[RecordChange, ...]:
    changes = []
    for change in result.get("changes") or ():
        kind = change["kind"]
        if kind not in RECORD_KINDS:
            raise BridgeProtocolError(f"sidecar returned a change of unknown kind {kind!r}")
        value = change["value"]
        changes.append(
            RecordChange(
                kind, str(change["key"]), None if value is None else _bytes(result, value)
            )
        )
    return tuple(changes)


def _events(result: dict[str, Any]) -> tuple[IdentityChanged, ...]:
    return tuple(
        IdentityChanged(str(e["peer"]))
        for e in result.get("events") or ()
        if e.get("type") == "identity_changed"
    )


def _signed_from_json(part: Mapping[str, Any]) -> BundleSignedPreKey:
    return BundleSignedPreKey(
        int(part["keyId"]), _unb64(part["publicKey"]), _unb64(part["signature"])
    )


def _signed_prekey(result: Mapping[str, Any]) -> SignedPreKey:
    return SignedPreKey(
        int(result["keyId"]),
        _unb64(result["publicKey"]),
        _unb64(result["signature"]),
        _unb64(result["record"]),
    )


def _request_frame(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    """A request: its line and, when ``params`` holds bytes values, their blobs after it.

    A ``bytes`` value at the top level of ``params`` travels as a blob, its field holding the
    blob's index; the sidecar then answers with blobs as well.
    """
    blobs = [value for value in params.values() if isinstance(value, bytes)]
    if not blobs:
        return _dumps({"id": request_id, "method": method, "params": params})
    wire: dict[str, Any] = {}
    index = 0
    for key, value in params.items():
        if isinstance(value, bytes):
            wire[key] = index
            index += 1
        else:
            wire[key] = value
    lengths = [len(blob) for blob in blobs]
    line = _dumps({"id": request_id, "method": method, "params": wire, "blobs": lengths})
    return b"".join([line, *blobs])


def _blobs_size(lengths: Any) -> int:
    """The byte count of the blobs a message announces, or -1 when ``blobs`` is malformed."""
    if not isinstance(lengths, list):
        return -1
    size = 0
    for length in lengths:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            return -1
        size += length
    return size if size <= _LINE_LIMIT else -1


def _bytes(result: dict[str, Any], value: Any) -> bytes:
    """A byte field of an answer: base64 text, or the index of one of the answer's blobs."""
    if isinstance(value, str):
        return _unb64(value)
    blobs = result.get("blobs")
    if isinstance(value, int) and isinstance(blobs, list) and 0 <= value < len(blobs):
        blob = blobs[value]
        if isinstance(blob, bytes):
            return blob
    raise BridgeProtocolError(
        "sidecar answered with a byte field that is neither base64 nor a blob"
    )


def _dumps(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return _ENCODER.encode(message).encode() + b"\n"


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _now_ms() -> int:
    return int(time.time() * 1000)
