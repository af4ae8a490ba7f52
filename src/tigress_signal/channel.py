"""The one interface a wallet uses to move transfer messages, whatever carries them.

A :class:`CredentialChannel` sends an encoded transfer message to a peer and yields the
transfer messages that arrive. It knows nothing about credentials or shares: the share logic
encodes and decodes messages, and the channel only moves bytes end-to-end encrypted.

Receiving is at-least-once by design. A channel hands out an :class:`IncomingMessage`, the
wallet stores the message's effect together with ``incoming.record_changes`` (libsignal state
the decryption produced) in one transaction, and only then calls :meth:`acknowledge`, after
which the message is deleted upstream. If the wallet cannot store the effect it calls
:meth:`release` instead, and the message will be delivered again.
"""

from __future__ import annotations

import abc
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
    """

    peer: str
    payload: bytes
    envelope_id: str
    record_changes: Sequence[RecordChange] = field(default=())
    identity_changes: Sequence[IdentityChanged] = field(default=())


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

    @abc.abstractmethod
    def receive(self) -> AsyncIterator[IncomingMessage]:
        """Yield incoming transfer messages until the channel is closed.

        Messages the wallet has already processed, and messages that cannot be decrypted, are
        acknowledged and dropped by the channel and never yielded.
        """

    @abc.abstractmethod
    async def acknowledge(self, incoming: IncomingMessage) -> None:
        """Tell the channel the message's effect is stored; it will not be delivered again."""

    @abc.abstractmethod
    async def release(self, incoming: IncomingMessage) -> None:
        """Give up on a message whose effect could not be stored; it will come again."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving and free the channel's connections."""
