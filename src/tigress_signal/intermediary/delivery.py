"""Which devices hold a WebSocket, and waking them when messages are stored, across processes.

Sending stores the message and, in the same transaction, calls
:meth:`Switchboard.notify_stored` (a notification PostgreSQL releases at the commit); after the
commit it calls :meth:`Switchboard.wake_here`. The WebSocket of each recipient device wakes up
and reads its new messages from the database. A wake-up carries no message, only "look
again", so a lost or duplicated one costs a query at most and never a message.

Two layers:

* :class:`DeliveryHub`: the WebSockets open in this process, one per device.
* :class:`Switchboard`: what crosses processes. Every process records in the database which
  devices it holds (``presence``) and proves it is alive with a heartbeat
  (``server_processes``), so any process can answer "is this device connected anywhere?" for
  ``online`` messages. On PostgreSQL it also sends and listens to notifications on the channel
  ``tigress_intermediary``: "messages stored for these devices", "this device connected here"
  (another process then closes its older connection with 4409) and "this device was removed"
  (its connection is closed with 4401). A process ignores its own notifications, having acted
  on them directly. After the LISTEN connection comes back from a failure, every local
  connection looks again, since notifications sent meanwhile are lost. SQLite serves one
  process, so there the local hub is all there is.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from tigress_signal.intermediary.entities import DeviceAddress
from tigress_signal.storage import Connection, Database
from tigress_signal.storage.database import Listener

logger = logging.getLogger(__name__)

#: The PostgreSQL notification channel the server processes share.
CHANNEL = "tigress_intermediary"
#: Close codes: a newer connection of the device took over; the device was removed.
CLOSE_CONNECTED_ELSEWHERE = 4409
CLOSE_DEVICE_REMOVED = 4401
#: Seconds between heartbeats of a process, and after which a silent process counts as gone.
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 35.0


class Presence:
    """One open WebSocket of one device in this process.

    Attributes:
        device: the device it belongs to.
        connection_id: random id of this connection, recorded in ``presence``.
        wakeup: set when new messages may be stored; the holder clears it before looking.
        closing: set when the connection must end; ``close_code`` and ``close_reason`` say
            how to close it.
    """

    def __init__(self, device: DeviceAddress) -> None:
        self.device = device
        self.connection_id = secrets.token_hex(8)
        self.wakeup = asyncio.Event()
        self.closing = asyncio.Event()
        self.close_code = CLOSE_CONNECTED_ELSEWHERE
        self.close_reason = "Connected elsewhere"

    def request_close(self, code: int, reason: str) -> None:
        """Ask the connection to close with this code (the first request wins)."""
        if not self.closing.is_set():
            self.close_code = code
            self.close_reason = reason
            self.closing.set()


class DeliveryHub:
    """The WebSockets open in this process, one per device."""

    def __init__(self) -> None:
        self._present: dict[DeviceAddress, Presence] = {}

    def attach(self, device: DeviceAddress) -> Presence:
        """Register a new connection of a device; an older one here is told to close (4409)."""
        previous = self._present.get(device)
        if previous is not None:
            logger.debug("a new connection displaces the open one of a device")
            previous.request_close(CLOSE_CONNECTED_ELSEWHERE, "Connected elsewhere")
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

    def wake_all(self) -> None:
        """Tell every connection to look again (after wake-ups may have been lost)."""
        for presence in self._present.values():
            presence.wakeup.set()

    def close_device(self, device: DeviceAddress, code: int, reason: str) -> None:
        """Close the device's connection here, if it has one."""
        presence = self._present.get(device)
        if presence is not None:
            presence.request_close(code, reason)

    @property
    def connection_count(self) -> int:
        """How many devices are connected to this process."""
        return len(self._present)


class Switchboard:
    """Presence, heartbeat and wake-ups between the server processes sharing one database.

    Args:
        db: the intermediary's database.
        hub: this process's connections.
    """

    def __init__(self, db: Database, hub: DeliveryHub) -> None:
        self.db = db
        self.hub = hub
        self.server_id = secrets.token_hex(8)
        self._listener: Listener | None = None

    @property
    def shared(self) -> bool:
        """Whether other processes may share the database (PostgreSQL)."""
        return self.db.dialect == "postgresql"

    @property
    def ready(self) -> bool:
        """Whether wake-ups from other processes can arrive (always true on SQLite)."""
        return self._listener is None or self._listener.connected

    async def start(self) -> None:
        """Record this process and, on PostgreSQL, start listening.

        Raises:
            StoreError: the database refused the first heartbeat.
        """
        now = _now_ms()
        await self.db.execute(
            "INSERT INTO server_processes (server_id, started_at, heartbeat_at)"
            " VALUES ($1, $2, $2)",
            self.server_id,
            now,
        )
        if self.shared:
            self._listener = self.db.listener(
                {CHANNEL: self._on_notification}, on_connect=self._on_listening
            )
            await self._listener.start()

    async def aclose(self) -> None:
        """Stop listening and remove this process's presence and heartbeat."""
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        # The rows of a process that stops must not make its devices look connected.
        await self.db.execute("DELETE FROM presence WHERE server_id = $1", self.server_id)
        await self.db.execute("DELETE FROM server_processes WHERE server_id = $1", self.server_id)

    async def heartbeat(self) -> None:
        """Prove this process is alive (and recreate its row if a sweeper removed it)."""
        now = _now_ms()
        changed = await self.db.execute(
            "UPDATE server_processes SET heartbeat_at = $2 WHERE server_id = $1",
            self.server_id,
            now,
        )
        if changed == 0:
            await self.db.execute(
                "INSERT INTO server_processes (server_id, started_at, heartbeat_at)"
                " VALUES ($1, $2, $2)",
                self.server_id,
                now,
            )

    async def notify_stored(self, conn: Connection, recipient: str, device_ids: list[int]) -> None:
        """Tell the other processes, in the transaction that stores the messages, to wake the
        recipient's devices.

        PostgreSQL holds a notification sent in a transaction until that transaction commits
        (and drops it on a rollback), so a woken process always finds the rows, and the send
        needs no transaction of its own for it. Wake this process's connections with
        :meth:`wake_here` after the commit.
        """
        if self.shared and device_ids:
            ids = ",".join(str(d) for d in device_ids)
            await conn.execute(
                "SELECT pg_notify($1, $2)", CHANNEL, f"{self.server_id} stored {recipient} {ids}"
            )

    def wake_here(self, recipient: str, device_ids: list[int]) -> None:
        """Wake the recipient's devices connected to this process."""
        for device_id in device_ids:
            self.hub.wake(DeviceAddress(recipient, device_id))

    async def connected(self, presence: Presence) -> None:
        """Record a new connection and close the device's older one in other processes."""
        device = presence.device
        # SQLite (3.24+) and PostgreSQL share this upsert syntax.
        upsert = (
            "INSERT INTO presence (account_uuid, device_id, server_id, connection_id,"
            " connected_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (account_uuid, device_id) DO UPDATE SET"
            " server_id = EXCLUDED.server_id, connection_id = EXCLUDED.connection_id,"
            " connected_at = EXCLUDED.connected_at"
        )
        await self.db.execute(
            upsert,
            device.uuid,
            device.device_id,
            self.server_id,
            presence.connection_id,
            _now_ms(),
        )
        if self.shared:
            await self._notify("connected", device.uuid, [device.device_id])

    async def disconnected(self, presence: Presence) -> None:
        """Forget a connection that ended (unless a newer one already replaced its row)."""
        await self.db.execute(
            "DELETE FROM presence WHERE account_uuid = $1 AND device_id = $2"
            " AND connection_id = $3",
            presence.device.uuid,
            presence.device.device_id,
            presence.connection_id,
        )

    async def device_removed(self, device: DeviceAddress) -> None:
        """Close a removed device's connection wherever it is."""
        self.hub.close_device(device, CLOSE_DEVICE_REMOVED, "Device removed")
        if self.shared:
            await self._notify("removed", device.uuid, [device.device_id])

    async def connected_devices(self, account: str) -> set[int]:
        """The devices of an account with a WebSocket open to a live process."""
        rows = await self.db.fetch(
            "SELECT p.device_id FROM presence p"
            " JOIN server_processes s ON s.server_id = p.server_id"
            " WHERE p.account_uuid = $1 AND s.heartbeat_at > $2",
            account,
            _now_ms() - int(STALE_AFTER_SECONDS * 1000),
        )
        return {int(row[0]) for row in rows}

    async def _notify(self, kind: str, account: str, device_ids: list[int]) -> None:
        ids = ",".join(str(d) for d in device_ids)
        await self.db.notify(CHANNEL, f"{self.server_id} {kind} {account} {ids}")

    def _on_notification(self, payload: str) -> None:
        try:
            origin, kind, account, ids = payload.split(" ")
            devices = [DeviceAddress(account, int(d)) for d in ids.split(",")]
        except ValueError:
            logger.warning("ignored a notification that is not ours")
            return
        if origin == self.server_id:
            return  # acted on already, without the round trip
        for device in devices:
            if kind == "stored":
                self.hub.wake(device)
            elif kind == "connected":
                self.hub.close_device(device, CLOSE_CONNECTED_ELSEWHERE, "Connected elsewhere")
            elif kind == "removed":
                self.hub.close_device(device, CLOSE_DEVICE_REMOVED, "Device removed")

    def _on_listening(self) -> None:
        # Notifications sent while the LISTEN connection was down are gone; look again.
        self.hub.wake_all()


def _now_ms() -> int:
    return int(time.time() * 1000)
