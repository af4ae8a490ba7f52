"""The CredentialChannel over the self-hosted intermediary, with libsignal doing the crypto.

Sending: on first contact with a peer, fetch its prekey bundle and set up a PQXDH session; then
encrypt for each of the peer's devices, commit the new session state, and hand the ciphertexts
to the intermediary.

Receiving: hold a WebSocket to the intermediary; after every (re)connect, first catch up over
REST on whatever was stored meanwhile, then take pushed messages. Each message is decrypted
under the peer's lock and handed to the wallet with the records its decryption changed; the
lock is held until the wallet acknowledges (its effect is committed) or releases it, so no other
operation for that peer can interleave with the session update.

Identity changes: an envelope whose sender's identity key the trust policy refuses is kept in
the wallet (``held_envelopes``, committed before the intermediary is told to delete it), and so
is every later envelope of that sender, to keep their order; :meth:`SelfHostedChannel.replay_held`
hands them out once the key is trusted. A refused key (from such an envelope or from a bundle)
is remembered as the newest key seen for the peer, for its safety number.

Devices: a peer is sent to on the devices its bundle listed at first contact; when the
intermediary answers 409 (devices missing or extra) or 410 (devices registered again), delivery
corrects the list, sets up sessions with the new devices and retries.

Broken sessions: a message that cannot be decrypted because the sessions diverged is answered
with a decryption-error message (envelope type 8), and such an error from a peer makes this
wallet start a new session and resend the message; see :mod:`.session_repair`. Each sealed
message a wallet stores is logged for that (:meth:`SelfHostedChannel.remember_sent`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tigress_signal.adapters.session_repair import SessionRepair
from tigress_signal.bridge.libsignal import (
    EncryptResult,
    LibsignalBridge,
    PreKeyBundle,
    ProtocolAddress,
    SessionResult,
)
from tigress_signal.bridge.records import IdentityChanged, RecordChange
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
    StoreError,
    TigressSignalError,
    UnknownPeer,
    UntrustedIdentity,
)
from tigress_signal.intermediary.client import Envelope, IntermediaryClient, OutgoingMessage
from tigress_signal.wallet import send_log
from tigress_signal.wallet.store import Account, HeldEnvelope, WalletStore

log = logging.getLogger(__name__)

# The intermediary's envelope types and libsignal's message types for the same two messages.
_ENVELOPE_CIPHERTEXT = 1
_ENVELOPE_PREKEY = 3
_ENVELOPE_PLAINTEXT_CONTENT = 8
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
        resend_log_seconds: how long a sent message stays in the send log (0: not at all).
        max_resends: how often one message is sent again, at most, after decryption errors.

    Attributes:
        on_outbox: called after a resend was put in the wallet's outbox, to deliver it now
            (the wallet sets it to its share service's outbox delivery); without it, the
            outbox's own retry loop delivers it.
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
        resend_log_seconds: int = 3600,
        max_resends: int = 2,
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
        self._last_timestamp = 0
        self._resend_log_seconds = resend_log_seconds
        self.on_outbox: Callable[[], Awaitable[None]] | None = None
        self._repair = SessionRepair(
            store,
            bridge,
            client,
            account,
            lock_for=self._lock,
            seal_again=self._seal_again,
            forget=self._forget,
            outbox_ready=self._outbox_ready,
            max_resends=max_resends,
        )

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
            messages = await self._encrypt_for_devices(peer, payload, changes)
        except BaseException:
            await self._forget(changes)
            if not held:
                lock.release()
            raise
        wire = _wire(self._next_timestamp(), messages, payload)
        sealed = SealedMessage(peer, wire, tuple(changes))
        self._sealed[id(sealed)] = lock if not held else None
        return sealed

    async def _encrypt_for_devices(
        self, peer: str, payload: bytes, changes: list[RecordChange]
    ) -> list[dict[str, object]]:
        """Encrypt for every device of ``peer`` with a session (starting sessions on first
        contact), adding the record changes to ``changes``; the peer's lock must be held."""
        devices = {
            device_id: registration_id
            for device_id, registration_id in self._store.peer_devices(peer).items()
            if self._store.has_record("session", f"{peer}.{device_id}")
        }
        if not devices:
            devices = await self._start_sessions(peer, changes)
        messages: list[dict[str, object]] = []
        for device_id, registration_id in sorted(devices.items()):
            result = await self._encrypt(ProtocolAddress(peer, device_id), payload)
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
        return messages

    async def _seal_again(
        self, peer: str, payload: bytes, timestamp: int, changes: list[RecordChange]
    ) -> bytes:
        """The wire form of a resend: the logged payload, encrypted anew, its old timestamp."""
        return _wire(timestamp, await self._encrypt_for_devices(peer, payload, changes), payload)

    def _next_timestamp(self) -> int:
        """Now in ms, but always after the previous message's: a peer's decryption error names
        a message by its timestamp, so no two messages of this wallet may share one."""
        self._last_timestamp = max(int(time.time() * 1000), self._last_timestamp + 1)
        return self._last_timestamp

    def remember_sent(
        self, conn: sqlite3.Connection, sealed: SealedMessage, *, message_id: str, share_id: str
    ) -> None:
        """Log a stored sealed message in the send log, so it can be resent on a new session."""
        timestamp, payload = _timestamp_and_payload(sealed)
        send_log.record(
            conn,
            send_log.LoggedMessage(sealed.peer, timestamp, message_id, share_id, payload, 0),
            keep_seconds=self._resend_log_seconds,
        )

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
                    self._refuse_if_untrusted(peer)
                    bundle = await self._client.fetch_bundle(peer, device_id)
                    (device,) = bundle.devices
                    address = ProtocolAddress(peer, device_id)
                    # For a re-registered device libsignal archives the old session state and
                    # starts a new one from the fresh bundle.
                    changes.extend((await self._process_bundle(address, device)).changes)
                    result = await self._encrypt(address, payload)
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
        self._refuse_if_untrusted(peer)
        try:
            bundle = await self._client.fetch_bundle(peer)
        except NotFound as exc:
            raise UnknownPeer(f"the intermediary has no account {peer}") from exc
        except ServerApiError as exc:
            raise ChannelError(f"cannot fetch the prekey bundle of {peer}: {exc}") from exc
        devices: dict[int, int] = {}
        for device in bundle.devices:
            address = ProtocolAddress(peer, device.device_id)
            result = await self._process_bundle(address, device)
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
                    self._purge_send_log()
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
        if envelope.type == _ENVELOPE_PLAINTEXT_CONTENT:
            # A decryption-error report: never yielded, never answered with another one.
            await self._repair.on_decryption_error(envelope, ack)
            return None
        lock = self._lock(peer)
        await lock.acquire()
        handed_out = False
        try:
            message_type = (
                _LIBSIGNAL_PREKEY if envelope.type == _ENVELOPE_PREKEY else _LIBSIGNAL_WHISPER
            )
            if self._store.holds_for(peer):
                # Behind a held envelope of the same sender: keep the order, hold this one too.
                await self._hold(envelope, message_type, ack, None)
                return None
            try:
                result = await self._bridge.decrypt(
                    ProtocolAddress(peer, envelope.source_device), message_type, envelope.content
                )
            except DuplicateMessage:
                log.info("dropped envelope %s from %s: already decrypted", envelope.guid, peer)
                await ack()
                return None
            except UntrustedIdentity as exc:
                await self._hold(envelope, message_type, ack, exc.identity_key)
                return None
            except BridgeUnavailable:
                raise
            except SignalProtocolError as exc:
                log.warning("dropped envelope %s from %s: %s", envelope.guid, peer, exc)
                if SessionRepair.breaks_session(exc):
                    await self._repair.report_undecryptable(envelope, message_type)
                await ack()
                return None
            _warn_identity_changes(result.identity_changes)
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

    # -- envelopes held while a sender's identity key is not trusted ----------------------------

    async def _hold(
        self,
        envelope: Envelope,
        message_type: int,
        ack: Callable[[], Awaitable[None]],
        identity_key: bytes | None,
    ) -> None:
        """Keep an envelope whose sender is not trusted; stored first, then acknowledged."""
        peer = envelope.source_uuid or ""
        try:
            with self._store.transaction() as conn:
                self._store.hold_envelope(
                    conn,
                    HeldEnvelope(
                        envelope.guid, peer, envelope.source_device, message_type, envelope.content
                    ),
                )
                if identity_key is not None:
                    self._store.note_identity_seen(conn, peer, identity_key)
        except StoreError as exc:
            # Not acknowledged: the intermediary keeps it and delivers it again.
            log.warning("could not keep envelope %s from %s now: %s", envelope.guid, peer, exc)
            return
        log.warning(
            "kept envelope %s from %s until its identity key is trusted", envelope.guid, peer
        )
        try:
            await ack()
        except (TigressSignalError, OSError) as exc:
            # Stored already: a redelivered copy finds it held and is acknowledged then.
            log.warning("could not acknowledge held envelope %s (%s)", envelope.guid, exc)

    async def replay_held(self, peer: str | None = None) -> AsyncIterator[IncomingMessage]:
        """Yield held envelopes whose sender's key is trusted now, oldest first per sender.

        Each is decrypted once: one already processed is removed unread, and one handed out
        leaves the held table only when :meth:`acknowledge` is called (after its effect is
        committed). A sender whose key is still refused, or whose message was released, keeps
        the rest of its envelopes held, in order, for a later call.
        """
        stopped: set[str] = set()
        while not self._closed.is_set():
            waiting = [h for h in self._store.held_envelopes(peer) if h.peer not in stopped]
            if not waiting:
                return
            held = waiting[0]
            incoming = await self._open_held(held)
            if incoming is None:
                if self._store.is_held(held.envelope_id):
                    stopped.add(held.peer)
                continue
            yield incoming
            if self._store.is_held(held.envelope_id):
                stopped.add(held.peer)  # released, not acknowledged: try again another time

    async def _open_held(self, held: HeldEnvelope) -> IncomingMessage | None:
        """Decrypt one held envelope; None when it stays held or was removed."""
        if held.envelope_id in self._in_flight:
            return None
        if self._store.envelope_seen(held.envelope_id):
            self._drop_held(held.envelope_id)
            return None
        lock = self._lock(held.peer)
        await lock.acquire()
        handed_out = False
        try:
            # Another replay may have taken it while this one waited for the lock.
            if held.envelope_id in self._in_flight or not self._store.is_held(held.envelope_id):
                return None
            if self._store.envelope_seen(held.envelope_id):
                self._drop_held(held.envelope_id)
                return None
            try:
                result = await self._bridge.decrypt(
                    ProtocolAddress(held.peer, held.source_device),
                    held.message_type,
                    held.content,
                )
            except UntrustedIdentity as exc:
                # Still refused: the sender's key changed again after the one the user trusted
                # (or was never trusted). A key still waiting for the user's decision was seen
                # later than this envelope's, so only an empty slot takes this one.
                if exc.identity_key is not None and self._store.identity_seen(held.peer) is None:
                    with self._store.transaction() as conn:
                        self._store.note_identity_seen(conn, held.peer, exc.identity_key)
                return None
            except BridgeUnavailable:
                raise
            except SignalProtocolError as exc:
                # The same choice as for a live envelope: one that cannot be decrypted (or
                # was decrypted already) is dropped, so it cannot block the ones behind it.
                log.warning(
                    "dropped held envelope %s from %s: %s", held.envelope_id, held.peer, exc
                )
                self._drop_held(held.envelope_id)
                return None
            _warn_identity_changes(result.identity_changes)
            incoming = IncomingMessage(
                peer=held.peer,
                payload=result.plaintext,
                envelope_id=held.envelope_id,
                record_changes=tuple(result.changes),
                identity_changes=tuple(result.identity_changes),
                device_id=held.source_device,
            )
            self._in_flight[held.envelope_id] = _Delivery(lock, self._held_ack(held.envelope_id))
            handed_out = True
            log.info("took held envelope %s from %s", held.envelope_id, held.peer)
            return incoming
        finally:
            if not handed_out:
                lock.release()

    def _held_ack(self, envelope_id: str) -> Callable[[], Awaitable[None]]:
        async def acknowledge() -> None:
            self._drop_held(envelope_id)

        return acknowledge

    def _drop_held(self, envelope_id: str) -> None:
        with self._store.transaction() as conn:
            self._store.release_held(conn, envelope_id)

    # -- internals ------------------------------------------------------------------------------

    async def _process_bundle(
        self, address: ProtocolAddress, device: PreKeyBundle
    ) -> SessionResult:
        """Start a session from a bundle; a refused identity key is noted as the newest seen."""
        try:
            result = await self._bridge.process_prekey_bundle(address, device)
        except UntrustedIdentity as exc:
            self._note_refused(exc)
            raise
        _warn_identity_changes(result.identity_changes)
        return result

    async def _encrypt(self, address: ProtocolAddress, payload: bytes) -> EncryptResult:
        try:
            return await self._bridge.encrypt(address, payload)
        except UntrustedIdentity as exc:
            self._note_refused(exc)
            raise

    def _refuse_if_untrusted(self, peer: str) -> None:
        """Refuse, without asking the server, to start a session with a refused key.

        A key the trust policy refused stays noted until the user trusts it. Fetching the
        bundle again meanwhile would only meet the same refusal, and each fetch takes one of
        the peer's one-time prekeys and a permit of the server's bundle rate limit, so outbox
        retries would drain both while the user compares safety numbers.
        """
        refused = self._store.identity_seen(peer)
        if refused is not None:
            raise UntrustedIdentity(
                f"identity key of {peer} is not trusted", peer=peer, identity_key=refused
            )

    def _note_refused(self, refused: UntrustedIdentity) -> None:
        if refused.identity_key is not None and refused.peer:
            with self._store.transaction() as conn:
                self._store.note_identity_seen(conn, refused.peer, refused.identity_key)

    def _lock(self, peer: str) -> asyncio.Lock:
        return self._peer_locks.setdefault(peer, asyncio.Lock())

    async def _outbox_ready(self) -> None:
        if self.on_outbox is not None:
            await self.on_outbox()

    def _purge_send_log(self) -> None:
        try:
            with self._store.transaction() as conn:
                purged = send_log.purge_expired(conn)
        except StoreError as exc:
            log.warning("could not purge the send log now: %s", exc)
            return
        if purged:
            log.info("deleted %d expired send log entries", purged)

    async def _forget(self, changes: Sequence[RecordChange]) -> None:
        if changes:
            # A restarted sidecar has no cache to clean.
            with contextlib.suppress(BridgeUnavailable):
                await self._bridge.evict(changes)


def _wire(timestamp: int, messages: list[dict[str, object]], payload: bytes) -> bytes:
    """A sealed message's wire form: its timestamp, one ciphertext per device, and the payload.

    The payload travels with the ciphertexts so that a device the intermediary reports as
    missing or re-registered (409/410) can be given its own ciphertext at delivery.
    """
    document = {
        "timestamp": timestamp,
        "messages": messages,
        "payload": base64.b64encode(payload).decode("ascii"),
    }
    return json.dumps(document).encode("ascii")


def _timestamp_and_payload(sealed: SealedMessage) -> tuple[int, bytes]:
    try:
        document = json.loads(sealed.wire)
        return int(document["timestamp"]), base64.b64decode(document["payload"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ChannelError(f"a sealed message to {sealed.peer} is damaged: {exc}") from exc


class _Delivery:
    __slots__ = ("ack", "lock")

    def __init__(self, lock: asyncio.Lock, ack: Callable[[], Awaitable[None]]) -> None:
        self.lock = lock
        self.ack = ack


def _warn_identity_changes(changes: Sequence[IdentityChanged]) -> None:
    # Only a wallet under the `always` policy gets here with a changed key; the others refuse it.
    for change in changes:
        log.warning(
            "the identity key of %s changed; trusted under the 'always' policy", change.peer
        )


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
