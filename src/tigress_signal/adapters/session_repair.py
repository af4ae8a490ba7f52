"""Repair of broken sessions over the self-hosted channel: decryption errors and resends.

Two wallets' sessions can diverge, for instance when one of them restores its wallet folder
from an older backup: the messages the other sends then fail to decrypt. Signal answers this
with a decryption-error message, and so do we.

Receiving side (the message failed): when a Whisper or PreKey message from a peer's device
cannot be decrypted because the session is missing or out of step (no session, invalid message
or bad MAC, unknown prekey), the wallet makes libsignal's DecryptionErrorMessage for it (the
original's type, its sender device and its envelope timestamp), wraps it in a PlaintextContent
and sends it, unencrypted, as envelope type 8 to that one device. The broken envelope is first
marked processed, so a redelivery of it is dropped and never causes a second error; then it is
acknowledged, since nothing on this side can ever decrypt it. Duplicates and untrusted
identities are not session failures and get no error; a message that does not even parse names
no session and gets none either.

Sending side (the error arrives): the error names the failed message by its timestamp, which
the send log (:mod:`tigress_signal.wallet.send_log`) maps back to the message. If libsignal
says the current session with the reporting device is the broken one (its ratchet key is the
one in the error, or there is no current session), the wallet fetches a fresh prekey bundle for
that device and starts a new session (PQXDH); libsignal archives the old state. The logged
message is then sealed again, with the same transfer message id and timestamp, and put in the
outbox in the same transaction as the new session and the error's "processed" marker, so a crash
at any point neither loses the resend nor sends it twice. The receiver accepts the resend once
(the failed original was never committed there) and drops any later copy by its message id.

Limits, so that a hostile or broken peer cannot make a wallet loop: an error is never answered
with an error; each message is resent at most ``max_resends`` times; errors naming an unknown or
expired timestamp, or another device of this account, are logged and dropped; only the peer the
message went to can trigger its resend (the intermediary authenticates the sender).

A decryption-error message travels unencrypted and unauthenticated end to end (as in Signal):
the intermediary could forge one in a peer's name. The most it gains is what the limits allow:
up to ``max_resends`` new sessions with that peer (each taking one of its one-time prekeys) and
as many resent ciphertexts, all still encrypted for the peer's trusted identity.

Note:
    The intermediary requires a ciphertext for every device of the recipient, so a resend goes
    to all of the peer's devices that have a session with this wallet; devices that did
    decrypt the original drop the copy by its message id. Only the decryption error itself
    travels to one device.

Note:
    The decryption error is sent once, directly, not through the outbox: if the intermediary
    refuses it (unreachable, rate limit) it is lost, and the sender only learns of the broken
    session from the next message that fails. Messages sent with
    :meth:`~tigress_signal.adapters.selfhosted.SelfHostedChannel.send` rather than through a
    wallet's outbox are not in the send log and cannot be resent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from tigress_signal.bridge.libsignal import (
    LibsignalBridge,
    MessageType,
    PreKeyBundle,
    ProtocolAddress,
)
from tigress_signal.bridge.records import RecordChange
from tigress_signal.errors import (
    BridgeUnavailable,
    ChannelError,
    InvalidMessage,
    NoSession,
    NotFound,
    ServerApiError,
    SignalProtocolError,
    StoreError,
    TigressSignalError,
    UnknownPreKey,
)
from tigress_signal.intermediary.client import (
    AccountBundle,
    Envelope,
    IntermediaryClient,
    OutgoingMessage,
)
from tigress_signal.wallet import send_log
from tigress_signal.wallet.store import Account, WalletStore, utc_now_text

logger = logging.getLogger(__name__)

#: The envelope type of a PlaintextContent (Signal-Server's PLAINTEXT_CONTENT).
ENVELOPE_PLAINTEXT_CONTENT = 8

SealAgain = Callable[[str, bytes, int, list[RecordChange]], Awaitable[bytes]]


class SessionRepair:
    """Sends decryption errors for broken messages and resends on a new session when told.

    Args:
        store: the wallet store (send log, outbox, processed envelopes, records).
        bridge: the wallet's libsignal sidecar.
        client: the intermediary client of this wallet's device.
        account: this wallet's account.
        lock_for: the channel's lock of a peer's sessions.
        seal_again: encrypts a payload anew for the peer's devices with sessions (the peer's
            lock held), adding record changes to the list, and returns the wire form with the
            given timestamp.
        forget: drops uncommitted record changes from the sidecar's cache.
        outbox_ready: called once a resend is in the outbox, to deliver it now.
        max_resends: how often one message is resent at most.
    """

    def __init__(
        self,
        store: WalletStore,
        bridge: LibsignalBridge,
        client: IntermediaryClient,
        account: Account,
        *,
        lock_for: Callable[[str], asyncio.Lock],
        seal_again: SealAgain,
        forget: Callable[[Sequence[RecordChange]], Awaitable[None]],
        outbox_ready: Callable[[], Awaitable[None]],
        max_resends: int = 2,
    ) -> None:
        self._store = store
        self._bridge = bridge
        self._client = client
        self._account = account
        self._lock_for = lock_for
        self._seal_again = seal_again
        self._forget = forget
        self._outbox_ready = outbox_ready
        self._max_resends = max_resends

    @staticmethod
    def breaks_session(error: SignalProtocolError) -> bool:
        """Whether a decryption failure means the sessions diverged (worth an error report).

        Duplicates and untrusted identities are not; neither is a refused parameter.
        """
        return isinstance(error, InvalidMessage | NoSession | UnknownPreKey)

    # -- the receiving side: report a message that could not be decrypted -----------------------

    async def report_undecryptable(self, envelope: Envelope, message_type: int) -> None:
        """Send one decryption error about ``envelope`` to the device that sent it.

        The caller acknowledges the envelope afterwards. Failures are logged, never raised: the
        error is a courtesy to the sender, and the broken envelope is dropped either way.
        """
        peer, device_id = envelope.source_uuid, envelope.source_device

        # At most one error per broken envelope: it is marked processed before the error goes.
        try:
            with self._store.transaction() as conn:
                self._store.mark_envelope_seen(conn, envelope.guid)
        except StoreError as exc:
            logger.warning("sent no decryption error for envelope %s: %s", envelope.guid, exc)
            return

        try:
            content = await self._bridge.decryption_error(
                envelope.content, MessageType(message_type), envelope.timestamp, device_id
            )
        except SignalProtocolError as exc:
            # A message that does not parse names no session the sender could repair.
            logger.info("sent no decryption error for envelope %s: %s", envelope.guid, exc)
            return
        except BridgeUnavailable as exc:
            logger.warning("sent no decryption error for envelope %s: %s", envelope.guid, exc)
            return

        try:
            registration_id = await self._registration_id(peer, device_id)
            await self._client.send_messages(
                peer,
                [
                    OutgoingMessage(
                        type=ENVELOPE_PLAINTEXT_CONTENT,
                        destination_device_id=device_id,
                        destination_registration_id=registration_id,
                        content=content,
                    )
                ],
                timestamp=int(time.time() * 1000),
            )
        except (TigressSignalError, OSError) as exc:
            logger.warning("could not send a decryption error to %s: %s", peer, exc)
            return
        logger.info(
            "sent a decryption error to %s device %d about envelope %s",
            peer,
            device_id,
            envelope.guid,
        )

    async def _registration_id(self, peer: str, device_id: int) -> int:
        known = self._store.peer_devices(peer).get(device_id)
        if known is not None:
            return known
        # Never sent to that device (this wallet lost what it knew): its bundle says, at the
        # price of one of the peer's one-time prekeys.
        return _one_device(await self._client.fetch_bundle(peer, device_id)).registration_id

    # -- the sending side: a peer reports a message it could not decrypt ------------------------

    async def on_decryption_error(
        self, envelope: Envelope, ack: Callable[[], Awaitable[None]]
    ) -> None:
        """Handle a type-8 envelope: start a new session if needed and resend the message.

        Acknowledges the envelope once handled or dropped; leaves it at the intermediary when
        a passing failure (the intermediary or the sidecar unreachable) stopped the repair, so
        that it is tried again when the envelope comes back.

        Raises:
            BridgeUnavailable: the sidecar is down (as for a message that could not be
                decrypted for that reason; the envelope stays stored).
        """
        peer, device_id = envelope.source_uuid, envelope.source_device
        address = ProtocolAddress(peer, device_id)
        async with self._lock_for(peer):
            try:
                report = await self._bridge.read_decryption_error(address, envelope.content)
            except SignalProtocolError as exc:
                logger.warning(
                    "dropped envelope %s from %s: not a decryption error (%s)",
                    envelope.guid,
                    peer,
                    exc,
                )
                await ack()
                return
            if report.device_id != self._account.device_id:
                logger.info(
                    "dropped a decryption error from %s: it is about device %d",
                    peer,
                    report.device_id,
                )
                await ack()
                return
            logged = send_log.find(self._store.connection, peer, report.timestamp)
            if logged is None:
                logger.info(
                    "dropped a decryption error from %s: no message sent at %d is logged",
                    peer,
                    report.timestamp,
                )
                await ack()
                return
            if device_id not in self._store.peer_devices(peer):
                logger.warning(
                    "dropped a decryption error from %s: this wallet never sent to its device %d",
                    peer,
                    device_id,
                )
                await ack()
                return
            if logged.resends >= self._max_resends:
                logger.warning(
                    "dropped a decryption error from %s: message %s was resent %d times",
                    peer,
                    logged.message_id,
                    logged.resends,
                )
                await ack()
                return
            resent = await self._resend(envelope, logged, report.current_session_broken)
        if resent is None:
            return  # a passing failure: the envelope stays stored and comes back
        if resent:
            logger.info(
                "share %s: resent message %s (peer %s, device %d, resend %d of %d)",
                logged.share_id,
                logged.message_id,
                peer,
                device_id,
                logged.resends + 1,
                self._max_resends,
            )
        await ack()
        if resent:
            try:
                await self._outbox_ready()
            except (TigressSignalError, OSError) as exc:
                logger.warning("the resend of %s stays in the outbox: %s", logged.message_id, exc)

    async def _resend(
        self, envelope: Envelope, logged: send_log.LoggedMessage, new_session: bool
    ) -> bool | None:
        """Seal the logged message again and store it in the outbox (the peer's lock held).

        Returns:
            True when the resend is stored, False when it was refused for good (the envelope
            is to be acknowledged), None after a passing failure (it is to stay stored).
        """
        peer, device_id = envelope.source_uuid, envelope.source_device
        changes: list[RecordChange] = []
        registration_id: int | None = None
        try:
            if new_session:
                device = _one_device(await self._client.fetch_bundle(peer, device_id))
                address = ProtocolAddress(peer, device_id)
                # libsignal archives the broken state and makes the new one current.
                changes.extend((await self._bridge.process_prekey_bundle(address, device)).changes)
                registration_id = device.registration_id
            wire = await self._seal_again(peer, logged.payload, logged.sent_at_ms, changes)
            with self._store.transaction() as conn:
                self._store.apply_changes(conn, changes)
                if registration_id is not None:
                    self._store.save_peer_device(conn, peer, device_id, registration_id)
                conn.execute(
                    "INSERT INTO outbox (message_id, share_id, peer, wire, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        f"resend:{logged.resends + 1}:{logged.message_id}",
                        logged.share_id,
                        peer,
                        wire,
                        utc_now_text(),
                    ),
                )
                send_log.count_resend(conn, peer, logged.sent_at_ms)
                self._store.mark_envelope_seen(conn, envelope.guid)
        except NotFound as exc:
            await self._forget(changes)
            logger.warning("will not resend message %s to %s: %s", logged.message_id, peer, exc)
            return False
        except (ServerApiError, ChannelError, BridgeUnavailable, StoreError, OSError) as exc:
            await self._forget(changes)
            logger.warning(
                "could not resend message %s to %s now: %s", logged.message_id, peer, exc
            )
            return None
        except SignalProtocolError as exc:
            # An untrusted identity or a bundle that does not verify: no new session here.
            await self._forget(changes)
            logger.warning("will not resend message %s to %s: %s", logged.message_id, peer, exc)
            return False
        except BaseException:
            await self._forget(changes)
            raise
        return True


def _one_device(bundle: AccountBundle) -> PreKeyBundle:
    """The bundle of the one device asked for."""
    if len(bundle.devices) != 1:
        raise ChannelError(f"asked for one device's bundle, got {len(bundle.devices)}")
    return bundle.devices[0]
