"""Runs shares for one wallet: offers, answers, and the messages that drive them.

:class:`ShareService` is what a wallet application talks to. Every user action (offer, accept,
decline, cancel) and every incoming transfer message becomes a step (:mod:`.steps`), carried
out in three phases:

1. work out the step by reading the wallet, and seal its reply with the channel (for the
   self-hosted channel: encrypt it, holding the peer's session);
2. in one wallet transaction, store together: the libsignal records the incoming message's
   decryption changed, the "seen" markers that make a redelivery harmless, the share change,
   the libsignal records the sealing changed, and the sealed reply in the outbox;
3. acknowledge the incoming message, then deliver the outbox.

So a crash at any point leaves a share before or after a step, never half-way; a reply stored
before a crash is delivered after the restart as the same bytes, which the peer drops as a
copy. The service knows nothing about how messages travel: it uses a
:class:`~tigress_signal.channel.CredentialChannel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydantic import ValidationError

from tigress_signal.channel import CredentialChannel, IncomingMessage, SealedMessage
from tigress_signal.credentials import (
    ACCESS_TOKEN_MEDIA_TYPE,
    DIGITAL_KEY_MEDIA_TYPE,
    AccessTokenIssuer,
    DigitalKeyHolder,
    Endorsement,
    KeyOwner,
    Offer,
    ProvisioningInformation,
    TransferEnvelope,
    TransferMessage,
    decode_transfer,
    encode_transfer,
)
from tigress_signal.credentials.messages import check_lock_id, describe_validation_error
from tigress_signal.errors import (
    CredentialError,
    RateLimited,
    ShareError,
    ShareExpired,
    TigressSignalError,
    UnknownPeer,
    UnknownShare,
)
from tigress_signal.faults import crash_point
from tigress_signal.shares import steps
from tigress_signal.shares.states import ShareState
from tigress_signal.shares.steps import Step
from tigress_signal.shares.view import (
    SHARE_COLUMNS,
    DigitalKey,
    Share,
    StoredCredential,
    load_share,
    share_from_row,
    stored_offer,
)
from tigress_signal.wallet import send_log
from tigress_signal.wallet.store import WalletStore, utc_now_text

log = logging.getLogger(__name__)

__all__ = ["DigitalKey", "DigitalKeyTerms", "Share", "ShareService", "StoredCredential"]

#: How long an offer stays open unless the sender says otherwise.
DEFAULT_SHARE_LIFETIME = timedelta(days=2)
#: Pauses between attempts to deliver what stays in the outbox: first, and at most (seconds).
OUTBOX_RETRY_FIRST = 0.5
OUTBOX_RETRY_MAX = 30.0
#: The issuer name on access tokens a wallet issues unless told otherwise.
DEFAULT_ISSUER = "tigress-signal sample venue"


class _HasPrivatePem(Protocol):
    def private_key_pem(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class DigitalKeyTerms:
    """What the owner grants with a digital key.

    Attributes:
        lock_id: the lock the key opens.
        rights: what the key may do there, e.g. ``("unlock",)``.
        not_before: start of validity.
        not_after: end of validity.
    """

    lock_id: str
    rights: tuple[str, ...]
    not_before: datetime
    not_after: datetime


class ShareService:
    """The shares of one wallet, driven by its user and by one channel.

    Args:
        store: the wallet store.
        channel: the channel transfer messages travel over.
        clock: the current time (injectable for tests of expiry).
        device_id: this wallet's device id within its account (1 for a wallet whose channel
            has no devices); a message naming another device of the account is not for it.
    """

    def __init__(
        self,
        store: WalletStore,
        channel: CredentialChannel,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        device_id: int = 1,
    ) -> None:
        self._store = store
        self._channel = channel
        self._device_id = device_id
        self._clock = clock
        self._changed = asyncio.Condition()
        self._outbox_lock = asyncio.Lock()
        self._outbox_not_before = 0.0
        self._last_activity = time.monotonic()
        self._busy = False

    # -- offers (sender side) -----------------------------------------------------------------

    async def offer_provisioning(
        self,
        peer: str,
        provisioning: ProvisioningInformation,
        *,
        title: str,
        description: str = "",
        lifetime: timedelta = DEFAULT_SHARE_LIFETIME,
    ) -> Share:
        """Offer a stateless credential: the offer itself carries the provisioning information.

        Args:
            peer: the receiving wallet.
            provisioning: the credential's bytes and media type.
            title: one line the receiver sees.
            description: more text the receiver sees.
            lifetime: how long the offer stays redeemable.

        Returns:
            The new share, in state ``offered``.
        """
        offer = _checked_offer(
            share_id=uuid.uuid4(),
            flow="stateless",
            credential_format=provisioning.media_type,
            title=title,
            description=description,
            expires_at=self._clock() + lifetime,
            provisioning=provisioning,
        )
        return await self._start_offer(peer, offer, private=b"")

    async def offer_digital_key(
        self,
        peer: str,
        terms: DigitalKeyTerms,
        *,
        title: str,
        description: str = "",
        lifetime: timedelta = DEFAULT_SHARE_LIFETIME,
    ) -> Share:
        """Offer a stateful digital key: the receiver's device makes the key, this wallet signs it.

        The owner's signing key for ``terms.lock_id`` is created in this wallet on first use;
        :meth:`owner_public_key` gives its public half for the lock.
        """
        _check_terms(terms)
        offer = _checked_offer(
            share_id=uuid.uuid4(),
            flow="stateful",
            credential_format=DIGITAL_KEY_MEDIA_TYPE,
            title=title,
            description=description,
            expires_at=self._clock() + lifetime,
            provisioning=None,
        )
        private = json.dumps(
            {
                "lock_id": terms.lock_id,
                "rights": list(terms.rights),
                "not_before": terms.not_before.isoformat(),
                "not_after": terms.not_after.isoformat(),
            }
        ).encode()
        self.owner_key(terms.lock_id)
        return await self._start_offer(peer, offer, private=private)

    async def _start_offer(self, peer: str, offer: Offer, *, private: bytes) -> Share:
        envelope = self._envelope(offer)
        step = steps.plan_offer(peer, offer, envelope, private)
        try:
            await self._carry_out(step, reply_envelope=envelope, must_deliver=True)
        except TigressSignalError as exc:
            # Stored but not delivered: the caller must know the offer still goes out later.
            stored = self._store.connection.execute(
                "SELECT 1 FROM shares WHERE share_id = ?", (step.share_id,)
            ).fetchone()
            if stored is not None:
                exc.stored_share = step.share_id
            raise
        return self.share(step.share_id)

    # -- user answers (receiver side) and cancel ------------------------------------------------

    async def accept(self, share_id: str) -> Share:
        """Accept a received offer.

        Stateless: the credential is stored and ``Accepted`` is sent. Stateful: this device
        makes a key pair and sends a key signing request; the share completes when the
        endorsement arrives.

        Raises:
            UnknownShare: no such share.
            InvalidTransition: the share is not a received offer waiting for an answer.
            ShareExpired: the offer has expired.
        """
        self._expire_if_due(share_id)
        await self._carry_out(steps.plan_accept(self._store.connection, share_id))
        return self.share(share_id)

    async def decline(self, share_id: str, reason: str | None = None) -> Share:
        """Decline a received offer and tell the sender."""
        await self._carry_out(steps.plan_decline(self._store.connection, share_id, reason))
        return self.share(share_id)

    async def cancel(self, share_id: str, reason: str | None = None) -> Share:
        """Withdraw from a share that has not ended, on either side, and tell the peer."""
        await self._carry_out(steps.plan_cancel(self._store.connection, share_id, reason))
        return self.share(share_id)

    # -- incoming messages ----------------------------------------------------------------------

    async def run(self) -> None:
        """Process incoming messages until the channel closes; one bad message never stops it.

        Meanwhile, whatever stays in the outbox (the intermediary was unreachable, say) is
        delivered again with growing pauses, so an outage delays a transfer but never loses it.
        """
        retrying = asyncio.create_task(self._retry_outbox(), name="outbox retry")
        try:
            await self.deliver_outbox()
            # Messages kept for a sender trusted since (say the process stopped mid-way).
            with contextlib.suppress(TigressSignalError):
                await self.process_held()
            async for incoming in self._channel.receive():
                await self.handle(incoming)
        finally:
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying

    async def process_held(self, peer: str | None = None) -> int:
        """Process the messages the channel kept while their sender's key was not trusted.

        Each is processed like a newly arrived one (:meth:`handle`), oldest first, exactly
        once; messages of senders still not trusted stay kept.

        Args:
            peer: only this sender's messages; every sender's when None.

        Returns:
            How many kept messages were taken up.
        """
        taken = 0
        async for incoming in self._channel.replay_held(peer):
            await self.handle(incoming)
            taken += 1
        return taken

    async def _retry_outbox(self) -> None:
        delay = OUTBOX_RETRY_FIRST
        while True:
            await asyncio.sleep(max(delay, self._outbox_not_before - time.monotonic()))
            if self._outbox_size() == 0:
                delay = OUTBOX_RETRY_FIRST
                continue
            with contextlib.suppress(TigressSignalError):
                await self.deliver_outbox()
            delay = (
                OUTBOX_RETRY_FIRST
                if self._outbox_size() == 0
                else min(delay * 2, OUTBOX_RETRY_MAX)
            )

    def _outbox_size(self) -> int:
        return int(self._store.connection.execute("SELECT count(*) FROM outbox").fetchone()[0])

    async def handle(self, incoming: IncomingMessage) -> None:
        """Process one incoming message: store its effect, acknowledge it, deliver any reply.

        A message that does not parse or does not fit its share's state is refused (logged,
        acknowledged, no share changes); the libsignal state its decryption produced is still
        stored, since the message was consumed.
        """
        self._busy = True
        try:
            step = self._plan_incoming(incoming)
            crash_point("receive:decrypted", _detail(step))
            await self._carry_out(step, incoming=incoming)
        except TigressSignalError as exc:
            # Released, not acknowledged: the intermediary keeps it and delivers it again.
            log.warning(
                "could not process envelope %s from %s now: %s",
                incoming.envelope_id,
                incoming.peer,
                exc.user_message(),
            )
        finally:
            self._busy = False
            self._last_activity = time.monotonic()

    def _plan_incoming(self, incoming: IncomingMessage) -> Step | _Refused:
        try:
            envelope = decode_transfer(incoming.payload)
        except CredentialError as exc:
            log.warning("refused a message from %s: %s", incoming.peer, exc)
            return _Refused(None, "")
        name = envelope.body.type
        share_id = str(envelope.body.share_id)
        if self._store.message_seen(self._store.connection, str(envelope.message_id)):
            log.info("dropped a copy of message %s (share %s)", envelope.message_id, share_id)
            return _Refused(None, "")
        try:
            return steps.plan_message(
                self._store.connection,
                incoming.peer,
                envelope,
                self._clock(),
                self.owner_key,
                device_id=incoming.device_id,
                own_device=self._device_id,
            )
        except (ShareError, CredentialError) as exc:
            log.warning("refused %s for share %s from %s: %s", name, share_id, incoming.peer, exc)
            expired = isinstance(exc, ShareExpired)
            return _Refused(str(envelope.message_id), share_id if expired else "")

    # -- carrying out a step ---------------------------------------------------------------------

    async def _carry_out(
        self,
        step: Step | _Refused,
        *,
        incoming: IncomingMessage | None = None,
        reply_envelope: TransferEnvelope | None = None,
        must_deliver: bool = False,
    ) -> None:
        """Seal the step's reply, store everything in one transaction, acknowledge, deliver."""
        started = time.perf_counter()
        sealed: SealedMessage | None = None
        reply_id: str | None = None
        stored = False
        try:
            if isinstance(step, Step) and step.reply is not None:
                envelope = reply_envelope or self._envelope(step.reply)
                reply_id = str(envelope.message_id)
                sealed = await self._channel.seal(
                    step.peer, encode_transfer(envelope), summary=step.summary, during=incoming
                )
                crash_point("send:sealed", _detail(step))
            with self._store.transaction() as conn:
                if incoming is not None:
                    self._store.apply_changes(conn, incoming.record_changes)
                    self._store.mark_envelope_seen(conn, incoming.envelope_id)
                if isinstance(step, _Refused):
                    self._record_refusal(conn, step)
                else:
                    if incoming is not None:
                        self._store.mark_message_seen(conn, _message_id(incoming))
                    steps.check_expected(conn, step)
                    for write in step.writes:
                        write(conn)
                    if sealed is not None and reply_id is not None:
                        self._store.apply_changes(conn, sealed.record_changes)
                        conn.execute(
                            "INSERT INTO outbox (message_id, share_id, peer, wire, created_at)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (reply_id, step.share_id, step.peer, sealed.wire, utc_now_text()),
                        )
                        self._channel.remember_sent(
                            conn, sealed, message_id=reply_id, share_id=step.share_id
                        )
                    send_log.forget_ended_share(conn, step.share_id, keep=reply_id)
            stored = True
        finally:
            if sealed is not None:
                await self._channel.settle(sealed, stored=stored)
            if incoming is not None and not stored:
                await self._channel.release(incoming)
        if incoming is not None:
            crash_point("receive:committed", _detail(step))
            await self._channel.acknowledge(incoming)
            crash_point("receive:acknowledged", _detail(step))
        elif sealed is not None:
            crash_point("send:committed", _detail(step))
        if isinstance(step, Step):
            self._log_step(step.share_id, step.name, step.peer, started)
        await self._notify()
        await self.deliver_outbox(must_deliver=reply_id if must_deliver else None)

    def _record_refusal(self, conn: sqlite3.Connection, refused: _Refused) -> None:
        if refused.message_id is not None:
            self._store.mark_message_seen(conn, refused.message_id)
        if refused.expired_share:
            # An expired share is recorded as such when a message for it comes too late.
            row = conn.execute(
                "SELECT state FROM shares WHERE share_id = ?", (refused.expired_share,)
            ).fetchone()
            if row is not None and not ShareState(str(row[0])).is_final:
                steps.set_state(conn, refused.expired_share, ShareState.EXPIRED)
                send_log.forget_ended_share(conn, refused.expired_share, keep=None)

    # -- the outbox -------------------------------------------------------------------------------

    async def deliver_outbox(self, *, must_deliver: str | None = None) -> None:
        """Deliver every stored sealed message, oldest first; each leaves the outbox once taken.

        A message that cannot be delivered now stays for the next call, except one to a peer
        the channel does not know: that one is dropped and its share cancelled.

        Args:
            must_deliver: a message id whose failure is raised to the caller (the others'
                failures are only logged).

        Raises:
            TigressSignalError: delivering ``must_deliver`` failed (UnknownPeer, ChannelError,
                UntrustedIdentity, ...). A rate limit is not a failure: the message stays in
                the outbox and goes out once the server's Retry-After has passed.
        """
        failure: TigressSignalError | None = None
        if time.monotonic() < self._outbox_not_before:
            return  # still inside a Retry-After; the retry loop comes back
        async with self._outbox_lock:
            rows = self._store.connection.execute(
                "SELECT message_id, share_id, peer, wire FROM outbox ORDER BY seq"
            ).fetchall()
            for message_id, share_id, peer, wire in rows:
                try:
                    await self._channel.deliver(SealedMessage(peer, bytes(wire)))
                except RateLimited as exc:
                    # Nothing more goes out before the server's Retry-After has passed.
                    wait = exc.retry_after if exc.retry_after is not None else OUTBOX_RETRY_FIRST
                    self._outbox_not_before = time.monotonic() + wait
                    log.warning("the intermediary asked to wait %.1f s before sending more", wait)
                    # Not a failure of the caller's step: it is stored and goes out later.
                    break
                except UnknownPeer as exc:
                    self._drop_from_outbox(message_id, share_id, cancel_share=True)
                    log.warning("dropped message %s: %s", message_id, exc)
                    failure = exc if message_id == must_deliver else failure
                    continue
                except TigressSignalError as exc:
                    log.warning("message %s to %s stays in the outbox: %s", message_id, peer, exc)
                    failure = exc if message_id == must_deliver else failure
                    continue
                crash_point("send:delivered")
                self._drop_from_outbox(message_id, share_id, cancel_share=False)
        if failure is not None:
            raise failure

    def _drop_from_outbox(self, message_id: str, share_id: str, *, cancel_share: bool) -> None:
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))
            if cancel_share:
                steps.set_state(conn, share_id, ShareState.CANCELLED)
                send_log.forget_ended_share(conn, share_id, keep=None)

    def _envelope(self, message: TransferMessage) -> TransferEnvelope:
        return TransferEnvelope(message_id=uuid.uuid4(), sent_at=self._clock(), body=message)

    # -- reading ------------------------------------------------------------------------------

    def share(self, share_id: str) -> Share:
        """One share of this wallet.

        Raises:
            UnknownShare: no such share.
        """
        return load_share(self._store.connection, share_id)

    def shares(self) -> list[Share]:
        """Every share of this wallet, newest first."""
        rows = self._store.connection.execute(
            f"SELECT {SHARE_COLUMNS} FROM shares ORDER BY created_at DESC"  # noqa: S608
        ).fetchall()
        return [share_from_row(row) for row in rows]

    def offer(self, share_id: str) -> Offer:
        """The offer behind a share (its display information and, if stateless, provisioning)."""
        return stored_offer(self._store.connection, share_id)

    def credential(self, share_id: str) -> StoredCredential:
        """The credential a share delivered.

        Raises:
            UnknownShare: no credential was stored for that share.
        """
        row = self._store.connection.execute(
            "SELECT share_id, media_type, filename, content, from_peer FROM credentials"
            " WHERE share_id = ?",
            (share_id,),
        ).fetchone()
        if row is None:
            state = self._store.connection.execute(
                "SELECT state FROM shares WHERE share_id = ?", (share_id,)
            ).fetchone()
            if state is not None and state[0] == ShareState.TAKEN.value:
                raise UnknownShare(
                    f"share {share_id} was taken by another device of this account;"
                    " the credential is on that device"
                )
            raise UnknownShare(f"no credential stored for share {share_id}")
        return StoredCredential(row[0], row[1], row[2], bytes(row[3]), row[4])

    def credentials(self) -> list[StoredCredential]:
        """Every credential this wallet received."""
        rows = self._store.connection.execute(
            "SELECT share_id, media_type, filename, content, from_peer FROM credentials"
            " ORDER BY received_at"
        ).fetchall()
        return [StoredCredential(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def existing_owner_key(self, lock_id: str) -> KeyOwner:
        """The owner key this wallet already holds for a lock.

        Raises:
            CredentialError: this wallet never offered a key to that lock.
        """
        row = self._store.connection.execute(
            "SELECT private_key_pem FROM signing_keys WHERE name = ?", (f"lock:{lock_id}",)
        ).fetchone()
        if row is None:
            raise CredentialError(
                f"this wallet holds no owner key for lock {lock_id!r}",
                hint="use the wallet that offered keys to this lock",
            )
        return KeyOwner.from_private_key_pem(bytes(row[0]))

    def owner_key(self, lock_id: str, conn: sqlite3.Connection | None = None) -> KeyOwner:
        """This wallet's owner signing key for a lock, created on first use."""
        pem = self._signing_key(f"lock:{lock_id}", KeyOwner.generate, conn)
        return KeyOwner.from_private_key_pem(pem)

    def access_token_issuer(self, issuer: str = DEFAULT_ISSUER) -> AccessTokenIssuer:
        """This wallet's access-token issuer, its signing key created on first use.

        Args:
            issuer: the venue's name as the tokens state it.
        """
        pem = self._signing_key(
            "access-token-issuer", lambda: AccessTokenIssuer.generate(issuer), None
        )
        return AccessTokenIssuer.from_private_key_pem(issuer, pem)

    async def offer_access_token(
        self,
        peer: str,
        scope: Sequence[str],
        *,
        title: str,
        description: str = "",
        valid_for: timedelta = DEFAULT_SHARE_LIFETIME,
        lifetime: timedelta = DEFAULT_SHARE_LIFETIME,
    ) -> Share:
        """Issue an access token for ``peer`` with this wallet's issuer key, and offer it.

        Args:
            peer: the receiving wallet.
            scope: what the token grants, e.g. ``["room:1207"]``.
            title: one line the receiver sees.
            description: more text the receiver sees.
            valid_for: how long the token is good from now.
            lifetime: how long the offer stays redeemable.
        """
        now = self._clock()
        content = self.access_token_issuer().issue(
            subject=peer, scope=scope, not_before=now, not_after=now + valid_for
        )
        provisioning = ProvisioningInformation(media_type=ACCESS_TOKEN_MEDIA_TYPE, content=content)
        return await self.offer_provisioning(
            peer, provisioning, title=title, description=description, lifetime=lifetime
        )

    def digital_key(self, share_id: str) -> DigitalKey:
        """The digital key a stateful share delivered: its endorsement and the device's key.

        Raises:
            UnknownShare: the share delivered no digital key.
        """
        credential = self.credential(share_id)
        if credential.media_type != DIGITAL_KEY_MEDIA_TYPE:
            raise UnknownShare(f"share {share_id} delivered a {credential.media_type}, not a key")
        stored = json.loads(credential.content)
        return DigitalKey(
            endorsement=Endorsement.model_validate_json(json.dumps(stored["endorsement"])),
            holder=DigitalKeyHolder.from_private_key_pem(stored["private_key_pem"].encode()),
        )

    def _signing_key(
        self,
        name: str,
        generate: Callable[[], _HasPrivatePem],
        conn: sqlite3.Connection | None,
    ) -> bytes:
        db = conn or self._store.connection
        row = db.execute(
            "SELECT private_key_pem FROM signing_keys WHERE name = ?", (name,)
        ).fetchone()
        if row is not None:
            return bytes(row[0])
        pem = generate().private_key_pem()
        statement = "INSERT INTO signing_keys (name, private_key_pem, created_at) VALUES (?, ?, ?)"
        if conn is not None:
            conn.execute(statement, (name, pem, utc_now_text()))
        else:
            with self._store.transaction() as own:
                own.execute(statement, (name, pem, utc_now_text()))
        return pem

    async def wait_idle(self, quiet: float) -> None:
        """Return once no message has been processed for ``quiet`` seconds (measured from now).

        Scripts use it to process what has arrived and then stop.
        """
        if quiet <= 0:
            return
        self._last_activity = max(self._last_activity, time.monotonic())
        while True:
            waited = time.monotonic() - self._last_activity
            if waited >= quiet and not self._busy:
                return
            await asyncio.sleep(max(quiet - waited, 0.05))

    async def wait_for(
        self, share_id: str, states: Iterable[ShareState], timeout: float = 30.0
    ) -> Share:
        """Wait until a share reaches one of ``states`` (while :meth:`run` processes messages).

        Raises:
            TimeoutError: the share did not get there in time.
        """
        wanted = set(states)

        def reached() -> bool:
            try:
                return self.share(share_id).state in wanted
            except UnknownShare:
                return False

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(reached)
        return self.share(share_id)

    # -- internals ----------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _expire_if_due(self, share_id: str) -> None:
        """Record the expiry and raise ShareExpired if the share's time is up."""
        with self._store.transaction() as conn:
            share = load_share(conn, share_id)
            due = share.expires_at <= self._clock() and not share.state.is_final
            if due:
                steps.set_state(conn, share_id, ShareState.EXPIRED)
                send_log.forget_ended_share(conn, share_id, keep=None)
        if due:
            raise ShareExpired(f"share {share_id} expired at {share.expires_at.isoformat()}")

    def _log_step(self, share_id: str, step: str, peer: str, started: float) -> None:
        log.info(
            "share %s: %s (peer %s, channel %s, %.1f ms)",
            share_id,
            step,
            peer,
            self._channel.name,
            (time.perf_counter() - started) * 1000,
        )


def _checked_offer(**fields: object) -> Offer:
    """An Offer, or a CredentialError that says which field is wrong."""
    try:
        return Offer.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise CredentialError(f"cannot make the offer: {describe_validation_error(exc)}") from exc


def _check_terms(terms: DigitalKeyTerms) -> None:
    """Refuse digital-key terms the owner could never endorse, before anything is sent."""
    try:
        check_lock_id(terms.lock_id)
    except ValueError as exc:
        raise CredentialError(f"lock id {terms.lock_id!r}: {exc}") from None
    if not terms.rights:
        raise CredentialError("a digital key needs at least one right, e.g. 'unlock'")
    if terms.not_before.tzinfo is None or terms.not_after.tzinfo is None:
        raise CredentialError("a digital key's validity needs times with a time zone")
    if terms.not_after <= terms.not_before:
        raise CredentialError("a digital key's validity must end after it starts")


@dataclass(frozen=True, slots=True)
class _Refused:
    """An incoming message that changes no share.

    Attributes:
        message_id: its transfer message id, to be marked seen (None if unknown or seen).
        expired_share: a share to record as expired because the message came too late.
    """

    message_id: str | None
    expired_share: str


def _detail(step: Step | _Refused) -> str:
    """The message type a step is about, for fault-injection points."""
    if isinstance(step, _Refused):
        return ""
    return step.name.removeprefix("received ")


def _message_id(incoming: IncomingMessage) -> str:
    return str(decode_transfer(incoming.payload).message_id)
