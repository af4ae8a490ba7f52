"""What the D-Bus and JSON-RPC clients of signal-cli have in common.

Both clients (:mod:`tigress_signal.bridge.signal_cli_dbus` and
:mod:`tigress_signal.bridge.signal_cli_jsonrpc`) satisfy :class:`SignalCliClient`, so the
channel above them does not care which transport the wallet's configuration picked. They yield
:class:`ReceivedText` for 1:1 text messages only: group messages, reactions, receipts, typing
and calls are not transfer messages and are dropped inside the client.

A Signal message has no id but its sender's timestamp, so a message is identified by the
receiving account, the sender and that timestamp (:attr:`ReceivedText.message_key`).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from tigress_signal.errors import SignalCliInvalidNumber


@dataclass(frozen=True, slots=True)
class ReceivedText:
    """A 1:1 text message signal-cli received for one of its accounts.

    Attributes:
        account: the receiving account (E.164).
        sender: the sender as signal-cli names it: the phone number when known, else the ACI.
        sender_uuid: the sender's ACI when the transport gives it (JSON-RPC does, D-Bus not).
        timestamp: the sender's sent-timestamp in milliseconds, Signal's only message id.
        text: the message body.
    """

    account: str
    sender: str
    sender_uuid: str | None
    timestamp: int
    text: str

    @property
    def message_key(self) -> str:
        """The message's identity: account, sender and timestamp."""
        return f"{self.account}/{self.sender}/{self.timestamp}"

    def __repr__(self) -> str:
        # Never print the body by accident: it may carry a credential.
        return f"ReceivedText({self.message_key!r}, {len(self.text)} chars)"


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """What signal-cli said about a message it sent.

    Attributes:
        timestamp: the message's timestamp (its id at the receiver).
        recipient_number: the recipient's number, when signal-cli said it.
        recipient_uuid: the recipient's ACI, when signal-cli said it.
    """

    timestamp: int
    recipient_number: str | None = None
    recipient_uuid: str | None = None


class SignalCliClient(Protocol):
    """A connection to a signal-cli daemon, whatever the transport."""

    #: ``"dbus"`` or ``"jsonrpc"``, for logs.
    transport: str

    async def connect(self) -> None:
        """Connect (again) to the daemon.

        Raises:
            SignalCliUnavailable: no daemon answers.
            SignalCliUnsupported: what answers is not a signal-cli we can drive.
        """

    async def version(self) -> str:
        """signal-cli's version, e.g. ``"0.13.19"``."""

    async def list_accounts(self) -> list[str]:
        """The daemon's accounts, as E.164 numbers."""

    async def send_text(self, account: str, recipient: str, text: str) -> SendReceipt:
        """Send a text message from ``account`` to ``recipient`` (E.164 or ACI).

        Raises:
            SignalCliError: one of its leaves (untrusted identity, unregistered user, ...).
        """

    def receive(self, account: str) -> AsyncIterator[ReceivedText]:
        """Subscribe to ``account``'s incoming messages and yield its 1:1 texts.

        The iterator follows daemon restarts and subscribes again; it ends when the client is
        closed, and raises :class:`~tigress_signal.errors.SignalCliUnavailable` when the
        connection is lost for good (the caller reconnects).
        """

    async def close(self) -> None:
        """Unsubscribe and disconnect."""


_NUMBER_PUNCTUATION = re.compile(r"[\s\-().\u00a0\u2000-\u200b\u202f/]")


def normalise_recipient(text: str) -> str:
    """A recipient in the one form signal-cli gets from us: E.164, or a lower-case ACI UUID.

    Full-width digits and every kind of space, dash, dot and bracket are accepted in numbers;
    a leading ``00`` is read as ``+``. A number without its country code cannot be known, so it
    is refused rather than guessed.

    Raises:
        SignalCliInvalidNumber: neither an E.164 number nor a UUID.
    """
    folded = unicodedata.normalize("NFKC", text).strip()
    try:
        return str(uuid.UUID(folded)) if len(folded) == 36 else _e164(folded, text)
    except ValueError:
        return _e164(folded, text)


def _e164(folded: str, original: str) -> str:
    compact = _NUMBER_PUNCTUATION.sub("", folded)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    digits = compact[1:]
    if not compact.startswith("+"):
        raise SignalCliInvalidNumber(
            f"{original!r} is not a phone number with its country code (E.164) nor an ACI"
        )
    if not (digits.isascii() and digits.isdigit()) or not 7 <= len(digits) <= 15:
        raise SignalCliInvalidNumber(f"{original!r} is not an E.164 phone number")
    if digits[0] == "0":
        raise SignalCliInvalidNumber(f"{original!r}: a country code never starts with 0")
    return compact
