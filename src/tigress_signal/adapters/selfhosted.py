"""The CredentialChannel over the self-hosted intermediary, with libsignal doing the crypto.

Sending: on first contact with a peer, fetch its prekey bundle and set up a PQXDH session; then
encrypt for each of the peer's devices, commit the new session state, and hand the ciphertexts
to the intermediary.

Receiving: hold a WebSocket to the intermediary; after every (re)connect, first catch up over
REST on whatever was stored meanwhile, then take pushed messages. Each message is decrypted
under the peer's lock and handed to the wallet with the records its decryption changed; the
lock is held until the wallet acknowledges (its effect is committed) or releases it, so no other
operation for that peer can interleave with the session update.

Devices: a peer is sent to on the devices its bundle listed at first contact; when the
intermediary answers 409 (devices missing or extra) or 410 (devices registered again), delivery
corrects the list, sets up sessions with the new devices and retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tigress_signal.bridge.libsignal import LibsignalBridge, ProtocolAddress
from tigress_signal.bridge.records import RecordChange
from tigress_signal.channel import CredentialChannel, IncomingMessage, SealedMessage
from tigress_signal.errors import (
    AuthenticationFailed,
    BridgeUnavailable,
    ChannelClosed,
    ChannelError,
    DuplicateMessage,
    MismatchedDevices,
    NotFound,
    RateLimited,
    ServerApiError,
    SignalProtocolError,
    StaleDevices,
    TigressSignalError,
    UnknownPeer,
    UntrustedIdentity,
)
from tigress_signal.intermediary.client import Envelope, IntermediaryClient, OutgoingMessage
from tigress_signal.wallet.store import Account, WalletStore

log = logging.getLogger(__name__)

# The intermediary's envelope types and libsignal's message types for the same two messages.
_ENVELOPE_CIPHERTEXT = 1
_ENVELOPE_PREKEY = 3
_LIBSIGNAL_WHISPER = 2
_LIBSIGNAL_PREKEY = 3

#: How many times one delivery corrects the peer's device list (409/410) before giving up.
_DEVICE_CORRECTIONS = 3

_RECONNECT_FIRST_DELAY = 0.2
_RECONNECT_MAX_DELAY = 10.0


class SelfHostedChannel(CredentialChannel):
    """Transfer messages through our intermediary, end-to-end encrypted by libsignal.

    Args:
        store: the wallet store (session records and processed-message markers).
        bridge: the wallet's libsignal sidecar, already opened with the wallet's identity.
        client: an intermediary client authenticated as this wallet's device.
        account: this wallet's account.
        on_connect: called after every (re)connection, before messages are taken (the wallet
            checks its prekey pools there).
    """

    name = "selfhosted"

    def __init__(
        self,
        store: WalletStore,
        bridge: LibsignalBridge,
        client: IntermediaryClient,
        account: Account,
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._on_connect = on_connect
        self._bridge = bridge
        self._client = client
        self._account = account
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self._in_flight: dict[str, _Delivery] = {}
        self._sealed: dict[int, asyncio.Lock | None] = {}
        self._closed = asyncio.Event()

    # -- sending --------------------------------------------------------------------------------

    async def send(self, peer: str, payload: bytes, *, summary: str = "") -> None:
        """Encrypt ``payload`` for every device of ``peer`` and store it at the intermediary.

        The new session state is committed before the ciphertext leaves, so a message key is
        never used twice. Wallets that need the ciphertext stored with their own changes use
        :meth:`seal`, :meth:`settle` and :meth:`deliver` instead.
        """
        sealed = await self.seal(peer, payload, summary=summary)
        stored = False
        try:
            with self._store.transaction() as conn:
                self._store.apply_changes(conn, sealed.record_changes)
            stored = True
        finally:
            await self.settle(sealed, stored=stored)
        await self.deliver(sealed)

    async def seal(
        self,
        peer: str,
        payload: bytes,
        *,
        summary: str = "",
        during: IncomingMessage | None = None,
    ) -> SealedMessage:
        """Encrypt ``payload`` for every device of ``peer``, setting up sessions on first contact.

        The peer's lock is held until :meth:`settle` (unless ``during`` already holds it).
        """
        if self._closed.is_set():
            raise ChannelClosed("the self-hosted channel is closed")
        if peer == self._account.account_id:
            raise ChannelError("a wallet cannot share with itself", hint="name another account")
        lock = self._lock(peer)
        held = during is not None and during.peer == peer and during.envelope_id in self._in_flight
        if not held:
            await lock.acquire()
        changes: list[RecordChange] = []
        try:
            devices = {
                device_id: registration_id
                for device_id, registration_id in self._store.peer_devices(peer).items()
                if self._store.has_record("session", f"{peer}.{device_id}")
            }
            if not devices:
                devices = await self._start_sessions(peer, changes)
            messages: list[dict[str, object]] = []
            for device_id, registration_id in sorted(devices.items()):
                result = await self._bridge.encrypt(ProtocolAddress(peer, device_id), payload)
                changes.extend(result.changes)
                envelope_type = (
                    _ENVELOPE_PREKEY
                    if result.message_type == _LIBSIGNAL_PREKEY
                    else _ENVELOPE_CIPHERTEXT
                )
                messages.append(
                    {
                        "type": envelope_type,
                        "destinationDeviceId": device_id,
                        "destinationRegistrationId": registration_id,
                        "content": base64.b64encode(result.ciphertext).decode("ascii"),
                    }
                )
            # Device registration ids are not secret and are checked by the server anyway, so
            # they are remembered at once, whether or not the caller stores this message.
            with self._store.transaction() as conn:
                for device_id, registration_id in devices.items():
                    self._store.save_peer_device(conn, peer, device_id, registration_id)
        except BaseException:
            await self._forget(changes)
            if not held:
                lock.release()
            raise
        # The payload travels with the ciphertexts so that a device the intermediary reports as
        # missing or re-registered (409/410) can be given its own ciphertext at delivery.
        wire = json.dumps(
            {
                "timestamp": int(time.time() * 1000),
                "messages": messages,
                "payload": base64.b64encode(payload).decode("ascii"),
            }
        )
        sealed = SealedMessage(peer, wire.encode("ascii"), tuple(changes))
        self._sealed[id(sealed)] = lock if not held else None
        return sealed

    async def settle(self, sealed: SealedMessage, *, stored: bool) -> None:
        """Release the peer's session; forget the sealing's changes if they were not stored."""
        lock = self._sealed.pop(id(sealed), None)
        try:
            if not stored:
                await self._forget(sealed.record_changes)
        finally:
            if lock is not None:
                lock.release()

    async def deliver(self, sealed: SealedMessage) -> None:
        """Store a sealed message at the intermediary (the same ciphertext on every retry).

        When the intermediary answers that the peer's devices changed (409: devices missing or
        extra; 410: devices registered again), the device list is corrected, the devices that
        need it get a ciphertext of their own from a fresh session, and the send is retried.
        """
        started = time.perf_counter()
        try:
            document = json.loads(sealed.wire)
            messages = {
                int(m["destinationDeviceId"]): OutgoingMessage(
                    type=int(m["type"]),
                    destination_device_id=int(m["destinationDeviceId"]),
                    destination_registration_id=int(m["destinationRegistrationId"]),
                    content=base64.b64decode(m["content"], validate=True),
                )
                for m in document["messages"]
            }
            timestamp = int(document["timestamp"])
            payload = base64.b64decode(document.get("payload", ""), validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ChannelError(f"a sealed message to {sealed.peer} is damaged: {exc}") from exc
        for attempt in range(_DEVICE_CORRECTIONS + 1):
            try:
                await self._client.send_messages(
                    sealed.peer, list(messages.values()), timestamp=timestamp
                )
                break
            except (MismatchedDevices, StaleDevices) as exc:
                if attempt == _DEVICE_CORRECTIONS or not payload:
                    raise ChannelError(
                        f"the devices of {sealed.peer} keep changing: {exc}"
                    ) from exc
                await self._correct_devices(sealed.peer, payload, messages, exc)
            except NotFound as exc:
                raise UnknownPeer(f"the intermediary has no account {sealed.peer}") from exc
            except RateLimited:
                raise  # the caller waits as long as the server asked
            except ServerApiError as exc:
                raise ChannelError(
                    f"the intermediary refused the message to {sealed.peer}: {exc}"
                ) from exc
        log.info(
            "delivered a message to %s on %d device(s) (%.1f ms)",
            sealed.peer,
            len(messages),
            (time.perf_counter() - started) * 1000,
        )

    async def _correct_devices(
        self,
        peer: str,
        payload: bytes,
        messages: dict[int, OutgoingMessage],
        answer: MismatchedDevices | StaleDevices,
    ) -> None:
        """Bring ``messages`` in line with the peer's devices as the intermediary reported them."""
        if isinstance(answer, MismatchedDevices):
            gone, new = set(answer.extra_devices), set(answer.missing_devices)
        else:
            gone, new = set(), set(answer.stale_devices)
        log.info(
            "devices of %s changed: %s new or re-registered, %s gone",
            peer,
            sorted(new) or "none",
            sorted(gone) or "none",
        )
        async with self._lock(peer):
            changes: list[RecordChange] = []
            try:
                for device_id in sorted(new):
                    bundle = await self._client.fetch_bundle(peer, device_id)
                    (device,) = bundle.devices
                    address = ProtocolAddress(peer, device_id)
                    # For a re-registered device libsignal archives the old session state and
                    # starts a new one from the fresh bundle.
                    changes.extend(
                        (await self._bridge.process_prekey_bundle(address, device)).changes
                    )
                    result = await self._bridge.encrypt(address, payload)
                    changes.extend(result.changes)
                    messages[device_id] = OutgoingMessage(
                        type=_ENVELOPE_PREKEY
                        if result.message_type == _LIBSIGNAL_PREKEY
                        else _ENVELOPE_CIPHERTEXT,
                        destination_device_id=device_id,
                        destination_registration_id=device.registration_id,
                        content=result.ciphertext,
                    )
                with self._store.transaction() as conn:
                    self._store.apply_changes(conn, changes)
                    for device_id in sorted(new):
                        reg = messages[device_id].destination_registration_id
                        self._store.save_peer_device(conn, peer, device_id, reg)
                    for device_id in sorted(gone):
                        messages.pop(device_id, None)
                        self._store.apply_changes(
                            conn, [RecordChange("session", f"{peer}.{device_id}", None)]
                        )
                        conn.execute(
                            "DELETE FROM peer_devices WHERE peer = ? AND device_id = ?",
                            (peer, device_id),
                        )
            except BaseException:
                await self._forget(changes)
                raise
            if gone:
                await self._bridge.evict([("session", f"{peer}.{d}") for d in gone])

    async def _start_sessions(self, peer: str, changes: list[RecordChange]) -> dict[int, int]:
        try:
            bundle = await self._client.fetch_bundle(peer)
        except NotFound as exc:
            raise UnknownPeer(f"the intermediary has no account {peer}") from exc
        except ServerApiError as exc:
            raise ChannelError(f"cannot fetch the prekey bundle of {peer}: {exc}") from exc
        devices: dict[int, int] = {}
        for device in bundle.devices:
            address = ProtocolAddress(peer, device.device_id)
            result = await self._bridge.process_prekey_bundle(address, device)
            changes.extend(result.changes)
            devices[device.device_id] = device.registration_id
        log.info("started a session with %s (%d device(s))", peer, len(devices))
        return devices

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self) -> AsyncIterator[IncomingMessage]:
        """Yield decrypted transfer messages; reconnects with backoff until :meth:`close`.

        Raises:
            AuthenticationFailed: the intermediary refused this device's credentials (the
                device was removed from its account, say). Retrying cannot help, so the
                receive loop ends instead of reconnecting for ever.
        """
        delay = _RECONNECT_FIRST_DELAY
        while not self._closed.is_set():
            try:
                async with self._client.connect_websocket() as socket:
                    delay = _RECONNECT_FIRST_DELAY
                    if self._on_connect is not None:
                        await self._on_connect()
                    # Catch up on what was stored while we were away before taking pushes.
                    for envelope in await self._client.list_all_messages():
                        incoming = await self._open(envelope, self._rest_ack(envelope.guid))
                        if incoming is not None:
                            yield incoming
                    async for delivery in socket.deliveries(self._closed):
                        incoming = await self._open(delivery.envelope, delivery.acknowledge)
                        if incoming is not None:
                            yield incoming
            except AuthenticationFailed:
                raise
            except (ServerApiError, ChannelError, OSError) as exc:
                if self._closed.is_set():
                    break
                log.warning("intermediary connection lost (%s); retrying in %.1f s", exc, delay)
                await _sleep_unless(self._closed, delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)

    def _rest_ack(self, guid: str) -> Callable[[], Awaitable[None]]:
        async def acknowledge() -> None:
            await self._client.acknowledge(guid)

        return acknowledge

    async def _open(
        self, envelope: Envelope, ack: Callable[[], Awaitable[None]]
    ) -> IncomingMessage | None:
        """Decrypt one envelope; None when it was dropped (a copy, or undecryptable)."""
        if envelope.guid in self._in_flight:
            return None  # already handed out (pushed and listed over REST)
        if self._store.envelope_seen(envelope.guid):
            log.info("dropped envelope %s: already processed", envelope.guid)
            await ack()
            return None
        if not envelope.source_uuid:
            log.warning("dropped envelope %s: no sender", envelope.guid)
            await ack()
            return None
        peer = envelope.source_uuid
        lock = self._lock(peer)
        await lock.acquire()
        handed_out = False
        try:
            message_type = (
                _LIBSIGNAL_PREKEY if envelope.type == _ENVELOPE_PREKEY else _LIBSIGNAL_WHISPER
            )
            try:
                result = await self._bridge.decrypt(
                    ProtocolAddress(peer, envelope.source_device), message_type, envelope.content
                )
            except DuplicateMessage:
                log.info("dropped envelope %s from %s: already decrypted", envelope.guid, peer)
                await ack()
                return None
            except UntrustedIdentity:
                # Left stored at the intermediary, to be processed once the key is trusted.
                log.warning("kept envelope %s from %s: identity not trusted", envelope.guid, peer)
                return None
            except BridgeUnavailable:
                raise
            except SignalProtocolError as exc:
                log.warning("dropped envelope %s from %s: %s", envelope.guid, peer, exc)
                await ack()
                return None
            incoming = IncomingMessage(
                peer=peer,
                payload=result.plaintext,
                envelope_id=envelope.guid,
                record_changes=tuple(result.changes),
                identity_changes=tuple(result.identity_changes),
                device_id=envelope.source_device,
            )
            self._in_flight[envelope.guid] = _Delivery(lock, ack)
            handed_out = True
            return incoming
        finally:
            if not handed_out:
                lock.release()

    async def acknowledge(self, incoming: IncomingMessage) -> None:
        """Delete the message at the intermediary; its effect is committed."""
        delivery = self._in_flight.pop(incoming.envelope_id, None)
        if delivery is None:
            return
        delivery.lock.release()
        try:
            await delivery.ack()
        except (TigressSignalError, OSError) as exc:
            # The effect is committed and the envelope marked seen: a redelivery is dropped.
            log.warning(
                "could not acknowledge %s (%s); a copy will be dropped", incoming.envelope_id, exc
            )

    async def release(self, incoming: IncomingMessage) -> None:
        """Drop the sidecar's copies of what this message changed; it will be delivered again."""
        delivery = self._in_flight.pop(incoming.envelope_id, None)
        try:
            await self._forget(incoming.record_changes)
        finally:
            if delivery is not None:
                delivery.lock.release()

    async def close(self) -> None:
        """Stop receiving."""
        self._closed.set()

    # -- internals ------------------------------------------------------------------------------

    def _lock(self, peer: str) -> asyncio.Lock:
        return self._peer_locks.setdefault(peer, asyncio.Lock())

    async def _forget(self, changes: Sequence[RecordChange]) -> None:
        if changes:
            # A restarted sidecar has no cache to clean.
            with contextlib.suppress(BridgeUnavailable):
                await self._bridge.evict(changes)


class _Delivery:
    __slots__ = ("ack", "lock")

    def __init__(self, lock: asyncio.Lock, ack: Callable[[], Awaitable[None]]) -> None:
        self.lock = lock
        self.ack = ack


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
