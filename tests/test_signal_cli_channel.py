"""The signal-cli channel's durability and reconnection, and the ``signal-cli`` commands.

Runs over the fake daemon (``tigress_signal.testing.fake_signal_cli``) on a private
dbus-daemon and on a socket.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from signal_cli_fixtures import ALICE, BOB, WAIT, private_bus, receiving, short_tmp
from tigress_signal.adapters.signal_cli import SignalCliChannel
from tigress_signal.adapters.text_format import encode_parts
from tigress_signal.bridge.signal_cli_dbus import SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.shares.states import ShareState
from tigress_signal.testing.fake_signal_cli import (
    LINK_URI,
    LINKED,
    FakeDbusDaemon,
    FakeJsonRpcDaemon,
    FakeSignal,
)
from tigress_signal.wallet.config import SignalCliSettings
from tigress_signal.wallet.store import WalletStore
from tigress_signal.wallet.wallet import Wallet


def fake_signal() -> FakeSignal:
    signal = FakeSignal()
    signal.register(ALICE)
    signal.register(BOB)
    return signal


@pytest.mark.parametrize("transport", ["dbus", "jsonrpc"])
async def test_messages_wait_at_signal_while_the_wallet_is_away(transport: str) -> None:
    # Manual receive mode: nothing is fetched for Bob until his wallet subscribes, so offers
    # sent while it is closed are all there when it opens (no eager fetch that loses them).
    with short_tmp() as folder:
        signal = fake_signal()
        async with private_bus(folder) as address:
            if transport == "dbus":
                daemon: FakeDbusDaemon | FakeJsonRpcDaemon = FakeDbusDaemon(
                    signal, [ALICE, BOB], address
                )
                settings = {"bus_address": address}
            else:
                daemon = FakeJsonRpcDaemon(signal, [ALICE, BOB], socket_path=folder / "s")
                settings = {"socket": str(folder / "s")}
            await daemon.start()
            kind: Literal["dbus", "jsonrpc"] = "dbus" if transport == "dbus" else "jsonrpc"
            bob = await Wallet.create_signal_cli(
                folder / "bob", SignalCliSettings(account=BOB, **settings), transport=kind
            )
            await bob.aclose()
            async with await Wallet.create_signal_cli(
                folder / "alice", SignalCliSettings(account=ALICE, **settings), transport=kind
            ) as alice:
                shares = [
                    await alice.shares.offer_access_token(BOB, [f"room:{n}"], title=f"Room {n}")
                    for n in range(5)
                ]
            assert signal.waiting(BOB) == 5
            async with await Wallet.open(folder / "bob") as bob, receiving(bob):
                for share in shares:
                    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await daemon.stop()


async def test_a_message_not_committed_is_handed_out_again(tmp_path: Path) -> None:
    with short_tmp() as folder:
        signal = fake_signal()
        daemon = FakeJsonRpcDaemon(signal, [ALICE, BOB], socket_path=folder / "s")
        await daemon.start()
        store = WalletStore.open(tmp_path / "bob")
        try:
            (text,) = encode_parts(b'{"hello": 1}', "Hello")
            signal.send(ALICE, BOB, text)

            # signal-cli hands the message over; the wallet dies before committing.
            channel = SignalCliChannel(store, SignalCliJsonRpcClient.unix(folder / "s"), BOB)
            await channel.start()
            first = await anext(aiter(channel.receive()))
            await channel.close()
            assert signal.waiting(BOB) == 0  # Signal no longer has it: only our inbox does

            channel = SignalCliChannel(store, SignalCliJsonRpcClient.unix(folder / "s"), BOB)
            await channel.start()
            again = await anext(aiter(channel.receive()))
            assert (again.envelope_id, again.payload, again.peer) == (
                first.envelope_id,
                b'{"hello": 1}',
                ALICE,
            )
            assert again.record_changes == ()
            await channel.acknowledge(again)
            await channel.close()
            rows = store.connection.execute("SELECT count(*) FROM signal_cli_inbox").fetchone()
            assert rows[0] == 0
        finally:
            store.close()
            await daemon.stop()


async def test_dbus_daemon_restart_is_followed() -> None:
    with short_tmp() as folder:
        signal = fake_signal()
        async with private_bus(folder) as address:
            daemon = FakeDbusDaemon(signal, [ALICE, BOB], address)
            await daemon.start()
            settings = {"bus_address": address}
            alice = await Wallet.create_signal_cli(
                folder / "alice", SignalCliSettings(account=ALICE, **settings), transport="dbus"
            )
            bob = await Wallet.create_signal_cli(
                folder / "bob", SignalCliSettings(account=BOB, **settings), transport="dbus"
            )
            async with alice, bob, receiving(alice, bob):
                await asyncio.sleep(0.2)
                await daemon.stop()  # the daemon dies: its name and subscriptions go
                daemon = FakeDbusDaemon(signal, [ALICE, BOB], address)
                await daemon.start()  # ...and comes back with a new unique name
                await _until(lambda: daemon.subscribers[BOB] > 0)
                share = await alice.shares.offer_access_token(BOB, ["gym"], title="Gym")
                await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await daemon.stop()


async def test_jsonrpc_daemon_restart_is_followed() -> None:
    with short_tmp() as folder:
        signal = fake_signal()
        daemon = FakeJsonRpcDaemon(signal, [ALICE, BOB], socket_path=folder / "s")
        await daemon.start()
        settings = {"socket": str(folder / "s")}
        alice = await Wallet.create_signal_cli(
            folder / "alice", SignalCliSettings(account=ALICE, **settings), transport="jsonrpc"
        )
        bob = await Wallet.create_signal_cli(
            folder / "bob", SignalCliSettings(account=BOB, **settings), transport="jsonrpc"
        )
        async with alice, bob, receiving(alice, bob):
            await asyncio.sleep(0.2)
            await daemon.stop()
            await daemon.start()
            await _until(lambda: len(signal.mailboxes[BOB].listeners) > 0)
            await _until(lambda: len(signal.mailboxes[ALICE].listeners) > 0)
            share = await alice.shares.offer_access_token(BOB, ["pool"], title="Pool")
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
        await daemon.stop()


async def test_single_account_daemon_and_out_of_order_answers() -> None:
    with short_tmp() as folder:
        signal = fake_signal()
        async with private_bus(folder) as address:
            daemon = FakeDbusDaemon(signal, [BOB], address, single_account=True)
            await daemon.start()
            client = SignalCliDbusClient(bus_address=address)
            await client.connect()
            assert not client.multi_account
            assert await client.list_accounts() == [BOB]
            assert await client.account_path(BOB) == "/org/asamk/Signal"
            await client.close()
            await daemon.stop()
        rpc = FakeJsonRpcDaemon(signal, [ALICE, BOB], tcp_port=0)
        await rpc.start()
        client_rpc = SignalCliJsonRpcClient.tcp_loopback("127.0.0.1", rpc.port)
        await client_rpc.connect()
        answers = await asyncio.gather(
            *[client_rpc.version() if n % 2 else client_rpc.list_accounts() for n in range(20)]
        )
        assert answers == ["0.13.19" if n % 2 else [ALICE, BOB] for n in range(20)]
        await client_rpc.close()
        await rpc.stop()


async def test_commands(tmp_path: Path) -> None:
    with short_tmp() as folder:
        signal = fake_signal()
        async with private_bus(folder) as address:
            daemon = FakeDbusDaemon(signal, [ALICE, BOB], address)
            rpc = FakeJsonRpcDaemon(signal, [ALICE, BOB], socket_path=folder / "s")
            await daemon.start()
            await rpc.start()
            dbus = ["--bus-address", address]
            socket = ["--socket", str(folder / "s")]

            status, out, _ = await run_cli("signal-cli", "accounts", *dbus)
            assert (status, out.split()) == (0, [ALICE, BOB])
            status, out, _ = await run_cli("signal-cli", "accounts", *socket)
            assert (status, out.split()) == (0, [ALICE, BOB])

            status, out, _ = await run_cli("signal-cli", "link", "--wait", "10", *dbus)
            assert status == 0 and LINK_URI in out and f"linked: {LINKED}" in out
            status, out, _ = await run_cli("signal-cli", "link", *socket)
            assert status == 0 and LINK_URI in out and f"linked: {LINKED}" in out

            status, out, _ = await run_cli(
                "signal-cli",
                "init-wallet",
                str(tmp_path / "w"),
                "--account",
                "+1 555 555 0100",
                *socket,
            )
            assert (status, out.strip()) == (0, ALICE)
            status, out, _ = await run_cli("wallet", "show", str(tmp_path / "w"))
            assert status == 0 and "signal-cli-jsonrpc" in out
            await daemon.stop()
            await rpc.stop()

            # No daemon: one line that says what to do, no traceback.
            status, out, err = await run_cli("signal-cli", "accounts", *dbus)
            assert status == 1
            assert err.count("\n") == 1 and "no signal-cli daemon" in err and "start" in err
            status, out, err = await run_cli(
                "share",
                "--wallet",
                str(tmp_path / "w"),
                "--to",
                BOB,
                "--access-token",
                "x",
                "--title",
                "t",
            )
            assert status == 1 and err.count("\n") == 1 and "cannot reach" in err


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tigress_signal",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls state the fake owns
            await asyncio.sleep(0.05)


_FAKE_SIGNAL_CLI = """#!{python}
# Stands in for signal-cli's start script: serves the fake JSON-RPC daemon on --socket; the
# first run exits after a moment, as a crashing daemon would.
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from tigress_signal.testing.fake_signal_cli import FakeJsonRpcDaemon, FakeSignal

args = sys.argv[1:]
assert args[args.index("daemon") + 1 : args.index("daemon") + 3] == ["--receive-mode", "manual"]
socket = Path(args[args.index("--socket") + 1])
runs = Path({runs!r})
runs.write_text(runs.read_text() + "run\\n" if runs.exists() else "run\\n")

async def main():
    signal = FakeSignal()
    daemon = FakeJsonRpcDaemon(signal, [], socket_path=socket)
    await daemon.start()
    await asyncio.sleep(0.5 if runs.read_text().count("run") == 1 else 3600)
    await daemon.stop()

asyncio.run(main())
"""


async def test_the_launcher_restarts_a_daemon_that_exits() -> None:
    from tigress_signal.signal_cli.daemon import DaemonOptions, SignalCliDaemon

    with short_tmp() as folder:
        script = folder / "signal-cli"
        runs = folder / "runs"
        script.write_text(
            _FAKE_SIGNAL_CLI.format(
                python=sys.executable, tests=str(Path(__file__).parent), runs=str(runs)
            )
        )
        script.chmod(0o755)
        options = DaemonOptions(dbus=False, socket=folder / "rpc.sock")
        daemon = SignalCliDaemon(options, signal_cli=script, java_home=folder)
        stop = asyncio.Event()
        supervisor = asyncio.create_task(daemon.supervise(stop, ready_timeout=WAIT))
        await _until(lambda: runs.exists() and runs.read_text().count("run") == 2)
        await _until((folder / "rpc.sock").exists)
        client = SignalCliJsonRpcClient.unix(folder / "rpc.sock")
        await client.connect()
        assert await client.version() == "0.13.19"
        await client.close()
        stop.set()
        await asyncio.wait_for(supervisor, WAIT)
        assert daemon.pid is None
