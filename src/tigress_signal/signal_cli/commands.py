"""``tigress-signal signal-cli ...``: run a signal-cli daemon, list its accounts, link one.

* ``start`` launches the daemon in manual receive mode on D-Bus and/or a JSON-RPC socket, waits
  until it answers, and restarts it whenever it exits, until interrupted (``--check`` only
  starts it, reports and stops it).
* ``accounts`` lists the daemon's accounts.
* ``link`` makes the daemon a secondary device of a phone's Signal account: it shows the
  ``sgnl://`` link as a QR code to scan in the Signal app (Settings, Linked devices).
* ``init-wallet`` makes a wallet folder whose transfers go through one of those accounts.

``accounts``, ``link`` and ``init-wallet`` talk JSON-RPC when given ``--socket`` or ``--tcp``,
and D-Bus otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tigress_signal.bridge.signal_cli_dbus import DEFAULT_BUS_NAME, SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.errors import ConfigError, SignalCliFailure
from tigress_signal.signal_cli.daemon import (
    DEFAULT_READY_TIMEOUT,
    DaemonOptions,
    SignalCliDaemon,
    find_java_home,
    find_signal_cli,
)
from tigress_signal.wallet.config import SignalCliSettings

#: How often ``link`` over D-Bus looks for the new account.
_LINK_POLL = 0.5


def add_commands(commands: Any) -> None:
    """Add the ``signal-cli`` command group to the main parser's subcommands."""
    group = commands.add_parser(
        "signal-cli", help="run and query a signal-cli daemon (real Signal accounts)"
    ).add_subparsers(title="signal-cli commands", metavar="COMMAND", required=True)

    start = group.add_parser("start", help="run a daemon in manual receive mode, restarting it")
    start.add_argument("--config", type=Path, help="signal-cli's data folder (its --config)")
    start.add_argument("--no-dbus", action="store_true", help="do not export D-Bus")
    start.add_argument("--bus-address", help="the D-Bus bus (default: the session bus)")
    start.add_argument("--bus-name", default=DEFAULT_BUS_NAME)
    start.add_argument("--socket", type=Path, help="also serve JSON-RPC on this UNIX socket")
    start.add_argument("--tcp", metavar="HOST:PORT", help="also serve JSON-RPC on loopback TCP")
    start.add_argument("--signal-cli", type=Path, help="signal-cli's start script")
    start.add_argument("--java-home", type=Path, help="a Java 21+ runtime")
    start.add_argument(
        "--wait", type=float, default=DEFAULT_READY_TIMEOUT, help="seconds to wait for it"
    )
    start.add_argument("--check", action="store_true", help="start, report, and stop again")
    start.set_defaults(run=_start)

    accounts = group.add_parser("accounts", help="list the daemon's accounts")
    _endpoint_arguments(accounts)
    accounts.set_defaults(run=_accounts)

    link = group.add_parser("link", help="link the daemon to a phone's account (QR code)")
    _endpoint_arguments(link)
    link.add_argument("--name", default="tigress-signal", help="this device's name")
    link.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for the phone to scan"
    )
    link.set_defaults(run=_link)

    init = group.add_parser("init-wallet", help="make a wallet that uses a signal-cli account")
    init.add_argument("folder", type=Path)
    init.add_argument("--account", required=True, help="the account's number, E.164")
    init.add_argument("--trust", choices=["tofu", "always", "verify"], default="tofu")
    _endpoint_arguments(init)
    init.set_defaults(run=_init_wallet)


def _endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus-address", help="D-Bus: the bus (default: the session bus)")
    parser.add_argument("--bus-name", default=DEFAULT_BUS_NAME, help="D-Bus: signal-cli's name")
    parser.add_argument("--socket", type=Path, help="JSON-RPC: the daemon's UNIX socket")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="JSON-RPC: the daemon's loopback port")


def _client(args: argparse.Namespace, timeout: float = 30.0) -> Any:
    if args.socket is not None:
        return SignalCliJsonRpcClient.unix(args.socket, call_timeout=timeout)
    if args.tcp is not None:
        host, _, port = args.tcp.rpartition(":")
        return SignalCliJsonRpcClient.tcp_loopback(host.strip("[]"), int(port), timeout)
    return SignalCliDbusClient(
        bus_address=args.bus_address, bus_name=args.bus_name, call_timeout=timeout
    )


async def _start(args: argparse.Namespace) -> int:
    options = DaemonOptions(
        config_dir=args.config,
        dbus=not args.no_dbus,
        bus_address=args.bus_address,
        bus_name=args.bus_name,
        socket=args.socket,
        tcp=args.tcp,
    )
    daemon = SignalCliDaemon(
        options,
        signal_cli=find_signal_cli(args.signal_cli),
        java_home=find_java_home(args.java_home),
    )
    await daemon.start(args.wait)
    where = [f"D-Bus name {args.bus_name}"] if options.dbus else []
    where += [f"socket {args.socket}"] if args.socket else []
    where += [f"TCP {args.tcp}"] if args.tcp else []
    print(f"signal-cli is running (pid {daemon.pid}) on {', '.join(where)}", flush=True)
    if args.check:
        await daemon.stop()
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    await daemon.supervise(stop, ready_timeout=args.wait)
    return 0


async def _accounts(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        await client.connect()
        numbers = await client.list_accounts()
    finally:
        await client.close()
    print("\n".join(numbers) if numbers else "no accounts (link one with 'signal-cli link')")
    return 0


async def _link(args: argparse.Namespace) -> int:
    client = _client(args, timeout=max(args.wait, 30.0))
    try:
        await client.connect()
        if isinstance(client, SignalCliDbusClient):
            before = set(await client.list_accounts())
            uri = await client.link(args.name)
            _show_link(uri)
            number = await _new_account(client, before, args.wait)
        else:
            started = await client.call("startLink")
            uri = str(started.get("deviceLinkUri", "")) if isinstance(started, dict) else ""
            _show_link(uri)
            finished = await client.call(
                "finishLink", {"deviceLinkUri": uri, "deviceName": args.name}
            )
            number = str(finished.get("number", "")) if isinstance(finished, dict) else ""
    finally:
        await client.close()
    print(f"linked: {number}" if number else "linked")
    return 0


async def _new_account(client: SignalCliDbusClient, before: set[str], wait: float) -> str:
    # Over D-Bus, link() returns at once and signal-cli finishes in the background; the new
    # account shows up in listAccounts when the phone has confirmed.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while True:
                added = set(await client.list_accounts()) - before
                if added:
                    return sorted(added)[0]
                await asyncio.sleep(_LINK_POLL)
    raise SignalCliFailure(
        f"no new account appeared within {wait:.0f} s",
        hint="scan the code in the Signal app (Settings, Linked devices) and try again",
    )


def _show_link(uri: str) -> None:
    if not uri.startswith("sgnl://"):
        raise SignalCliFailure(f"signal-cli gave no device link ({uri!r})")
    import qrcode

    code = qrcode.QRCode(border=1)
    code.add_data(uri)
    code.make(fit=True)
    print("Scan this in the Signal app (Settings, Linked devices, Link new device):")
    code.print_ascii(out=sys.stdout, invert=True)
    print(uri, flush=True)


async def _init_wallet(args: argparse.Namespace) -> int:
    from tigress_signal.wallet.wallet import Wallet

    json_rpc = args.socket is not None or args.tcp is not None
    try:
        settings = SignalCliSettings(
            account=args.account,
            bus_address=None if json_rpc else args.bus_address,
            bus_name=args.bus_name,
            socket=args.socket,
            tcp=args.tcp,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"--account {args.account!r}: {problems}") from None
    wallet = await Wallet.create_signal_cli(
        args.folder, settings, transport="jsonrpc" if json_rpc else "dbus", trust_policy=args.trust
    )
    async with wallet:
        print(wallet.account_id)
    return 0
