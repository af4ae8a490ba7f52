"""A fake signal-cli 0.13.19: its D-Bus objects and its JSON-RPC socket, over a fake Signal.

:class:`FakeSignal` plays Signal's servers: registered accounts, a mailbox per account that
keeps messages until a daemon takes them, identity trust, and failures on demand.
:class:`FakeDbusDaemon` and :class:`FakeJsonRpcDaemon` play a multi-account (or single-account)
signal-cli daemon in manual receive mode on top of it, so two wallets whose accounts live in the
fake can run whole transfers. The tests use it, and so does ``tigress-signal compare`` for its
functional-only signal-cli row; it is package data so that it needs nothing from ``tests/``.

The D-Bus side answers from a method table built from the introspection recorded from
signal-cli 0.13.19 (``signal_cli_0_13_19/``), and answers ``Introspect`` from the same table, so
it exports exactly those interfaces. Like dbus-java it dispatches on member *and* signature, and
names its own errors ``org.freedesktop.dbus.errors.*``. It emits the legacy ``MessageReceived``
before every ``MessageReceivedV2``, as signal-cli does. The JSON-RPC side answers requests
concurrently (so answers can come out of order), wraps notifications the way manual mode does,
and forgets a connection's subscriptions when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

RECORDED = Path(__file__).parent / "signal_cli_0_13_19"
LINK_URI = "sgnl://linkdevice?uuid=fake-uuid&pub_key=fake-key"
LINKED = "+15555550777"
ROOT = "/org/asamk/Signal"
VERSION = "0.13.19"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


# -- the fake Signal service ------------------------------------------------------------------


@dataclass
class _Mailbox:
    uuid: str
    messages: deque[tuple[str, str, int, str]] = field(default_factory=deque)
    listeners: list[Callable[[str, str, int, str], None]] = field(default_factory=list)


class SendFailure(Exception):
    """A recipient the fake Signal refuses, with the SendMessageResult type it would report."""

    def __init__(self, kind: str, recipient: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.recipient = recipient


class FakeSignal:
    """Signal's servers, as far as signal-cli's daemons need them."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, _Mailbox] = {}
        self.untrusted: set[tuple[str, str]] = set()
        self.sent: list[tuple[str, str, str]] = []
        self._clock = itertools.count(1_700_000_000_000)

    def register(self, number: str) -> str:
        """Create an account; returns its ACI."""
        aci = str(uuid.uuid4())
        self.mailboxes[number] = _Mailbox(aci)
        return aci

    def number_of(self, recipient: str) -> str | None:
        if recipient in self.mailboxes:
            return recipient
        return next((n for n, box in self.mailboxes.items() if box.uuid == recipient), None)

    def send(self, sender: str, recipient: str, text: str) -> tuple[int, str, str]:
        """Store a message in the recipient's mailbox; returns (timestamp, number, aci)."""
        number = self.number_of(recipient)
        if number is None:
            raise SendFailure("UNREGISTERED_FAILURE", recipient)
        if (sender, number) in self.untrusted:
            raise SendFailure("IDENTITY_FAILURE", recipient)
        timestamp = next(self._clock)
        self.sent.append((sender, number, text))
        box = self.mailboxes[number]
        box.messages.append((sender, self.mailboxes[sender].uuid, timestamp, text))
        self.pump(number)
        return timestamp, number, box.uuid

    def pump(self, number: str) -> None:
        """Hand waiting messages to the account's listener (a subscribed daemon), if any."""
        box = self.mailboxes[number]
        while box.listeners and box.messages:
            sender, sender_uuid, timestamp, text = box.messages.popleft()
            for listener in list(box.listeners):
                listener(sender, sender_uuid, timestamp, text)

    def waiting(self, number: str) -> int:
        """How many messages wait at the server for ``number``."""
        return len(self.mailboxes[number].messages)


def _invalid_number(recipient: str) -> bool:
    if _E164.match(recipient):
        return False
    try:
        uuid.UUID(recipient)
    except ValueError:
        return True
    return False


# -- introspection --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    name: str
    in_signature: str
    out_signature: str


def _load(xml_name: str) -> tuple[str, list[_Method]]:
    """The XML of a recorded object, and the methods of its own (non-freedesktop) interfaces."""
    text = (RECORDED / xml_name).read_text(encoding="utf-8")
    methods = []
    # The package's own recorded files, not outside input.
    for interface in ElementTree.fromstring(text).findall("interface"):  # noqa: S314
        name = interface.get("name", "")
        if name.startswith("org.freedesktop.DBus."):
            continue
        for method in interface.findall("method"):
            args = method.findall("arg")
            methods.append(
                _Method(
                    f"{name}.{method.get('name')}",
                    "".join(a.get("type", "") for a in args if a.get("direction") == "in"),
                    "".join(a.get("type", "") for a in args if a.get("direction") == "out"),
                )
            )
    return text, methods


def interface_summary(xml: str) -> tuple[frozenset[str], frozenset[str]]:
    """What an introspection XML declares, in a form that ignores order and formatting.

    Returns:
        The members (``interface method|signal|property name signature ... errors``) and the
        child node names.
    """
    # Introspection from a daemon the caller started on its own private bus.
    root = ElementTree.fromstring(xml)  # noqa: S314
    members = set()
    for interface in root.findall("interface"):
        name = interface.get("name")
        for kind in ("method", "signal", "property"):
            for member in interface.findall(kind):
                args = " ".join(
                    f"{a.get('direction', 'out')}:{a.get('type')}" for a in member.findall("arg")
                )
                errors = ",".join(
                    sorted(
                        str(a.get("value"))
                        for a in member.findall("annotation")
                        if a.get("name") == "org.freedesktop.DBus.Method.Error"
                    )
                )
                extra = (
                    f"{member.get('type')} {member.get('access')}" if kind == "property" else ""
                )
                members.add(f"{name} {kind} {member.get('name')} ({args}) {extra} [{errors}]")
    children = frozenset(n.get("name", "") for n in root.findall("node"))
    return frozenset(members), children


def _node_xml(path: str, body: str, children: list[str]) -> str:
    # The recorded XML of an object, renamed to the path it is exported on, with its children.
    root = ElementTree.fromstring(body)  # noqa: S314 - the package's recorded XML
    root.set("name", path)
    for child in root.findall("node"):
        root.remove(child)
    for name in children:
        ElementTree.SubElement(root, "node", {"name": name})
    return (
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"'
        ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
        + ElementTree.tostring(root, encoding="unicode")
    )


_CONTAINER = (
    "<node><interface name='org.freedesktop.DBus.Introspectable'><method name='Introspect'>"
    "<arg type='s' direction='out'/></method></interface></node>"
)


# -- D-Bus daemon --------------------------------------------------------------------------


class FakeDbusDaemon:
    """signal-cli's D-Bus front end in manual receive mode, on a bus the test started.

    Args:
        signal: the fake Signal service.
        accounts: the accounts this daemon runs (each must be registered with ``signal``).
        bus_address: the private bus.
        bus_name: the well-known name to own.
        single_account: export the (one) account at ``/org/asamk/Signal`` as ``-a`` does.
    """

    def __init__(
        self,
        signal: FakeSignal,
        accounts: list[str],
        bus_address: str,
        *,
        bus_name: str = "org.asamk.Signal",
        single_account: bool = False,
    ) -> None:
        self.signal = signal
        self.accounts = list(accounts)
        self.bus_address = bus_address
        self.bus_name = bus_name
        self.single_account = single_account
        self.calls: list[tuple[str, str, list[Any]]] = []
        self.subscribers: dict[str, int] = dict.fromkeys(accounts, 0)
        self._control_xml, control_methods = _load("control.xml")
        self._account_xml, account_methods = _load("account.xml")
        self._config_xml, _ = _load("account_Configuration.xml")
        self._control_methods = {(m.name, m.in_signature): m for m in control_methods}
        self._account_methods = {(m.name, m.in_signature): m for m in account_methods}
        self._bus: MessageBus | None = None
        self._listeners: dict[str, Callable[[str, str, int, str], None]] = {}

    async def start(self) -> None:
        self._bus = await MessageBus(bus_address=self.bus_address).connect()
        self._bus.add_message_handler(self._on_message)
        await self._bus.request_name(self.bus_name)

    async def stop(self) -> None:
        """Go away like a killed daemon: the name is released and subscriptions are gone."""
        for number, listener in self._listeners.items():
            with contextlib.suppress(ValueError):
                self.signal.mailboxes[number].listeners.remove(listener)
        self._listeners.clear()
        self.subscribers = dict.fromkeys(self.accounts, 0)
        if self._bus is not None:
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            self._bus = None

    def link_account(self) -> None:
        """What happens when a phone confirms a link: a new account in this daemon."""
        if LINKED not in self.signal.mailboxes:
            self.signal.register(LINKED)
        if LINKED not in self.accounts:
            self.accounts.append(LINKED)
            self.subscribers[LINKED] = 0

    def path_of(self, number: str) -> str:
        return ROOT if self.single_account else f"{ROOT}/_{number[1:]}"

    # -- dispatch ---------------------------------------------------------------------------

    def _on_message(self, message: Message) -> Message | bool:
        if message.message_type is not MessageType.METHOD_CALL:
            return False
        path = message.path or ""
        member = f"{message.interface}.{message.member}"
        self.calls.append((path, member, list(message.body)))
        if member == "org.freedesktop.DBus.Introspectable.Introspect":
            xml = self._introspect(path)
            if xml is None:
                return self._error(
                    message,
                    "org.freedesktop.dbus.errors.UnknownObject",
                    "Introspecting on non-existant object",
                )
            return Message.new_method_return(message, "s", [xml])
        if member == "org.freedesktop.DBus.Peer.Ping":
            return Message.new_method_return(message)
        account = self._account_at(path)
        if path == ROOT and not self.single_account:
            table = self._control_methods
        elif account is not None:
            table = self._account_methods
        else:
            return self._error(
                message,
                "org.freedesktop.dbus.errors.UnknownObject",
                f"{path} is not an object provided by this process.",
            )
        method = table.get((member, message.signature))
        if method is None:
            return self._error(
                message,
                "org.freedesktop.dbus.errors.UnknownMethod",
                f'Method "{message.member}" with signature'
                f' "{message.signature}" on interface'
                f' "{message.interface}" doesn\'t exist',
            )
        try:
            body = self._answer(member, account, list(message.body))
        except _DbusFailure as failure:
            return self._error(message, failure.name, failure.text)
        return Message.new_method_return(message, method.out_signature, body)

    def _answer(self, member: str, account: str | None, args: list[Any]) -> list[Any]:
        if member in {"org.asamk.SignalControl.version", "org.asamk.Signal.version"}:
            return [VERSION]
        if member == "org.asamk.SignalControl.listAccounts":
            return [[self.path_of(n) for n in self.accounts]]
        if member == "org.asamk.SignalControl.getAccount":
            return [f"{ROOT}/{args[0].replace('+', '_')}"]
        if member == "org.asamk.SignalControl.link":
            # signal-cli answers at once and finishes linking when the phone confirms.
            asyncio.get_running_loop().call_later(0.3, self.link_account)
            return [LINK_URI]
        assert account is not None
        if member == "org.asamk.Signal.getSelfNumber":
            return [account]
        if member == "org.asamk.Signal.subscribeReceive":
            self._subscribe(account)
            return []
        if member == "org.asamk.Signal.unsubscribeReceive":
            self._unsubscribe(account)
            return []
        if member == "org.asamk.Signal.sendMessage":
            text, _attachments, recipients = args
            return [
                self._send(
                    account,
                    text,
                    [recipients] if isinstance(recipients, str) else list(recipients),
                )
            ]
        raise _DbusFailure("org.asamk.Signal.Error.Failure", f"{member}: not faked")

    def _send(self, account: str, text: str, recipients: list[str]) -> int:
        for recipient in recipients:
            if _invalid_number(recipient):
                raise _DbusFailure(
                    "org.asamk.Signal.Error.InvalidNumber",
                    "Invalid number: No valid characters found.",
                )
        timestamp = 0
        for recipient in recipients:
            try:
                timestamp, _number, _aci = self.signal.send(account, recipient, text)
            except SendFailure as failure:
                if failure.kind == "IDENTITY_FAILURE":
                    raise _DbusFailure(
                        "org.asamk.Signal.Error.UntrustedIdentity",
                        f"Untrusted identity: \nFailed to send message:\nUntrusted Identity for"
                        f' "{recipient}"\n{timestamp}',
                    ) from None
                raise _DbusFailure(
                    "org.asamk.Signal.Error.Failure",
                    f'Failure: \nFailed to send message:\nUnregistered user "{recipient}"'
                    f"\n{timestamp}",
                ) from None
        return timestamp

    def _subscribe(self, account: str) -> None:
        self.subscribers[account] += 1
        if account in self._listeners:
            return
        path = self.path_of(account)

        def emit(sender: str, sender_uuid: str, timestamp: int, text: str) -> None:
            if self._bus is None:
                return
            # signal-cli sends the legacy signal first, then the V2 one, for every message.
            self._bus.send(
                Message.new_signal(
                    path,
                    "org.asamk.Signal",
                    "MessageReceived",
                    "xsaysas",
                    [timestamp, sender, b"", text, []],
                )
            )
            self._bus.send(
                Message.new_signal(
                    path,
                    "org.asamk.Signal",
                    "MessageReceivedV2",
                    "xsaysa{sv}",
                    [
                        timestamp,
                        sender,
                        b"",
                        text,
                        {"isViewOnce": Variant("b", False), "expiresInSeconds": Variant("i", 0)},
                    ],
                )
            )

        self._listeners[account] = emit
        self.signal.mailboxes[account].listeners.append(emit)
        self.signal.pump(account)

    def _unsubscribe(self, account: str) -> None:
        self.subscribers[account] = max(0, self.subscribers[account] - 1)
        if self.subscribers[account] == 0 and account in self._listeners:
            self.signal.mailboxes[account].listeners.remove(self._listeners.pop(account))

    def _account_at(self, path: str) -> str | None:
        return next((n for n in self.accounts if self.path_of(n) == path), None)

    def _introspect(self, path: str) -> str | None:
        if path in {"/", "/org", "/org/asamk"}:
            child = {"/": "org", "/org": "asamk", "/org/asamk": "Signal"}[path]
            return _node_xml(path, _CONTAINER, [child])
        if path == ROOT and not self.single_account:
            return _node_xml(path, self._control_xml, [f"_{n[1:]}" for n in self.accounts])
        account = self._account_at(path)
        if account is not None:
            return _node_xml(path, self._account_xml, ["Configuration"])
        if path.endswith("/Configuration") and self._account_at(path.rsplit("/", 1)[0]):
            return _node_xml(path, self._config_xml, [])
        return None

    @staticmethod
    def _error(message: Message, name: str, text: str) -> Message:
        return Message.new_error(message, name, text)


class _DbusFailure(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


# -- JSON-RPC daemon -------------------------------------------------------------------------


class FakeJsonRpcDaemon:
    """signal-cli's JSON-RPC socket in manual receive mode (UNIX socket or TCP on loopback).

    Args:
        signal: the fake Signal service.
        accounts: the accounts this daemon runs.
        socket_path: serve on this UNIX socket, or
        tcp_port: on 127.0.0.1 at this port (0 picks one; see :attr:`port`).
    """

    def __init__(
        self,
        signal: FakeSignal,
        accounts: list[str],
        *,
        socket_path: Path | None = None,
        tcp_port: int | None = None,
    ) -> None:
        self.signal = signal
        self.accounts = list(accounts)
        self.socket_path = socket_path
        self.tcp_port = tcp_port
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None
        self._subscription_ids = itertools.count(0)
        self._writers: set[asyncio.StreamWriter] = set()
        self._random = random.Random(5)  # noqa: S311 - jitter, not a secret

    async def start(self) -> None:
        if self.socket_path is not None:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        else:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.tcp_port or 0)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop like a killed daemon: connections drop, subscriptions are gone."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            # Each connection's handler forgets its subscriptions as it ends; wait for that.
            while self._writers:  # noqa: ASYNC110 - the handlers run on this same loop
                await asyncio.sleep(0.01)
            await self._server.wait_closed()
            self._server = None
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        listeners: list[tuple[str, Callable[[str, str, int, str], None]]] = []
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def write(obj: dict[str, Any]) -> None:
            async with write_lock:
                writer.write((json.dumps(obj) + "\n").encode())
                with contextlib.suppress(ConnectionError):
                    await writer.drain()

        async def answer(request: dict[str, Any]) -> None:
            # A little jitter makes answers overtake each other, as they do in signal-cli.
            await asyncio.sleep(self._random.random() * 0.02)
            response = self._respond(request, listeners, write)
            if "id" in request:
                await write({"jsonrpc": "2.0", **response, "id": request["id"]})

        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError:
                    await write(
                        {
                            "jsonrpc": "2.0",
                            "error": {"code": -32700, "message": "Parse error", "data": None},
                            "id": None,
                        }
                    )
                    continue
                self.requests.append(request)
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionError:
            pass
        finally:
            # signal-cli drops a connection's subscriptions when the connection ends.
            for number, listener in listeners:
                with contextlib.suppress(ValueError):
                    self.signal.mailboxes[number].listeners.remove(listener)
            self._writers.discard(writer)
            writer.close()

    def _respond(
        self,
        request: dict[str, Any],
        listeners: list[tuple[str, Callable[[str, str, int, str], None]]],
        write: Callable[[dict[str, Any]], Any],
    ) -> dict[str, Any]:
        method = request.get("method")
        params = request.get("params") or {}
        if method == "version":
            return {"result": {"version": VERSION}}
        if method == "listAccounts":
            return {"result": [{"number": n} for n in self.accounts]}
        account = params.get("account")
        if account is None and len(self.accounts) == 1:
            account = self.accounts[0]
        if method == "startLink":
            return {"result": {"deviceLinkUri": LINK_URI}}
        if method == "finishLink":
            if params.get("deviceLinkUri") != LINK_URI:
                return _rpc_error(-3, "Link request error: unknown link")
            if LINKED not in self.signal.mailboxes:
                self.signal.register(LINKED)
            self.accounts.append(LINKED)
            return {"result": {"number": LINKED}}
        if method not in {"send", "subscribeReceive", "unsubscribeReceive"}:
            return _rpc_error(-32601, "Method not implemented")
        if account not in self.accounts:
            return _rpc_error(
                -32602,
                "Specified account does not exist"
                if account
                else "Method requires valid account parameter",
            )
        if method == "subscribeReceive":
            subscription = next(self._subscription_ids)

            def emit(sender: str, sender_uuid: str, timestamp: int, text: str) -> None:
                envelope = {
                    "source": sender,
                    "sourceNumber": sender,
                    "sourceUuid": sender_uuid,
                    "sourceName": "",
                    "sourceDevice": 1,
                    "timestamp": timestamp,
                    "serverReceivedTimestamp": timestamp + 5,
                    "serverDeliveredTimestamp": timestamp + 9,
                    "dataMessage": {
                        "timestamp": timestamp,
                        "message": text,
                        "expiresInSeconds": 0,
                        "viewOnce": False,
                    },
                }
                notification = {
                    "jsonrpc": "2.0",
                    "method": "receive",
                    "params": {
                        "subscription": subscription,
                        "result": {"envelope": envelope, "account": account},
                    },
                }
                asyncio.get_running_loop().create_task(write(notification))

            listeners.append((account, emit))
            self.signal.mailboxes[account].listeners.append(emit)
            asyncio.get_running_loop().call_soon(self.signal.pump, account)
            return {"result": subscription}
        if method == "unsubscribeReceive":
            return {"result": {}}
        recipients = params.get("recipient")
        recipients = [recipients] if isinstance(recipients, str) else list(recipients or [])
        for recipient in recipients:
            if _invalid_number(recipient):
                return _rpc_error(
                    -1, f"Invalid phone number '{recipient}': No valid characters found."
                )
        results = []
        timestamp = 0
        failure: SendFailure | None = None
        for recipient in recipients:
            try:
                timestamp, number, aci = self.signal.send(account, recipient, params["message"])
                results.append(
                    {
                        "recipientAddress": {"uuid": aci, "number": number, "username": None},
                        "type": "SUCCESS",
                    }
                )
            except SendFailure as exc:
                failure = exc
                results.append(
                    {
                        "recipientAddress": {"uuid": None, "number": recipient, "username": None},
                        "type": exc.kind,
                    }
                )
        response = {"timestamp": timestamp, "results": results}
        if failure is None:
            return {"result": response}
        if failure.kind == "IDENTITY_FAILURE":
            return _rpc_error(
                -4, "Failed to send message due to untrusted identities", {"response": response}
            )
        return _rpc_error(-1, "Failed to send message", {"response": response})


def _rpc_error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "data": data}}
