"""Client of signal-cli's D-Bus interface (``org.asamk.Signal``), on dbus-fast and asyncio.

How it finds its way, and why:

* **Mode.** A daemon started without ``-a`` (multi-account) puts only ``org.asamk.SignalControl``
  on ``/org/asamk/Signal`` and one object per account at ``/org/asamk/Signal/_<digits>``; a
  daemon started with ``-a`` puts the account itself on ``/org/asamk/Signal``. Calling
  ``sendMessage`` on the wrong one gives ``UnknownMethod``, so the mode is read from the root
  object's introspection, and account paths come from ``listAccounts`` (never hard-coded).
* **Receiving.** signal-cli emits every message twice, as legacy ``MessageReceived`` and as
  ``MessageReceivedV2``; only the V2 signal is matched. The signal carries no account, so the
  account is taken from the object path it came from, and only signals whose sender is the
  current owner of the bus name are believed (any client on a session bus can emit a signal
  with any path). In manual receive mode the daemon delivers nothing until ``subscribeReceive``
  is called on the account object.
* **Restarts.** ``NameOwnerChanged`` for the bus name tells when the daemon goes away and comes
  back; the new daemon knows nothing of our subscription, so the client resolves the account
  path again and subscribes again. The match rules name the well-known bus name, which the bus
  resolves to whoever owns it, so they survive the restart.

Warning:
    A D-Bus subscription belongs to the daemon, not to our connection: if this process dies
    without ``unsubscribeReceive``, signal-cli goes on taking messages from Signal's servers and
    emits them to nobody, and they are lost. :meth:`SignalCliDbusClient.close` unsubscribes; the
    JSON-RPC transport, whose subscriptions end with the connection, does not have this gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from xml.etree import ElementTree

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError, InvalidAddressError

from tigress_signal.bridge.signal_cli_client import ReceivedText, SendReceipt
from tigress_signal.bridge.signal_cli_errors import from_dbus_error
from tigress_signal.errors import (
    SignalCliAccountNotFound,
    SignalCliError,
    SignalCliFailure,
    SignalCliInvalidNumber,
    SignalCliUnavailable,
    SignalCliUnsupported,
)

log = logging.getLogger(__name__)

DEFAULT_BUS_NAME = "org.asamk.Signal"
ROOT_PATH = "/org/asamk/Signal"
CONTROL_INTERFACE = "org.asamk.SignalControl"
ACCOUNT_INTERFACE = "org.asamk.Signal"
_BUS = "org.freedesktop.DBus"
_BUS_PATH = "/org/freedesktop/DBus"

#: Seconds to wait for an answer; a send through Signal's servers can take a while.
DEFAULT_CALL_TIMEOUT = 60.0


class SignalCliDbusClient:
    """A connection to a signal-cli daemon over D-Bus.

    Args:
        bus_address: the bus to use (``unix:path=...``); None for the session bus from the
            environment.
        bus_name: signal-cli's well-known name (``--bus-name`` changes it).
        call_timeout: seconds to wait for any one call.
    """

    transport = "dbus"

    def __init__(
        self,
        *,
        bus_address: str | None = None,
        bus_name: str = DEFAULT_BUS_NAME,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self._bus_address = bus_address
        self._bus_name = bus_name
        self._call_timeout = call_timeout
        self._bus: MessageBus | None = None
        self._owner = ""
        self._multi_account = True
        # Account number -> (object path it is subscribed on, queue its texts go to).
        self._subscriptions: dict[str, tuple[str, asyncio.Queue[ReceivedText | None]]] = {}
        self._owner_back = asyncio.Event()
        self._resubscriber: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def multi_account(self) -> bool:
        """Whether the daemon runs in multi-account mode (known after :meth:`connect`)."""
        return self._multi_account

    # -- connection -----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the bus, find the daemon and tell its mode.

        Raises:
            SignalCliUnavailable: the bus cannot be reached, or no daemon owns the name.
            SignalCliUnsupported: the name's owner does not look like signal-cli.
        """
        if self._bus is not None and self._bus.connected:
            await self._find_daemon()
            return
        try:
            bus = MessageBus(bus_address=self._bus_address, bus_type=BusType.SESSION)
            self._bus = await asyncio.wait_for(bus.connect(), self._call_timeout)
        except (OSError, AuthError, InvalidAddressError, TimeoutError) as exc:
            where = self._bus_address or "the session bus (DBUS_SESSION_BUS_ADDRESS)"
            raise SignalCliUnavailable(f"cannot connect to D-Bus at {where}: {exc}") from exc
        self._bus.add_message_handler(self._on_message)
        self._watchdog = asyncio.create_task(self._watch(self._bus), name="signal-cli D-Bus")
        await self._bus_call(
            "AddMatch",
            "s",
            [
                f"type='signal',sender='{_BUS}',interface='{_BUS}',member='NameOwnerChanged',"
                f"arg0='{self._bus_name}'"
            ],
        )
        await self._find_daemon()

    async def _find_daemon(self) -> None:
        try:
            (owner,) = await self._bus_call("GetNameOwner", "s", [self._bus_name])
        except SignalCliError as exc:
            raise SignalCliUnavailable(
                f"no signal-cli daemon owns {self._bus_name} on this bus",
                error_name=exc.error_name,
            ) from exc
        self._owner = str(owner)
        (xml,) = await self._call(ROOT_PATH, "org.freedesktop.DBus.Introspectable", "Introspect")
        interfaces = {
            # The XML comes from the daemon that owns signal-cli's name on our own bus.
            node.get("name")
            for node in ElementTree.fromstring(str(xml)).findall("interface")  # noqa: S314
        }
        if CONTROL_INTERFACE in interfaces:
            self._multi_account = True
        elif ACCOUNT_INTERFACE in interfaces:
            self._multi_account = False
        else:
            raise SignalCliUnsupported(
                f"{self._bus_name} does not offer {CONTROL_INTERFACE} or {ACCOUNT_INTERFACE}"
                f" at {ROOT_PATH}"
            )
        log.info(
            "signal-cli found on D-Bus (%s, %s mode)",
            self._owner,
            "multi-account" if self._multi_account else "single-account",
        )

    async def close(self) -> None:
        """Unsubscribe every account (so signal-cli stops taking messages) and disconnect."""
        self._closed = True
        if self._resubscriber is not None:
            self._resubscriber.cancel()
        for account, (path, queue) in list(self._subscriptions.items()):
            with contextlib.suppress(SignalCliError):
                await asyncio.wait_for(
                    self._call(path, ACCOUNT_INTERFACE, "unsubscribeReceive"), 5.0
                )
            queue.put_nowait(None)
            del self._subscriptions[account]
        if self._bus is not None:
            bus, self._bus = self._bus, None
            bus.disconnect()
        if self._watchdog is not None:
            self._watchdog.cancel()

    # -- calls ----------------------------------------------------------------------------------

    async def version(self) -> str:
        """signal-cli's version."""
        interface = CONTROL_INTERFACE if self._multi_account else ACCOUNT_INTERFACE
        (text,) = await self._call(ROOT_PATH, interface, "version")
        return str(text)

    async def list_accounts(self) -> list[str]:
        """The daemon's accounts (E.164)."""
        if not self._multi_account:
            (number,) = await self._call(ROOT_PATH, ACCOUNT_INTERFACE, "getSelfNumber")
            return [str(number)]
        (paths,) = await self._call(ROOT_PATH, CONTROL_INTERFACE, "listAccounts")
        return [_number_of(str(path)) for path in _strings(paths)]

    async def link(self, device_name: str) -> str:
        """Start linking the daemon as a new device; returns the ``sgnl://`` link to scan.

        signal-cli finishes the linking in the background once the phone confirms; the new
        account then appears in :meth:`list_accounts`.

        Raises:
            SignalCliUnsupported: the daemon runs a single account and cannot link another.
        """
        if not self._multi_account:
            raise SignalCliUnsupported("a single-account signal-cli daemon cannot link devices")
        (uri,) = await self._call(ROOT_PATH, CONTROL_INTERFACE, "link", "s", [device_name])
        return str(uri)

    async def account_path(self, account: str) -> str:
        """The object path of one of the daemon's accounts.

        Raises:
            SignalCliAccountNotFound: the daemon has no such account.
        """
        if not self._multi_account:
            (number,) = await self._call(ROOT_PATH, ACCOUNT_INTERFACE, "getSelfNumber")
            if str(number) != account:
                raise SignalCliAccountNotFound(
                    f"the single-account signal-cli daemon runs {number}, not {account}"
                )
            return ROOT_PATH
        # getAccount only formats a path and never checks it, so ask for the real list.
        (paths,) = await self._call(ROOT_PATH, CONTROL_INTERFACE, "listAccounts")
        wanted = _path_of(account)
        if wanted not in _strings(paths):
            raise SignalCliAccountNotFound(f"signal-cli has no account {account}")
        return wanted

    async def send_text(self, account: str, recipient: str, text: str) -> SendReceipt:
        """Send a text; returns signal-cli's timestamp for it.

        Raises:
            SignalCliError: a leaf for the reason (untrusted identity, invalid number, ...).
        """
        path = await self.account_path(account)
        (timestamp,) = await self._call(
            path, ACCOUNT_INTERFACE, "sendMessage", "sass", [text, [], recipient]
        )
        return SendReceipt(timestamp=_integer(timestamp))

    async def subscribe(self, account: str) -> asyncio.Queue[ReceivedText | None]:
        """Match ``account``'s V2 message signals, then ask the daemon to start receiving."""
        path = await self.account_path(account)
        queue: asyncio.Queue[ReceivedText | None] = asyncio.Queue()
        self._subscriptions[account] = (path, queue)
        await self._bus_call("AddMatch", "s", [self._match_rule(path)])
        await self._call(path, ACCOUNT_INTERFACE, "subscribeReceive")
        log.info("subscribed to %s's messages on D-Bus", account)
        return queue

    async def receive(self, account: str) -> AsyncGenerator[ReceivedText, None]:
        """Yield ``account``'s 1:1 texts, subscribing again after daemon restarts.

        Raises:
            SignalCliUnavailable: the bus connection itself was lost.
        """
        queue = await self.subscribe(account)
        if self._resubscriber is None or self._resubscriber.done():
            self._resubscriber = asyncio.create_task(self._follow_owner(), name="signal-cli owner")
        while True:
            item = await queue.get()
            if item is None:
                if self._closed:
                    return
                raise SignalCliUnavailable("the D-Bus connection to signal-cli was lost")
            yield item

    # -- internals ------------------------------------------------------------------------------

    def _match_rule(self, path: str) -> str:
        return (
            f"type='signal',sender='{self._bus_name}',interface='{ACCOUNT_INTERFACE}',"
            f"member='MessageReceivedV2',path='{path}'"
        )

    def _on_message(self, message: Message) -> bool:
        if message.message_type is not MessageType.SIGNAL:
            return False
        if message.member == "NameOwnerChanged" and message.sender == _BUS:
            name, _old, new = message.body
            if name == self._bus_name:
                self._owner = str(new)
                if new:
                    log.info("signal-cli is back on D-Bus as %s", new)
                    self._owner_back.set()
                else:
                    log.warning("signal-cli left D-Bus; waiting for it to come back")
            return False
        if message.member != "MessageReceivedV2" or message.interface != ACCOUNT_INTERFACE:
            return False
        if not self._owner or message.sender != self._owner:
            log.warning("ignored a message signal from %s, not signal-cli", message.sender)
            return False
        for account, (path, queue) in self._subscriptions.items():
            if message.path == path:
                received = _parse_v2(account, message.body)
                if received is not None:
                    queue.put_nowait(received)
        return False

    async def _watch(self, bus: MessageBus) -> None:
        # A lost bus connection ends every receive iterator with SignalCliUnavailable, so the
        # caller can connect again (a dbus-daemon restart drops all its clients).
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if bus is self._bus:
            self._bus = None
        for _path, queue in self._subscriptions.values():
            queue.put_nowait(None)

    async def _follow_owner(self) -> None:
        while not self._closed:
            await self._owner_back.wait()
            self._owner_back.clear()
            # The new daemon must be asked to receive again; its mode or paths may differ.
            for account, (_path, queue) in list(self._subscriptions.items()):
                try:
                    await self._find_daemon()
                    path = await self.account_path(account)
                    self._subscriptions[account] = (path, queue)
                    await self._bus_call("AddMatch", "s", [self._match_rule(path)])
                    await self._call(path, ACCOUNT_INTERFACE, "subscribeReceive")
                    log.info("subscribed again to %s's messages after a restart", account)
                except SignalCliError as exc:
                    log.warning("could not subscribe again for %s: %s", account, exc)

    async def _bus_call(self, member: str, signature: str, body: list[object]) -> list[object]:
        return await self._send(
            Message(
                destination=_BUS,
                path=_BUS_PATH,
                interface=_BUS,
                member=member,
                signature=signature,
                body=body,
            )
        )

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[object] | None = None,
    ) -> list[object]:
        return await self._send(
            Message(
                destination=self._bus_name,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )

    async def _send(self, message: Message) -> list[object]:
        """The single place where dbus-fast's replies and failures become ours."""
        if self._bus is None or not self._bus.connected:
            raise SignalCliUnavailable("not connected to D-Bus")
        try:
            reply = await asyncio.wait_for(self._bus.call(message), self._call_timeout)
        except TimeoutError as exc:
            raise SignalCliUnavailable(
                f"signal-cli did not answer {message.member} within {self._call_timeout:.0f} s"
            ) from exc
        except (OSError, EOFError) as exc:
            raise SignalCliUnavailable(f"the D-Bus connection failed: {exc}") from exc
        if reply is None:  # pragma: no cover - only for calls sent without expecting a reply
            return []
        if reply.message_type is MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise from_dbus_error(reply.error_name or "", text)
        return list(reply.body)


def _path_of(account: str) -> str:
    if not account.startswith("+") or not account[1:].isdigit():
        raise SignalCliInvalidNumber(f"{account!r} is not an E.164 account number")
    return f"{ROOT_PATH}/_{account[1:]}"


def _number_of(path: str) -> str:
    return "+" + path.rsplit("/_", 1)[-1]


def _parse_v2(account: str, body: list[object]) -> ReceivedText | None:
    # MessageReceivedV2: (x timestamp, s sender, ay groupId, s message, a{sv} extras).
    try:
        timestamp, sender, group_id, text, _extras = body
    except ValueError:
        log.warning("ignored a MessageReceivedV2 signal with %d values", len(body))
        return None
    if group_id:
        return None  # transfers travel 1:1; group chatter is not for the wallet
    if not isinstance(text, str) or not text:
        return None  # reactions, deletes and stickers have an empty body
    return ReceivedText(
        account=account,
        sender=str(sender),
        sender_uuid=None,
        timestamp=_integer(timestamp),
        text=text,
    )


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _integer(value: object) -> int:
    if not isinstance(value, int):
        raise SignalCliFailure(f"signal-cli answered {type(value).__name__} for a timestamp")
    return value
