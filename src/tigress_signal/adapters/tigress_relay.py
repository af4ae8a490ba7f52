"""The CredentialChannel over a Tigress mailbox relay (draft-vinokurov-tigress-http-00).

How the channel's peers map onto Tigress, which has no addressing at all: a *peer* here is one
share's conversation, named by a local handle that never leaves the wallet.

* Sender: :meth:`TigressRelayChannel.new_peer` makes a handle with a fresh AES-256-GCM secret
  and a fresh device claim. The first :meth:`send` to it creates the mailbox with that payload
  (the offer); later sends update it. :meth:`share_link` then gives the link, with the secret
  in its fragment, for the person to pass on by any means (QR code, chat, NFC).
* Receiver: :meth:`TigressRelayChannel.open_link` takes such a link, checks that it names a
  trusted relay, makes its own fresh claim, claims the mailbox with a first read and returns
  the handle under which the sender's messages arrive and replies go back.
* Either side ends a conversation with :meth:`finish` (the side that reads the last message
  deletes the mailbox); the relay's expiry removes whatever is left.

So the same :class:`~tigress_signal.shares.service.ShareService` drives stateless and stateful
transfers: it offers to ``channel.new_peer()``, and the receiving wallet's service sees the
offer arrive from the handle ``open_link`` returned.

Every payload is ``AEAD_AES_256_GCM``: a random 96-bit nonce, then ciphertext and tag. As
drafted, no associated data is bound, so a relay may replay an older payload or reflect a
party's own payload back to it and the reader cannot tell. ``hardened=True`` binds the
direction (initiator to recipient or back) and the message's sequence number in that direction
as associated data: such a payload then fails to open and is dropped (and counted in
:attr:`TigressRelayChannel.stats`). Both modes put the same bytes on the wire.

Parties learn of a newer payload by a read the relay holds until one arrives (the relay's
``Prefer: wait`` addition), since this relay has no push service.

Note:
    The conversations (secret, claim, counters) live in this object's memory only: a wallet
    process that stops in the middle of a transfer cannot resume it, and the sender has to
    offer again. A persistent store for them needs a place in the wallet store that can keep
    a secret; it is not written yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tigress_signal.channel import CredentialChannel, IncomingMessage
from tigress_signal.errors import (
    ChannelClosed,
    ChannelError,
    ClaimRejected,
    InvalidShareLink,
    MailboxNotFound,
    PayloadRejected,
    RelayApiError,
    RelayError,
    RelayRateLimited,
    UnknownPeer,
)
from tigress_signal.relay.client import MailboxContent, RelayClient, ShareLink, relay_origin
from tigress_signal.relay.entities import DisplayInformation, Payload, PayloadType

log = logging.getLogger(__name__)

Role = Literal["initiator", "recipient"]

#: How long a mailbox this channel creates should live (the relay may cut it to its cap).
DEFAULT_MAILBOX_LIFETIME = timedelta(hours=48)
#: How long one read may wait at the relay for a newer payload.
DEFAULT_WAIT_SECONDS = 20.0
DEFAULT_DESCRIPTION = "A credential shared with you. Open this link in your wallet app."
_HANDLE_PREFIX = "relay-share:"
_NONCE_SIZE = 12
_AAD_LABEL = b"tigress-signal relay payload v1"
_RETRY_FIRST_DELAY = 0.2
_RETRY_MAX_DELAY = 5.0


def seal(key: bytes, plaintext: bytes, associated_data: bytes | None = None) -> Payload:
    """Encrypt one payload as the drafts lay it out: nonce || ciphertext || tag.

    Args:
        key: the share's 128- or 256-bit secret.
        plaintext: what to encrypt.
        associated_data: bound but not sent (the hardened mode's position); None as drafted.
    """
    nonce = os.urandom(_NONCE_SIZE)
    data = nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)
    kind: PayloadType = "AEAD_AES_256_GCM" if len(key) == 32 else "AEAD_AES_128_GCM"
    return Payload(type=kind, data=data)


def open_sealed(key: bytes, payload: Payload, associated_data: bytes | None = None) -> bytes:
    """Decrypt a payload made by :func:`seal`.

    Raises:
        PayloadRejected: the payload does not authenticate under ``key`` (and, if given,
            ``associated_data``), or its type does not fit the key.
    """
    expected = "AEAD_AES_256_GCM" if len(key) == 32 else "AEAD_AES_128_GCM"
    if payload.type != expected:
        raise PayloadRejected(f"a {payload.type} payload does not fit this share's key")
    nonce, sealed = payload.data[:_NONCE_SIZE], payload.data[_NONCE_SIZE:]
    try:
        return AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        raise PayloadRejected("a payload failed authentication") from None


def hardened_associated_data(writer: Role, sequence: int) -> bytes:
    """The associated data of the hardened mode: who wrote the payload, and its number.

    ``sequence`` counts the writer's payloads in this mailbox from 0.
    """
    direction = b"I>R" if writer == "initiator" else b"R>I"
    return _AAD_LABEL + b"\x00" + direction + sequence.to_bytes(8, "big")


@dataclass(slots=True)
class RelayChannelStats:
    """What the channel saw, for tests and the comparison report.

    Attributes:
        mailboxes_created: mailboxes this channel created.
        payloads_sent: payloads written (creates and updates).
        payloads_received: payloads handed to the wallet.
        payloads_rejected: payloads that did not open (tampered, or in the hardened mode
            replayed or reflected).
        overwritten_unread: writes that replaced a payload this side had not read yet (the
            mailbox holds one payload).
        empty_waits: reads that waited and found nothing newer.
    """

    mailboxes_created: int = 0
    payloads_sent: int = 0
    payloads_received: int = 0
    payloads_rejected: int = 0
    overwritten_unread: int = 0
    empty_waits: int = 0


@dataclass(slots=True)
class _Conversation:
    handle: str
    role: Role
    client: RelayClient
    secret: bytes = field(repr=False)
    claim: str = field(repr=False)
    mailbox_id: str | None = None
    origin: str = ""
    vertical: Literal["a", "h", "c"] = "a"
    display: DisplayInformation | None = None
    sent: int = 0
    received: int = 0
    known_version: int | None = None
    my_last_digest: bytes = b""
    last_seen_digest: bytes = b""
    in_flight: tuple[str, int | None, bytes] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None

    @property
    def peer_role(self) -> Role:
        return "recipient" if self.role == "initiator" else "initiator"


class TigressRelayChannel(CredentialChannel):
    """Transfer messages through short-lived mailboxes on a Tigress relay.

    Args:
        relay_url: the relay this wallet creates mailboxes on.
        trusted_relays: relay origins this wallet accepts links for, each mapped to the URL it
            contacts for them (usually the origin itself). The ``relay_url`` is always trusted.
        hardened: bind direction and sequence number into each payload's associated data.
        transport: an httpx transport for every relay request (tests, measurements).
        verify: TLS verification for the relays (True, False or a CA bundle path).
        lifetime: how long new mailboxes should live.
        wait_seconds: how long one read may wait at the relay for news.
        description: the public description new mailboxes show.
    """

    name = "tigress-relay"

    def __init__(
        self,
        relay_url: str,
        *,
        trusted_relays: Mapping[str, str] | None = None,
        hardened: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str = True,
        lifetime: timedelta = DEFAULT_MAILBOX_LIFETIME,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        description: str = DEFAULT_DESCRIPTION,
    ) -> None:
        self.hardened = hardened
        self.stats = RelayChannelStats()
        self._transport = transport
        self._verify = verify
        self._lifetime = lifetime
        self._wait = wait_seconds
        self._description = description
        self._clients: dict[str, RelayClient] = {}
        self._relay = self._client_for(relay_url)
        self._endpoints = {relay_origin(k): v for k, v in (trusted_relays or {}).items()}
        self._endpoints.setdefault(self._relay.base_url, relay_url)
        self._conversations: dict[str, _Conversation] = {}
        self._arrived: asyncio.Queue[IncomingMessage] = asyncio.Queue()
        self._closed = asyncio.Event()

    # -- conversations ------------------------------------------------------------------------

    def new_peer(
        self,
        *,
        title: str | None = None,
        description: str | None = None,
        image_url: str = "",
        vertical: Literal["a", "h", "c"] = "a",
    ) -> str:
        """Start an outgoing share: a fresh secret and claim, under a new local handle.

        The mailbox is created by the first :meth:`send` to the handle.

        Args:
            title: the public title (default: the first message's summary).
            description: the public description.
            image_url: an image for link previews.
            vertical: the link's credential vertical (``a`` access, ``h`` home, ``c`` car).

        Returns:
            The handle to offer to (``ShareService.offer_*(peer=handle, ...)``).
        """
        self._check_open()
        handle = _HANDLE_PREFIX + str(uuid.uuid4())
        display = None
        if title is not None:
            display = DisplayInformation(
                title=title,
                description=self._description if description is None else description,
                image_url=image_url,
            )
        self._conversations[handle] = _Conversation(
            handle=handle,
            role="initiator",
            client=self._relay,
            secret=AESGCM.generate_key(bit_length=256),
            claim=str(uuid.uuid4()),
            vertical=vertical,
            display=display,
        )
        return handle

    def share_link(self, peer: str) -> str:
        """The link of an outgoing share, secret in the fragment, for the out-of-band channel.

        Raises:
            UnknownPeer: no such outgoing share, or nothing was sent to it yet.
        """
        conversation = self._conversation(peer)
        if conversation.role != "initiator" or conversation.mailbox_id is None:
            raise UnknownPeer(f"{peer} has no mailbox yet: send the offer first")
        return ShareLink(
            conversation.origin,
            conversation.mailbox_id,
            conversation.secret,
            conversation.vertical,
        ).url

    async def open_link(self, link: str) -> str:
        """Claim the mailbox a share link names; its messages then arrive from the handle.

        Raises:
            InvalidShareLink: the link does not parse, or names a relay that is not trusted.
            MailboxNotFound: the mailbox is gone (deleted or expired).
            ClaimRejected: another device already claimed it.
            PayloadRejected: the payload does not open with the link's secret.
            ChannelError: the relay cannot be reached.
        """
        self._check_open()
        parsed = ShareLink.parse(link)
        endpoint = self._endpoints.get(parsed.origin)
        if endpoint is None:
            raise InvalidShareLink(
                f"the link names a relay this wallet does not trust: {parsed.origin}"
            )
        conversation = _Conversation(
            handle=_HANDLE_PREFIX + str(uuid.uuid4()),
            role="recipient",
            client=self._client_for(endpoint),
            secret=parsed.secret,
            claim=str(uuid.uuid4()),
            mailbox_id=parsed.mailbox_id,
            origin=parsed.origin,
            vertical=parsed.vertical,
        )
        # The first read binds this device's claim: only now is the mailbox ours.
        content = await conversation.client.read_mailbox(parsed.mailbox_id, conversation.claim)
        if content is None:  # pragma: no cover - a read without a known version never waits
            raise ChannelError("the relay answered a first read with no content")
        self._conversations[conversation.handle] = conversation
        try:
            self._arrive(conversation, content)
        except PayloadRejected:
            # Not ours to keep: let go of the mailbox so the device with the right link can
            # still claim it.
            del self._conversations[conversation.handle]
            with contextlib.suppress(RelayError, ChannelError):
                await conversation.client.relinquish_mailbox(parsed.mailbox_id, conversation.claim)
            raise
        self._watch(conversation)
        log.info("opened share link as %s", conversation.handle)
        return conversation.handle

    async def finish(self, peer: str, *, delete: bool = True) -> None:
        """End a conversation: stop reading and, with ``delete``, delete the mailbox.

        The party that reads the last message of a transfer deletes the mailbox; the other
        only forgets it. A mailbox already gone is no error.
        """
        conversation = self._conversations.pop(peer, None)
        if conversation is None:
            return
        if conversation.watcher is not None:
            conversation.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conversation.watcher
        if delete and conversation.mailbox_id is not None:
            with contextlib.suppress(MailboxNotFound):
                await conversation.client.delete_mailbox(
                    conversation.mailbox_id, conversation.claim
                )

    # -- CredentialChannel ----------------------------------------------------------------------

    async def send(self, peer: str, payload: bytes, *, summary: str = "") -> None:
        """Write ``payload`` to the share's mailbox, creating it on the first send.

        Raises:
            UnknownPeer: no such conversation, or its mailbox is gone (deleted or expired).
            ChannelError: the relay refused the write or cannot be reached.
        """
        self._check_open()
        started = time.perf_counter()
        conversation = self._conversation(peer)
        async with conversation.lock:
            associated = (
                hardened_associated_data(conversation.role, conversation.sent)
                if self.hardened
                else None
            )
            sealed = seal(conversation.secret, payload, associated)
            # Known before the write: the read loop may see this payload before the write's
            # answer arrives, and must take it for this side's own.
            conversation.my_last_digest = _digest(sealed.data)
            try:
                if conversation.mailbox_id is None:
                    version = await self._create(conversation, sealed, summary)
                else:
                    version = await conversation.client.update_mailbox(
                        conversation.mailbox_id, conversation.claim, sealed
                    )
            except MailboxNotFound as exc:
                raise UnknownPeer(f"the mailbox of {peer} is gone (deleted or expired)") from exc
            except ClaimRejected as exc:
                raise ChannelError(f"the relay no longer accepts this device for {peer}") from exc
            except RelayError as exc:
                raise ChannelError(f"the relay refused the message for {peer}: {exc}") from exc
            if (
                version is not None
                and conversation.known_version is not None
                and version > conversation.known_version + 1
            ):
                # The mailbox holds one payload: the peer's newer one, unread, is gone now.
                self.stats.overwritten_unread += 1
                log.warning("a write to %s replaced a payload not read yet", peer)
            conversation.known_version = version
            conversation.sent += 1
            self.stats.payloads_sent += 1
        self._watch(conversation)
        log.info(
            "sent %d bytes to %s (%.1f ms)",
            len(payload),
            peer,
            (time.perf_counter() - started) * 1000,
        )

    async def receive(self) -> AsyncIterator[IncomingMessage]:
        """Yield the messages the peers of open conversations wrote, until :meth:`close`."""
        while not self._closed.is_set():
            getting = asyncio.ensure_future(self._arrived.get())
            closing = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({getting, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                if not getting.done():
                    getting.cancel()
            if getting.done() and not getting.cancelled():
                yield getting.result()

    async def acknowledge(self, incoming: IncomingMessage) -> None:
        """The wallet stored the message's effect: wait for the next payload."""
        conversation = self._conversations.get(incoming.peer)
        if conversation is None or conversation.in_flight is None:
            return
        envelope_id, version, digest = conversation.in_flight
        if envelope_id != incoming.envelope_id:
            return
        conversation.in_flight = None
        conversation.known_version = version
        conversation.last_seen_digest = digest
        conversation.received += 1
        conversation.settled.set()

    async def release(self, incoming: IncomingMessage) -> None:
        """The wallet could not store the message: read it again."""
        conversation = self._conversations.get(incoming.peer)
        if conversation is None or conversation.in_flight is None:
            return
        if conversation.in_flight[0] == incoming.envelope_id:
            conversation.in_flight = None
            conversation.settled.set()

    async def close(self) -> None:
        """Stop every conversation's reads and close the relay connections."""
        self._closed.set()
        for conversation in list(self._conversations.values()):
            if conversation.watcher is not None:
                conversation.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await conversation.watcher
        for client in self._clients.values():
            await client.aclose()

    # -- internals ------------------------------------------------------------------------------

    async def _create(
        self, conversation: _Conversation, sealed: Payload, summary: str
    ) -> int | None:
        display = conversation.display or DisplayInformation(
            title=summary or "A shared credential",
            description=self._description,
            image_url="",
        )
        created = await conversation.client.create_mailbox(
            conversation.claim,
            sealed,
            display,
            expiration=datetime.now(UTC) + self._lifetime,
            access_rights="RWD",
        )
        conversation.mailbox_id = created.mailbox_id
        conversation.origin = relay_origin(created.url_link)
        self.stats.mailboxes_created += 1
        log.info("created the mailbox of %s", conversation.handle)
        return created.version

    def _watch(self, conversation: _Conversation) -> None:
        if conversation.watcher is None or conversation.watcher.done():
            conversation.watcher = asyncio.create_task(
                self._read_loop(conversation), name=f"relay reads {conversation.handle}"
            )

    async def _read_loop(self, conversation: _Conversation) -> None:
        """Wait for the peer's payloads; hand each to the wallet, one at a time."""
        delay = _RETRY_FIRST_DELAY
        mailbox_id = conversation.mailbox_id
        if mailbox_id is None:  # pragma: no cover - started only once the mailbox exists
            return
        while not self._closed.is_set():
            if conversation.in_flight is not None:
                conversation.settled.clear()
                await conversation.settled.wait()
                continue
            try:
                content = await conversation.client.read_mailbox(
                    mailbox_id,
                    conversation.claim,
                    known_version=conversation.known_version,
                    wait=self._wait,
                )
            except MailboxNotFound:
                log.info("the mailbox of %s is gone; no more messages", conversation.handle)
                return
            except ClaimRejected:
                log.warning("the relay no longer accepts this device for %s", conversation.handle)
                return
            except RelayRateLimited as exc:
                await asyncio.sleep(exc.retry_after or delay)
                continue
            except (RelayApiError, ChannelError) as exc:
                log.warning(
                    "reading %s failed (%s); retrying in %.1f s", conversation.handle, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_DELAY)
                continue
            delay = _RETRY_FIRST_DELAY
            if content is None:
                self.stats.empty_waits += 1
                continue
            with contextlib.suppress(PayloadRejected):
                self._arrive(conversation, content)

    def _arrive(self, conversation: _Conversation, content: MailboxContent) -> None:
        """Open a payload read from the mailbox and queue it, unless it is not news."""
        digest = _digest(content.payload.data)
        if (
            content.version is not None
            and conversation.known_version is not None
            and content.version <= conversation.known_version
        ):
            return
        if digest in (conversation.my_last_digest, conversation.last_seen_digest):
            # This side's own last write, or the payload it already processed.
            conversation.known_version = content.version
            return
        associated = (
            hardened_associated_data(conversation.peer_role, conversation.received)
            if self.hardened
            else None
        )
        try:
            plaintext = open_sealed(conversation.secret, content.payload, associated)
        except PayloadRejected:
            self.stats.payloads_rejected += 1
            conversation.known_version = content.version
            conversation.last_seen_digest = digest
            log.warning(
                "dropped a payload for %s that did not authenticate (tampered, replayed or "
                "reflected)",
                conversation.handle,
            )
            raise
        envelope_id = f"{conversation.mailbox_id}:{content.version}:{digest.hex()[:16]}"
        conversation.in_flight = (envelope_id, content.version, digest)
        self.stats.payloads_received += 1
        self._arrived.put_nowait(
            IncomingMessage(peer=conversation.handle, payload=plaintext, envelope_id=envelope_id)
        )

    def _conversation(self, peer: str) -> _Conversation:
        conversation = self._conversations.get(peer)
        if conversation is None:
            raise UnknownPeer(f"no relay share {peer} on this channel")
        return conversation

    def _client_for(self, url: str) -> RelayClient:
        origin = relay_origin(url)
        client = self._clients.get(origin)
        if client is None:
            client = RelayClient(url, transport=self._transport, verify=self._verify)
            self._clients[origin] = client
        return client

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ChannelClosed("the relay channel is closed")


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
