"""Our clients and our fake against signal-cli 0.13.19's own D-Bus and JSON-RPC classes.

``signal_cli_stub/StubDaemon.java`` loads signal-cli's jars and runs its real ``DbusHandler``
and ``SignalJsonRpcDispatcherHandler`` over a made-up account (no network, no Signal server).
So the account object's introspection, the signals, the JSON-RPC notifications and the error
names and codes below come from signal-cli's code, not from our fake; the tests compare the
fake with them and run our clients against them.

It needs ``javac`` (17 is enough: the harness only uses reflection), signal-cli and a Java 21+
runtime, all installed by ``scripts/setup.sh``; without them these tests fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from signal_cli_fixtures import ALICE, BOB, private_bus, short_tmp
from tigress_signal.adapters.text_format import encode_parts, parse_part
from tigress_signal.bridge.signal_cli_client import ReceivedText
from tigress_signal.bridge.signal_cli_dbus import SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.errors import SignalCliUnregisteredUser, SignalCliUntrustedIdentity
from tigress_signal.signal_cli.daemon import find_java_home, find_signal_cli
from tigress_signal.testing.fake_signal_cli import (
    FakeDbusDaemon,
    FakeJsonRpcDaemon,
    FakeSignal,
    interface_summary,
)

HARNESS = Path(__file__).parent / "signal_cli_stub" / "StubDaemon.java"
ACCOUNT_PATH = f"/org/asamk/Signal/_{BOB[1:]}"
READY = 60.0


class Stub:
    """A running StubDaemon: send it commands, read what signal-cli asked it to send."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    async def receiving(self) -> None:
        """Wait until signal-cli has added its receive handler (after subscribeReceive)."""
        async with asyncio.timeout(READY):
            while "receiver added" not in self.log.read_text():  # noqa: ASYNC110 - a log file
                await asyncio.sleep(0.05)

    async def deliver(self, sender: str, timestamp: int, text: str) -> None:
        assert self.process.stdin is not None
        encoded = base64.b64encode(text.encode()).decode()
        self.process.stdin.write(f"deliver {sender} {timestamp} {encoded}\n".encode())
        await self.process.stdin.drain()

    async def next_sent(self) -> tuple[str, str]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 20)
        word, recipient, text = line.decode().split()
        assert word == "sent"
        return recipient, base64.b64decode(text).decode()


@contextlib.asynccontextmanager
async def stub_daemon(folder: Path, *args: str, bus_address: str = "") -> AsyncIterator[Stub]:
    classes = folder / "classes"
    javac = shutil.which("javac")
    assert javac, "javac is needed to build the harness (scripts/setup.sh installs it)"
    compiler = await asyncio.create_subprocess_exec(
        javac, "--release", "17", "-d", str(classes), str(HARNESS)
    )
    assert await asyncio.wait_for(compiler.wait(), 120) == 0, "javac failed on the harness"
    lib = find_signal_cli().resolve().parent.parent / "lib"
    java = find_java_home() / "bin" / "java"
    log = (folder / "stub.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        "unshare",
        "--net",
        str(java),
        "--enable-native-access=ALL-UNNAMED",
        "-cp",
        f"{classes}:{lib}/*",
        "StubDaemon",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env={"DBUS_SESSION_BUS_ADDRESS": bus_address, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    try:
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), READY)
        assert ready == b"ready\n", ready
        yield Stub(process, folder / "stub.log")
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        log.close()


async def introspect(bus: MessageBus, path: str) -> str:
    reply = await bus.call(
        Message(
            destination="org.asamk.Signal",
            path=path,
            interface="org.freedesktop.DBus.Introspectable",
            member="Introspect",
        )
    )
    assert reply is not None and not reply.error_name, reply
    return str(reply.body[0])


async def test_dbus_objects_signals_and_errors_match_signal_cli() -> None:
    with short_tmp() as folder:
        async with private_bus(folder) as address:
            # What signal-cli's own DbusHandler exports for one account.
            bus = await MessageBus(bus_address=address).connect()
            paths = ("/org/asamk/Signal", ACCOUNT_PATH, f"{ACCOUNT_PATH}/Configuration")
            async with stub_daemon(folder, "dbus", BOB, bus_address=address) as stub:
                real = {path: await introspect(bus, path) for path in paths}
                client = SignalCliDbusClient(bus_address=address)
                await client.connect()
                assert await client.list_accounts() == [BOB]
                texts = client.receive(BOB)
                first = asyncio.ensure_future(anext(texts))
                await stub.receiving()
                await stub.deliver(ALICE, 1_700_000_000_001, "hello from alice ✓")
                received = await asyncio.wait_for(first, 20)
                assert received == ReceivedText(
                    BOB, ALICE, None, 1_700_000_000_001, "hello from alice ✓"
                )

                # A transfer part survives signal-cli's D-Bus text path byte for byte.
                (part,) = encode_parts(b'{"demo": true}', "Credential offer: Room 12")
                await stub.deliver(ALICE, 1_700_000_000_002, part)
                again = await asyncio.wait_for(anext(texts), 20)
                assert parse_part(again.text) == parse_part(part)

                # Sending goes through signal-cli's sendMessage; failures map to our errors.
                receipt = await client.send_text(BOB, ALICE, "to alice")
                assert receipt.timestamp > 0
                assert await stub.next_sent() == (ALICE, "to alice")
                with pytest.raises(SignalCliUntrustedIdentity) as untrusted:
                    await client.send_text(BOB, ALICE, "FAIL:identity")
                assert untrusted.value.recipient == ALICE
                await stub.next_sent()
                with pytest.raises(SignalCliUnregisteredUser):
                    await client.send_text(BOB, ALICE, "FAIL:unregistered")
                await client.close()
                await texts.aclose()

            # What our fake exports for the same account: the same interfaces and children.
            signal = FakeSignal()
            signal.register(BOB)
            fake = FakeDbusDaemon(signal, [BOB], address)
            await fake.start()
            try:
                for path in paths:
                    assert interface_summary(await introspect(bus, path)) == interface_summary(
                        real[path]
                    ), path
            finally:
                await fake.stop()
                bus.disconnect()


def recording(client: SignalCliJsonRpcClient) -> list[dict[str, Any]]:
    """Keep every JSON object the client reads, as it arrived."""
    lines: list[dict[str, Any]] = []
    dispatch = client._dispatch

    def record(line: bytes) -> None:
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            lines.append(parsed if isinstance(parsed, dict) else {"batch": parsed})
        dispatch(line)

    client._dispatch = record  # type: ignore[method-assign]
    return lines


async def subscribed(client: SignalCliJsonRpcClient) -> None:
    """Wait until signal-cli confirmed the subscription (its first one can take a while)."""
    async with asyncio.timeout(READY):
        while not client._subscriptions:  # noqa: ASYNC110 - set by the client's reader
            await asyncio.sleep(0.02)


def shape(value: object) -> object:
    """The keys of nested objects, without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__


def covered(fake: object, real: object) -> bool:
    """Whether every key the fake sends is one signal-cli sends too, nested alike."""
    if isinstance(fake, dict):
        return isinstance(real, dict) and all(
            key in real and covered(item, real[key]) for key, item in fake.items()
        )
    return fake == real or "NoneType" in (fake, real)


async def test_the_fake_notifications_are_shaped_like_signal_cli() -> None:
    with short_tmp() as folder:
        socket = folder / "rpc.sock"
        async with stub_daemon(folder, "jsonrpc", BOB, str(socket)) as stub:
            client = SignalCliJsonRpcClient.unix(socket, call_timeout=20)
            await client.connect()
            real = recording(client)
            texts = client.receive(BOB)
            first = asyncio.ensure_future(anext(texts))
            await stub.receiving()
            await stub.deliver(ALICE, 1_700_000_000_004, "hi")
            await asyncio.wait_for(first, 20)
            await client.send_text(BOB, ALICE, "to alice")
            await client.close()
            await texts.aclose()
        signal = FakeSignal()
        signal.register(ALICE)
        signal.register(BOB)
        fake_daemon = FakeJsonRpcDaemon(signal, [BOB], socket_path=folder / "fake.sock")
        await fake_daemon.start()
        client = SignalCliJsonRpcClient.unix(folder / "fake.sock")
        await client.connect()
        fake = recording(client)
        texts = client.receive(BOB)
        first = asyncio.ensure_future(anext(texts))
        await subscribed(client)
        signal.send(ALICE, BOB, "hi")
        await asyncio.wait_for(first, 20)
        await client.send_text(BOB, ALICE, "to alice")
        await client.close()
        await texts.aclose()
        await fake_daemon.stop()

    def notification(lines: list[dict[str, Any]]) -> object:
        return shape(next(line for line in lines if line.get("method") == "receive"))

    def send_answer(lines: list[dict[str, Any]]) -> object:
        return shape(next(line for line in lines if "timestamp" in str(line.get("result"))))

    assert covered(notification(fake), notification(real)), (
        notification(fake),
        notification(real),
    )
    assert covered(send_answer(fake), send_answer(real))


async def test_jsonrpc_notifications_results_and_errors_match_signal_cli() -> None:
    with short_tmp() as folder:
        socket = folder / "rpc.sock"
        async with stub_daemon(folder, "jsonrpc", BOB, str(socket)) as stub:
            client = SignalCliJsonRpcClient.unix(socket, call_timeout=20)
            await client.connect()
            assert await client.version()
            assert await client.list_accounts() == [BOB]
            texts = client.receive(BOB)
            first = asyncio.ensure_future(anext(texts))
            await stub.receiving()
            await stub.deliver("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa", 1_700_000_000_003, "hi")
            received = await asyncio.wait_for(first, 20)
            assert received.sender == "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
            assert (received.account, received.timestamp, received.text) == (
                BOB,
                1_700_000_000_003,
                "hi",
            )

            receipt = await client.send_text(BOB, ALICE, "to alice")
            assert receipt.timestamp > 0
            assert receipt.recipient_number == ALICE
            assert await stub.next_sent() == (ALICE, "to alice")
            with pytest.raises(SignalCliUntrustedIdentity) as untrusted:
                await client.send_text(BOB, ALICE, "FAIL:identity")
            assert untrusted.value.error_name == "jsonrpc:-4"
            assert untrusted.value.recipient == ALICE
            await stub.next_sent()
            with pytest.raises(SignalCliUnregisteredUser):
                await client.send_text(BOB, ALICE, "FAIL:unregistered")
            await client.close()
            await texts.aclose()
