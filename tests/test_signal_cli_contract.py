"""Contract tests against the real signal-cli 0.13.19, with no account and no network.

The daemon runs inside a network namespace of its own (``unshare -n``: loopback only), on a
private dbus-daemon and a UNIX socket in a temporary folder; with no account it never tries to
reach Signal's servers, and in that namespace it could not. It is started by our own launcher
(:class:`~tigress_signal.signal_cli.daemon.SignalCliDaemon`), so the launcher is tested too.

signal-cli and a Java 21+ runtime are installed by ``scripts/setup.sh``; if they are missing
these tests fail (they are never skipped).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from signal_cli_fixtures import private_bus, short_tmp
from tigress_signal.bridge.signal_cli_dbus import SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.errors import SignalCliAccountNotFound, SignalCliUnavailable
from tigress_signal.signal_cli.daemon import (
    SIGNAL_CLI_VERSION,
    DaemonOptions,
    SignalCliDaemon,
    daemon_environment,
    find_java_home,
    find_signal_cli,
)
from tigress_signal.testing.fake_signal_cli import RECORDED, interface_summary

NO_NETWORK = ("unshare", "--net")
READY = 60.0


@dataclass
class RealDaemon:
    folder: Path
    bus_address: str
    socket: Path
    daemon: SignalCliDaemon


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_daemon() -> AsyncIterator[RealDaemon]:
    with short_tmp() as folder:
        log_file = folder / "daemon.log"
        async with private_bus(folder) as address:
            options = DaemonOptions(
                config_dir=folder / "data",
                bus_address=address,
                socket=folder / "rpc.sock",
                wrapper=NO_NETWORK,
                log_file=log_file,
            )
            daemon = SignalCliDaemon(options)
            try:
                await daemon.start(ready_timeout=READY)
            except SignalCliUnavailable:
                log = log_file.read_text() if log_file.exists() else ""
                pytest.fail(f"the real signal-cli did not start:\n{log[-2000:]}")
            try:
                yield RealDaemon(folder, address, folder / "rpc.sock", daemon)
            finally:
                await daemon.stop()


in_module_loop = pytest.mark.asyncio(loop_scope="module")


def test_signal_cli_and_java_are_installed() -> None:
    # A missing install is a failure here, not a skip.
    assert find_signal_cli().is_file()
    assert (find_java_home() / "bin" / "java").is_file()


@in_module_loop
async def test_dbus_finds_the_control_interface(real_daemon: RealDaemon) -> None:
    client = SignalCliDbusClient(bus_address=real_daemon.bus_address)
    await client.connect()
    try:
        assert client.multi_account
        assert await client.version() == SIGNAL_CLI_VERSION
        assert await client.list_accounts() == []
        with pytest.raises(SignalCliAccountNotFound):
            await client.account_path("+15555550123")
    finally:
        await client.close()


@in_module_loop
async def test_control_introspection_equals_the_recorded_one(real_daemon: RealDaemon) -> None:
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=real_daemon.bus_address).connect()
    try:
        node = await bus.introspect("org.asamk.Signal", "/org/asamk/Signal")
        live = await _introspect_xml(bus, "/org/asamk/Signal")
    finally:
        bus.disconnect()
    assert {i.name for i in node.interfaces} >= {"org.asamk.SignalControl"}
    recorded = (RECORDED / "control.xml").read_text(encoding="utf-8")
    assert interface_summary(live) == interface_summary(recorded)


@in_module_loop
async def test_jsonrpc_socket_answers(real_daemon: RealDaemon) -> None:
    client = SignalCliJsonRpcClient.unix(real_daemon.socket)
    await client.connect()
    try:
        assert await client.version() == SIGNAL_CLI_VERSION
        assert await client.list_accounts() == []
        with pytest.raises(SignalCliAccountNotFound):
            await client.send_text("+15555550123", "+15555550100", "hello")
    finally:
        await client.close()


@in_module_loop
async def test_jsonrpc_stdio_answers(real_daemon: RealDaemon) -> None:
    # A config folder of its own: signal-cli locks its folder against a second process.
    command = [
        *NO_NETWORK,
        str(find_signal_cli()),
        "--config",
        str(real_daemon.folder / "stdio-data"),
        "jsonRpc",
    ]
    env = daemon_environment(DaemonOptions(), find_java_home())
    client = SignalCliJsonRpcClient.stdio(command, call_timeout=READY, env=env)
    await client.connect()
    try:
        assert await client.version() == SIGNAL_CLI_VERSION
        assert await client.list_accounts() == []
    finally:
        await client.close()


@in_module_loop
async def test_the_start_command_runs_a_daemon_and_stops_it() -> None:
    with short_tmp() as folder:
        async with private_bus(folder) as address:
            process = await asyncio.create_subprocess_exec(
                *NO_NETWORK,
                sys.executable,
                "-m",
                "tigress_signal",
                "signal-cli",
                "start",
                "--check",
                "--wait",
                str(READY),
                "--config",
                str(folder / "data"),
                "--bus-address",
                address,
                "--socket",
                str(folder / "rpc.sock"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), READY + 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "signal-cli is running" in out.decode()
    assert "org.asamk.Signal" in out.decode() and "rpc.sock" in out.decode()


@in_module_loop
async def test_no_daemon_gives_one_clear_error() -> None:
    with short_tmp() as folder:
        async with private_bus(folder) as address:
            client = SignalCliDbusClient(bus_address=address)
            with pytest.raises(SignalCliUnavailable) as raised:
                await client.connect()
            await client.close()
        assert "no signal-cli daemon owns org.asamk.Signal" in raised.value.user_message()
        rpc = SignalCliJsonRpcClient.unix(folder / "nothing.sock")
        with pytest.raises(SignalCliUnavailable, match="cannot reach"):
            await rpc.connect()


async def _introspect_xml(bus: object, path: str) -> str:
    from dbus_fast import Message
    from dbus_fast.aio import MessageBus

    assert isinstance(bus, MessageBus)
    reply = await bus.call(
        Message(
            destination="org.asamk.Signal",
            path=path,
            interface="org.freedesktop.DBus.Introspectable",
            member="Introspect",
        )
    )
    assert reply is not None
    return str(reply.body[0])
