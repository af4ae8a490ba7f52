"""Runs shares for one wallet: offers, answers, and the messages that drive them.

:class:`ShareService` is what a wallet application talks to. It turns user actions (offer,
accept, decline, cancel) and incoming transfer messages into share state changes, and every
change is stored in one wallet transaction together with:

* the libsignal records the incoming message's decryption changed,
* the "seen" markers that make a redelivered message harmless,
* the reply the change calls for, queued in ``pending_replies``.

Only after that commit is the incoming message acknowledged and the reply sent, so a crash at
any point leaves a share either before or after a step, never half-way, and a reply queued
before a crash is sent after the restart with the same message id (the peer drops a copy).

The service knows nothing about how messages travel: it uses a
:class:`~tigress_signal.channel.CredentialChannel`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from tigress_signal.channel import CredentialChannel, IncomingMessage
from tigress_signal.credentials import (
    ACCESS_TOKEN_MEDIA_TYPE,
    DIGITAL_KEY_MEDIA_TYPE,
    Accepted,
    AccessTokenIssuer,
    Cancelled,
    Declined,
    DigitalKeyHolder,
    Endorsement,
    KeyImportRequest,
    KeyOwner,
    KeySigningRequest,
    Offer,
    ProvisioningInformation,
    TransferEnvelope,
    TransferMessage,
    decode_transfer,
    encode_transfer,
)
from tigress_signal.errors import (
    CredentialError,
    InvalidTransition,
    ShareError,
    ShareExpired,
    TigressSignalError,
    UnknownPeer,
    UnknownShare,
)
from tigress_signal.faults import crash_point
from tigress_signal.shares.states import Flow, Role, ShareState, next_state
from tigress_signal.wallet.store import WalletStore, utc_now_text

log = logging.getLogger(__name__)

#: How long an offer stays open unless the sender says otherwise.
DEFAULT_SHARE_LIFETIME = timedelta(days=2)
#: The issuer name on access tokens a wallet issues unless told otherwise.
DEFAULT_ISSUER = "tigress-signal sample venue"


@dataclass(frozen=True, slots=True)
class Share:
    """A share as this wallet sees it.

    Attributes:
        share_id: the id the sender chose.
        role: ``"sender"`` or ``"receiver"``.
        peer: the other wallet, as the channel addresses it.
        flow: ``"stateless"`` or ``"stateful"``.
        state: where the share stands.
        credential_format: media type of the credential on offer.
        title: the offer's display title.
        description: the offer's display description.
        expires_at: when the share stops being redeemable.
    """

    share_id: str
    role: Role
    peer: str
    flow: Flow
    state: ShareState
    credential_format: str
    title: str
    description: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """A credential received through a share, exactly as it arrived.

    Attributes:
        share_id: the share that delivered it.
        media_type: the credential's media type.
        filename: the sender's file name, when it gave one.
        content: the credential's bytes.
        from_peer: who sent it.
    """

    share_id: str
    media_type: str
    filename: str | None
    content: bytes
    from_peer: str

    def __repr__(self) -> str:
        # Never print credential contents by accident.
        return f"StoredCredential(share_id={self.share_id!r}, media_type={self.media_type!r})"


@dataclass(frozen=True, slots=True)
class DigitalKey:
    """A digital key in the receiver's wallet.

    Attributes:
        endorsement: the owner's signature over the key, its lock, rights and validity.
        holder: the key pair this device made (it answers the lock's challenges).
    """

    endorsement: Endorsement
    holder: DigitalKeyHolder


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
    """

    def __init__(
        self,
        store: WalletStore,
        channel: CredentialChannel,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._channel = channel
        self._clock = clock
        self._changed = asyncio.Condition()
        self._flush_lock = asyncio.Lock()
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
        offer = Offer(
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
        self.owner_key(terms.lock_id)
        offer = Offer(
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
        return await self._start_offer(peer, offer, private=private)

    async def _start_offer(self, peer: str, offer: Offer, *, private: bytes) -> Share:
        started = time.perf_counter()
        share_id = str(offer.share_id)
        with self._store.transaction() as conn:
            now = utc_now_text()
            conn.execute(
                "INSERT INTO shares (share_id, role, peer, flow, state, credential_format, title,"
                " description, expires_at, created_at, updated_at, offer, private)"
                " VALUES (?, 'sender', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    share_id,
                    peer,
                    offer.flow,
                    ShareState.OFFERED.value,
                    offer.credential_format,
                    offer.title,
                    offer.description,
                    offer.expires_at.isoformat(),
                    now,
                    now,
                    encode_transfer(self._envelope(offer)),
                    private,
                ),
            )
            message_id = self._queue_reply(conn, peer, offer, f"Credential offer: {offer.title}")
        await self.flush_replies(must_send=message_id)
        self._log_step(share_id, "offer", peer, started)
        return self.share(share_id)

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
        started = time.perf_counter()
        self._expire_if_due(share_id)
        with self._store.transaction() as conn:
            share = self._load(conn, share_id)
            new_state = next_state(share.role, share.flow, share.state, "user:accept")
            offer = self._stored_offer(conn, share_id)
            if share.flow == "stateless":
                if offer.provisioning is None:  # the model forbids it; kept for the type checker
                    raise InvalidTransition(f"share {share_id} has no provisioning information")
                self._store_credential(
                    conn,
                    share,
                    offer.provisioning.media_type,
                    offer.provisioning.filename,
                    offer.provisioning.content,
                )
                reply: TransferMessage = Accepted(share_id=offer.share_id)
            else:
                holder = DigitalKeyHolder.generate()
                nonce = secrets.token_bytes(32)
                reply = holder.signing_request(offer.share_id, nonce)
                self._set_private(conn, share_id, holder.private_key_pem())
            self._set_state(conn, share_id, new_state)
            self._queue_reply(conn, share.peer, reply, f"Offer accepted: {share.title}")
        self._log_step(share_id, "accept", share.peer, started)
        await self._notify()
        await self.flush_replies()
        return self.share(share_id)

    async def decline(self, share_id: str, reason: str | None = None) -> Share:
        """Decline a received offer and tell the sender."""
        started = time.perf_counter()
        with self._store.transaction() as conn:
            share = self._load(conn, share_id)
            new_state = next_state(share.role, share.flow, share.state, "user:decline")
            self._set_state(conn, share_id, new_state)
            reply = Declined(share_id=uuid.UUID(share_id), reason=reason)
            self._queue_reply(conn, share.peer, reply, f"Offer declined: {share.title}")
        self._log_step(share_id, "decline", share.peer, started)
        await self._notify()
        await self.flush_replies()
        return self.share(share_id)

    async def cancel(self, share_id: str, reason: str | None = None) -> Share:
        """Withdraw from a share that has not ended, on either side, and tell the peer."""
        started = time.perf_counter()
        with self._store.transaction() as conn:
            share = self._load(conn, share_id)
            new_state = next_state(share.role, share.flow, share.state, "user:cancel")
            self._set_state(conn, share_id, new_state)
            reply = Cancelled(share_id=uuid.UUID(share_id), reason=reason)
            self._queue_reply(conn, share.peer, reply, f"Share cancelled: {share.title}")
        self._log_step(share_id, "cancel", share.peer, started)
        await self._notify()
        await self.flush_replies()
        return self.share(share_id)

    # -- incoming messages ----------------------------------------------------------------------

    async def run(self) -> None:
        """Process incoming messages until the channel closes; one bad message never stops it."""
        await self.flush_replies()
        async for incoming in self._channel.receive():
            await self.handle(incoming)

    async def handle(self, incoming: IncomingMessage) -> None:
        """Process one incoming message: store its effect, acknowledge it, send any reply.

        A message that does not parse or does not fit its share's state is refused (logged,
        acknowledged, no share changes); the libsignal state its decryption produced is still
        stored, since the message was consumed.
        """
        started = time.perf_counter()
        envelope: TransferEnvelope | None = None
        try:
            envelope = decode_transfer(incoming.payload)
        except CredentialError as exc:
            log.warning("refused a message from %s: %s", incoming.peer, exc)
        step = envelope.body.type if envelope is not None else ""
        share_id = str(envelope.body.share_id) if envelope is not None else "-"
        self._busy = True
        try:
            crash_point("receive:decrypted", step)
            with self._store.transaction() as conn:
                self._store.apply_changes(conn, incoming.record_changes)
                self._store.mark_envelope_seen(conn, incoming.envelope_id)
                if envelope is not None and not self._apply_once(conn, incoming.peer, envelope):
                    step = ""
        except BaseException:
            await self._channel.release(incoming)
            raise
        finally:
            self._busy = False
            self._last_activity = time.monotonic()
        crash_point("receive:committed", step)
        await self._channel.acknowledge(incoming)
        crash_point("receive:acknowledged", step)
        if step:
            self._log_step(share_id, f"received {step}", incoming.peer, started)
        await self._notify()
        await self.flush_replies()

    def _apply_once(self, conn: sqlite3.Connection, peer: str, envelope: TransferEnvelope) -> bool:
        """Apply a message's effect unless its id was seen; False if dropped or refused."""
        message_id = str(envelope.message_id)
        share_id = str(envelope.body.share_id)
        if self._store.message_seen(conn, message_id):
            log.info("dropped a copy of message %s (share %s)", message_id, share_id)
            return False
        self._store.mark_message_seen(conn, message_id)
        # A refused message must not undo the records and markers already written in this
        # transaction, so its effect runs inside a savepoint of its own.
        conn.execute("SAVEPOINT effect")
        try:
            self._apply_message(conn, peer, envelope.body)
        except (ShareError, CredentialError) as exc:
            conn.execute("ROLLBACK TO effect")
            if isinstance(exc, ShareExpired):
                self._set_state(conn, share_id, ShareState.EXPIRED)
            log.warning(
                "refused %s for share %s from %s: %s", envelope.body.type, share_id, peer, exc
            )
            return False
        finally:
            conn.execute("RELEASE effect")
        return True

    def _apply_message(
        self, conn: sqlite3.Connection, peer: str, message: TransferMessage
    ) -> None:
        if isinstance(message, Offer):
            self._receive_offer(conn, peer, message)
            return
        share_id = str(message.share_id)
        share = self._load(conn, share_id)
        # Only the share's own peer may move it; anyone else learns nothing about it.
        if share.peer != peer:
            raise UnknownShare(f"no share {share_id} with {peer}")
        if not isinstance(message, Cancelled):
            self._check_not_expired(conn, share)
        new_state = next_state(share.role, share.flow, share.state, message.type)
        if isinstance(message, KeySigningRequest):
            self._endorse(conn, share, message)
        elif isinstance(message, KeyImportRequest):
            self._import_key(conn, share, message.endorsement)
        self._set_state(conn, share_id, new_state)

    def _receive_offer(self, conn: sqlite3.Connection, peer: str, offer: Offer) -> None:
        share_id = str(offer.share_id)
        if conn.execute("SELECT 1 FROM shares WHERE share_id = ?", (share_id,)).fetchone():
            raise InvalidTransition(f"share {share_id} already exists in this wallet")
        if offer.expires_at <= self._clock():
            raise ShareExpired(f"offer {share_id} arrived after its expiry")
        now = utc_now_text()
        conn.execute(
            "INSERT INTO shares (share_id, role, peer, flow, state, credential_format, title,"
            " description, expires_at, created_at, updated_at, offer)"
            " VALUES (?, 'receiver', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                share_id,
                peer,
                offer.flow,
                ShareState.OFFERED.value,
                offer.credential_format,
                offer.title,
                offer.description,
                offer.expires_at.isoformat(),
                now,
                now,
                encode_transfer(self._envelope(offer)),
            ),
        )

    def _endorse(self, conn: sqlite3.Connection, share: Share, request: KeySigningRequest) -> None:
        terms = json.loads(self._private(conn, share.share_id))
        owner = self.owner_key(terms["lock_id"], conn)
        endorsement = owner.endorse(
            request,
            lock_id=terms["lock_id"],
            rights=tuple(terms["rights"]),
            not_before=datetime.fromisoformat(terms["not_before"]),
            not_after=datetime.fromisoformat(terms["not_after"]),
        )
        reply = KeyImportRequest(share_id=request.share_id, endorsement=endorsement)
        self._queue_reply(conn, share.peer, reply, f"Key endorsed: {share.title}")

    def _import_key(
        self, conn: sqlite3.Connection, share: Share, endorsement: Endorsement
    ) -> None:
        holder = DigitalKeyHolder.from_private_key_pem(self._private(conn, share.share_id))
        holder.check_endorsement(endorsement, uuid.UUID(share.share_id))
        content = json.dumps(
            {
                "endorsement": endorsement.model_dump(mode="json"),
                "private_key_pem": holder.private_key_pem().decode(),
            },
            sort_keys=True,
        ).encode()
        self._store_credential(conn, share, DIGITAL_KEY_MEDIA_TYPE, None, content)
        reply = Accepted(share_id=uuid.UUID(share.share_id))
        self._queue_reply(conn, share.peer, reply, f"Key received: {share.title}")

    # -- replies ----------------------------------------------------------------------------------

    async def flush_replies(self, *, must_send: str | None = None) -> None:
        """Send every queued reply, oldest first; each is deleted once the channel took it.

        A reply that cannot be sent now stays queued for the next flush, except one to a peer
        the channel does not know: that one is dropped and its share cancelled.

        Args:
            must_send: a queued message id whose failure is raised to the caller (the others'
                failures are only logged).

        Raises:
            TigressSignalError: sending ``must_send`` failed (UnknownPeer, ChannelError,
                UntrustedIdentity, ...).
        """
        failure: TigressSignalError | None = None
        async with self._flush_lock:
            rows = self._store.connection.execute(
                "SELECT message_id, peer, payload, summary FROM pending_replies"
                " ORDER BY created_at, message_id"
            ).fetchall()
            for message_id, peer, payload, summary in rows:
                try:
                    await self._channel.send(peer, bytes(payload), summary=summary)
                except UnknownPeer as exc:
                    self._drop_reply(message_id, bytes(payload), cancel_share=True)
                    log.warning("dropped message %s: %s", message_id, exc)
                    failure = exc if message_id == must_send else failure
                    continue
                except TigressSignalError as exc:
                    log.warning("message %s to %s stays queued: %s", message_id, peer, exc)
                    failure = exc if message_id == must_send else failure
                    continue
                self._drop_reply(message_id, bytes(payload), cancel_share=False)
        if failure is not None:
            raise failure

    def _drop_reply(self, message_id: str, payload: bytes, *, cancel_share: bool) -> None:
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM pending_replies WHERE message_id = ?", (message_id,))
            if cancel_share:
                share_id = str(decode_transfer(payload).body.share_id)
                conn.execute(
                    "UPDATE shares SET state = ?, updated_at = ? WHERE share_id = ?",
                    (ShareState.CANCELLED.value, utc_now_text(), share_id),
                )

    def _queue_reply(
        self, conn: sqlite3.Connection, peer: str, message: TransferMessage, summary: str
    ) -> str:
        envelope = self._envelope(message)
        conn.execute(
            "INSERT INTO pending_replies (message_id, peer, payload, summary, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (str(envelope.message_id), peer, encode_transfer(envelope), summary, utc_now_text()),
        )
        return str(envelope.message_id)

    def _envelope(self, message: TransferMessage) -> TransferEnvelope:
        return TransferEnvelope(message_id=uuid.uuid4(), sent_at=self._clock(), body=message)

    # -- reading ------------------------------------------------------------------------------

    def share(self, share_id: str) -> Share:
        """One share of this wallet.

        Raises:
            UnknownShare: no such share.
        """
        return self._load(self._store.connection, share_id)

    def shares(self) -> list[Share]:
        """Every share of this wallet, newest first."""
        rows = self._store.connection.execute(
            f"SELECT {_SHARE_COLUMNS} FROM shares ORDER BY created_at DESC"  # noqa: S608
        ).fetchall()
        return [_share_from_row(row) for row in rows]

    def offer(self, share_id: str) -> Offer:
        """The offer behind a share (its display information and, if stateless, provisioning)."""
        return self._stored_offer(self._store.connection, share_id)

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
            raise UnknownShare(f"no credential stored for share {share_id}")
        return StoredCredential(row[0], row[1], row[2], bytes(row[3]), row[4])

    def credentials(self) -> list[StoredCredential]:
        """Every credential this wallet received."""
        rows = self._store.connection.execute(
            "SELECT share_id, media_type, filename, content, from_peer FROM credentials"
            " ORDER BY received_at"
        ).fetchall()
        return [StoredCredential(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

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

    def _load(self, conn: sqlite3.Connection, share_id: str) -> Share:
        row = conn.execute(
            f"SELECT {_SHARE_COLUMNS} FROM shares WHERE share_id = ?",  # noqa: S608
            (share_id,),
        ).fetchone()
        if row is None:
            raise UnknownShare(f"no share {share_id} in this wallet")
        return _share_from_row(row)

    def _stored_offer(self, conn: sqlite3.Connection, share_id: str) -> Offer:
        row = conn.execute("SELECT offer FROM shares WHERE share_id = ?", (share_id,)).fetchone()
        if row is None:
            raise UnknownShare(f"no share {share_id} in this wallet")
        body = decode_transfer(bytes(row[0])).body
        if not isinstance(body, Offer):
            raise InvalidTransition(f"share {share_id} has no stored offer")
        return body

    def _private(self, conn: sqlite3.Connection, share_id: str) -> bytes:
        row = conn.execute("SELECT private FROM shares WHERE share_id = ?", (share_id,)).fetchone()
        return bytes(row[0]) if row else b""

    def _set_private(self, conn: sqlite3.Connection, share_id: str, value: bytes) -> None:
        conn.execute("UPDATE shares SET private = ? WHERE share_id = ?", (value, share_id))

    def _set_state(self, conn: sqlite3.Connection, share_id: str, state: ShareState) -> None:
        conn.execute(
            "UPDATE shares SET state = ?, updated_at = ? WHERE share_id = ?",
            (state.value, utc_now_text(), share_id),
        )

    def _expire_if_due(self, share_id: str) -> None:
        """Record the expiry and raise ShareExpired if the share's time is up."""
        with self._store.transaction() as conn:
            share = self._load(conn, share_id)
            due = share.expires_at <= self._clock() and not share.state.is_final
            if due:
                self._set_state(conn, share_id, ShareState.EXPIRED)
        if due:
            raise ShareExpired(f"share {share_id} expired at {share.expires_at.isoformat()}")

    def _check_not_expired(self, conn: sqlite3.Connection, share: Share) -> None:
        if share.expires_at <= self._clock() and not share.state.is_final:
            self._set_state(conn, share.share_id, ShareState.EXPIRED)
            raise ShareExpired(f"share {share.share_id} expired at {share.expires_at.isoformat()}")

    def _store_credential(
        self,
        conn: sqlite3.Connection,
        share: Share,
        media_type: str,
        filename: str | None,
        content: bytes,
    ) -> None:
        try:
            conn.execute(
                "INSERT INTO credentials (share_id, media_type, filename, content, from_peer,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (share.share_id, media_type, filename, content, share.peer, utc_now_text()),
            )
        except sqlite3.IntegrityError as exc:
            # The state machine already prevents this; the primary key is the last line of
            # defence against redeeming one share twice.
            raise InvalidTransition(f"share {share.share_id} was already redeemed") from exc

    def _log_step(self, share_id: str, step: str, peer: str, started: float) -> None:
        log.info(
            "share %s: %s (peer %s, channel %s, %.1f ms)",
            share_id,
            step,
            peer,
            self._channel.name,
            (time.perf_counter() - started) * 1000,
        )


_SHARE_COLUMNS = (
    "share_id, role, peer, flow, state, credential_format, title, description, expires_at"
)


def _share_from_row(row: tuple[object, ...]) -> Share:
    return Share(
        share_id=str(row[0]),
        role=row[1],  # type: ignore[arg-type]
        peer=str(row[2]),
        flow=row[3],  # type: ignore[arg-type]
        state=ShareState(str(row[4])),
        credential_format=str(row[5]),
        title=str(row[6]),
        description=str(row[7]),
        expires_at=datetime.fromisoformat(str(row[8])),
    )
