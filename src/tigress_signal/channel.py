"""The one interface a wallet uses to move transfer messages, whatever carries them.

A :class:`CredentialChannel` sends an encoded transfer message to a peer and yields the
transfer messages that arrive. It knows nothing about credentials or shares: the share logic
encodes and decodes messages, and the channel only moves bytes end-to-end encrypted.

Sending is in two phases so that a wallet can store a message's ciphertext together with the
share change that caused it: :meth:`CredentialChannel.seal` encrypts (and holds the peer's
session until :meth:`CredentialChannel.settle`), the wallet commits the sealed message to its
outbox in the same transaction as the share change, and :meth:`CredentialChannel.deliver`
hands the stored bytes over, as often as it takes: a resend after a crash sends the same bytes,
which the receiving side recognises as a copy.

Receiving is at-least-once by design. A channel hands out an :class:`IncomingMessage`, the
wallet stores the message's effect together with ``incoming.record_changes`` (libsignal state
the decryption produced) in one transaction, and only then calls :meth:`acknowledge`, after
which the message is deleted upstream. If the wallet cannot store the effect it calls
:meth:`release` instead, and the message will be delivered again.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from tigress_signal.bridge.records import IdentityChanged, RecordChange


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A transfer message that arrived and is not acknowledged yet.

    Attributes:
        peer: the sender, as this channel addresses peers (an account id for the intermediary).
        payload: the decrypted, still encoded transfer message.
        envelope_id: the channel's id of the delivery (used to acknowledge and to drop copies).
        record_changes: libsignal records the decryption changed, to be committed with the
            message's effect.
        identity_changes: peers whose identity key changed during decryption.
        device_id: which of the sender's devices sent it; 1 on channels that do not tell
            devices apart (the relay, signal-cli), where a peer is one device.
    """

    peer: str
    payload: bytes
    envelope_id: str
    record_changes: Sequence[RecordChange] = field(default=())
    identity_changes: Sequence[IdentityChanged] = field(default=())
    device_id: int = 1


@dataclass(frozen=True, slots=True)
class SealedMessage:
    """A transfer message made ready for one peer, to be stored before it is delivered.

    Attributes:
        peer: the recipient.
        wire: what the channel will deliver (for the self-hosted channel, the ciphertexts for
            each of the peer's devices); opaque to the wallet, which stores it in its outbox.
        record_changes: libsignal records the sealing changed, to be committed with it.
    """

    peer: str
    wire: bytes
    record_changes: Sequence[RecordChange] = field(default=())


class CredentialChannel(abc.ABC):
    """Moves encoded transfer messages between wallets.

    Implementations: the self-hosted intermediary
    (:class:`tigress_signal.adapters.selfhosted.SelfHostedChannel`).
    """

    #: A short name for logs and reports, e.g. ``"selfhosted"``.
    name: str

    @abc.abstractmethod
    async def send(self, peer: str, payload: bytes, *, summary: str = "") -> None:
        """Send one encoded transfer message to every device of ``peer``.

        Args:
            peer: the recipient, as this channel addresses peers.
            payload: the encoded transfer message (the channel encrypts it).
            summary: one human-readable line describing the message, for channels whose
                messages a person may also see; never secret.

        Raises:
            ChannelError: the message could not be sent.
            UntrustedIdentity: the peer's identity key is not trusted for sending.
        """

    async def seal(
        self,
        peer: str,
        payload: bytes,
        *,
        summary: str = "",
        during: IncomingMessage | None = None,
    ) -> SealedMessage:
        """Make ``payload`` ready for ``peer``; the caller stores it, then calls :meth:`settle`.

        Channels that encrypt here hold the peer's session from this call until
        :meth:`settle`, so nothing else changes it before the caller has committed. This default
        does no encryption: the wire form is the payload itself, and :meth:`deliver` sends it.

        Args:
            peer: the recipient.
            payload: the encoded transfer message.
            summary: one human-readable line for channels a person may also read.
            during: the incoming message being processed when this reply is sealed; its peer's
                session is already held and is not taken twice.
        """
        return SealedMessage(peer, _plain_wire(payload, summary))

    async def settle(self, sealed: SealedMessage, *, stored: bool) -> None:  # noqa: B027
        """Release what :meth:`seal` held; when not ``stored``, forget what it changed.

        The default seal holds nothing and changes nothing, so there is nothing to do here;
        channels that encrypt in :meth:`seal` override it.
        """

    def remember_sent(  # noqa: B027 - a hook: channels that can resend override it
        self, conn: sqlite3.Connection, sealed: SealedMessage, *, message_id: str, share_id: str
    ) -> None:
        """Note, in the caller's transaction, that a sealed message was stored for delivery.

        The self-hosted channel logs it there so that it can send it again on a new session
        when the peer reports it could not decrypt it. This default keeps nothing.

        Args:
            conn: the wallet transaction that stores the sealed message in the outbox.
            sealed: the sealed message.
            message_id: its transfer message id.
            share_id: the share it belongs to.
        """

    async def deliver(self, sealed: SealedMessage) -> None:
        """Hand a stored sealed message over; may be called again for the same message.

        Raises:
            UnknownPeer: the recipient does not exist on this channel (final).
            ChannelError: not delivered now; the caller keeps it and tries again later.
        """
        payload, summary = _unplain_wire(sealed.wire)
        await self.send(sealed.peer, payload, summary=summary)

    @abc.abstractmethod
    def receive(self) -> AsyncIterator[IncomingMessage]:
        """Yield incoming transfer messages until the channel is closed.

        Messages the wallet has already processed, and messages that cannot be decrypted, are
        acknowledged and dropped by the channel and never yielded.
        """

    async def replay_held(self, peer: str | None = None) -> AsyncIterator[IncomingMessage]:
        """Yield messages the channel kept because their sender's key was not trusted.

        Called after the user trusts a key (and when the wallet starts): messages whose sender
        is trusted now come out oldest first, each once, and are acknowledged or released like
        :meth:`receive`'s. This default keeps nothing, so yields nothing: channels whose trust
        decisions live elsewhere (signal-cli keeps its own) never hold a message back.

        Args:
            peer: only this sender's messages; every sender's when None.
        """
        for _ in ():
            yield _

    @abc.abstractmethod
    async def acknowledge(self, incoming: IncomingMessage) -> None:
        """Tell the channel the message's effect is stored; it will not be delivered again."""

    @abc.abstractmethod
    async def release(self, incoming: IncomingMessage) -> None:
        """Give up on a message whose effect could not be stored; it will come again."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving and free the channel's connections."""


def _plain_wire(payload: bytes, summary: str) -> bytes:
    # The summary travels in front of the payload, separated by a NUL it cannot contain.
    return summary.replace("\0", " ").encode("utf-8") + b"\0" + payload


def _unplain_wire(wire: bytes) -> tuple[bytes, str]:
    summary, _, payload = wire.partition(b"\0")
    return payload, summary.decode("utf-8", errors="replace")
