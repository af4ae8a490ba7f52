"""Which devices hold a WebSocket to this process, and waking them when a message is stored.

Sending stores the message first and then calls :meth:`MessageNotifier.message_stored`; the
WebSocket of the recipient device, if one is open, wakes up and reads its new messages from the
database. The notification carries no message, only "look again", so a lost or duplicated
wake-up costs a query at most and never a message.

With one server process the :class:`DeliveryHub` is the notifier itself. With several processes
on one PostgreSQL database the notifier becomes ``NOTIFY intermediary_mailbox, '<uuid>.<device>'``
and a listener in each process calls :meth:`DeliveryHub.wake` for what it hears; the "connected
elsewhere" hand-over (close code 4409) would travel the same way. Nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from tigress_signal.intermediary.entities import DeviceAddress

logger = logging.getLogger(__name__)


class MessageNotifier(Protocol):
    """Tells the process holding a device's WebSocket that messages were stored for it."""

    async def message_stored(self, device: DeviceAddress) -> None:
        """Called after the transaction that stored messages for ``device`` committed."""
        ...


class Presence:
    """One open WebSocket of one device in this process.

    Attributes:
        device: the device it belongs to.
        wakeup: set when new messages may be stored; the holder clears it before looking.
        displaced: set when a newer connection of the same device took over.
    """

    def __init__(self, device: DeviceAddress) -> None:
        self.device = device
        self.wakeup = asyncio.Event()
        self.displaced = asyncio.Event()


class DeliveryHub:
    """The WebSockets open in this process, one per device, and the in-process notifier."""

    def __init__(self) -> None:
        self._present: dict[DeviceAddress, Presence] = {}

    def attach(self, device: DeviceAddress) -> Presence:
        """Register a new connection of a device; an older one is told it was displaced."""
        previous = self._present.get(device)
        if previous is not None:
            logger.debug("a new connection displaces the open one of a device")
            previous.displaced.set()
        presence = Presence(device)
        presence.wakeup.set()  # look for stored messages right away
        self._present[device] = presence
        return presence

    def detach(self, presence: Presence) -> None:
        """Forget a connection that ended (a no-op when a newer one already replaced it)."""
        if self._present.get(presence.device) is presence:
            del self._present[presence.device]

    def is_connected(self, device: DeviceAddress) -> bool:
        """Whether the device has a WebSocket open to this process."""
        return device in self._present

    def wake(self, device: DeviceAddress) -> None:
        """Tell the device's connection, if any, to look for new messages."""
        presence = self._present.get(device)
        if presence is not None:
            presence.wakeup.set()

    async def message_stored(self, device: DeviceAddress) -> None:
        """:class:`MessageNotifier` for a single process: wake the connection directly."""
        self.wake(device)

    @property
    def connection_count(self) -> int:
        """How many devices are connected."""
        return len(self._present)
