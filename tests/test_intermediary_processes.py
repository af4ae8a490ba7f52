"""Two ``tigress-signal serve`` processes sharing one PostgreSQL database.

A message sent through one process reaches a WebSocket held by the other at once: the sender's
process stores it and sends a PostgreSQL notification, and the other process, listening, wakes
the connection (there is no polling anywhere in the delivery path, so arriving at all proves
the notification). Checked in both directions, for ``online`` messages (presence is shared), for
the "connected elsewhere" hand-over, and after one process is killed and started again.
The processes use the real libsignal sidecar, so the accounts carry real keys.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from intermediary_fixtures import POSTGRES
from tigress_signal.errors import ChannelClosed
from tigress_signal.intermediary.client import IntermediaryClient, MessageStream, OutgoingMessage
from tigress_signal.storage.throwaway import free_loopback_port

WAIT = 10.0
START_TIMEOUT = 60.0


@dataclass
class ServeProcess:
    """One ``tigress-signal serve`` child process."""

    port: int
    database_url: str
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tigress_signal",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--database",
                    self.database_url,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
            while True:
                assert self.process is not None and self.process.poll() is None, self.log_text()
                try:
                    if (await http.get(f"{self.url}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert loop.time() < deadline, f"not ready in time: {self.log_text()}"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise
        return self.process.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
async def shared_database() -> str:
    return await POSTGRES.new_database()


@pytest.fixture
def processes(tmp_path: Path, shared_database: str) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    a = ServeProcess(free_loopback_port(), shared_database, tmp_path / "a.log")
    b = ServeProcess(free_loopback_port(), shared_database, tmp_path / "b.log")
    try:
        yield a, b
    finally:
        for process in (a, b):
            if process.process is not None and process.process.poll() is None:
                process.stop()


@dataclass
class Party:
    client: IntermediaryClient
    uuid: str
    registration_id: int


@pytest.fixture
async def make_party(bridge_wallets) -> AsyncIterator[Any]:
    made: list[IntermediaryClient] = []

    async def make(name: str, url: str) -> Party:
        wallet = await bridge_wallets(name, prekeys=2)
        client = IntermediaryClient(url)
        made.append(client)
        created = await client.create_account(
            identity_key=wallet.identity.public_key,
            registration_id=wallet.identity.registration_id,
            signed_prekey=wallet.signed_prekey.public(),
            pq_last_resort_prekey=wallet.last_resort.public(),
        )
        client.authenticate(created.uuid, created.device_id, created.password)
        return Party(client, created.uuid, wallet.identity.registration_id)

    yield make
    for client in made:
        await client.aclose()


async def send(sender: Party, recipient: Party, content: bytes, *, online: bool = False) -> None:
    message = OutgoingMessage(
        type=1,
        destination_device_id=1,
        destination_registration_id=recipient.registration_id,
        content=content,
    )
    await sender.client.send_message(recipient.uuid, message, online=online)


async def received(stream: MessageStream) -> bytes:
    delivery = await asyncio.wait_for(stream.receive(), WAIT)
    assert delivery is not None
    await delivery.acknowledge()
    return delivery.envelope.content


async def online_message_is_dropped(sender: Party, recipient: Party) -> bool:
    """Whether an online message to an absent recipient is dropped, within ``WAIT`` seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        await send(sender, recipient, b"dropped", online=True)
        stored = await recipient.client.list_all_messages()
        if not stored:
            return True
        for envelope in stored:
            await recipient.client.acknowledge(envelope.guid)
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)


def on(party: Party, url: str) -> IntermediaryClient:
    """The same device's credentials, talking to another process."""
    client = IntermediaryClient(url)
    assert party.client.credentials is not None
    client.credentials = party.client.credentials
    return client


async def test_two_processes_deliver_to_each_others_websockets(processes, make_party):
    a, b = processes
    a.start()
    b.start()
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    alice = await make_party("alice", a.url)  # talks to A
    bob = await make_party("bob", b.url)  # talks to B

    async with bob.client.connect_websocket() as bob_stream:
        await send(alice, bob, b"A to a WebSocket on B")
        assert await received(bob_stream) == b"A to a WebSocket on B"

        async with alice.client.connect_websocket() as alice_stream:
            await send(bob, alice, b"B to a WebSocket on A")
            assert await received(alice_stream) == b"B to a WebSocket on A"
            # Presence is shared: an online message through B finds Alice connected on A.
            await send(bob, alice, b"online", online=True)
            assert await received(alice_stream) == b"online"

            # Alice connecting again through B closes her connection on A with 4409.
            alice_on_b = on(alice, b.url)
            async with alice_on_b.connect_websocket():
                with pytest.raises(ChannelClosed):
                    await asyncio.wait_for(alice_stream.receive(), WAIT)
                assert alice_stream.close_code == 4409
            await alice_on_b.aclose()

        # With nobody connected for Alice, an online message is dropped. A closed socket's
        # presence row goes a moment after the client sees the close (the server's handler
        # has to run), so the check allows that moment rather than racing it.
        assert await online_message_is_dropped(bob, alice)


async def test_delivery_after_a_process_is_killed_and_restarted(processes, make_party):
    a, b = processes
    a.start()
    b.start()
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    alice = await make_party("alice", a.url)
    bob = await make_party("bob", b.url)

    async with alice.client.connect_websocket() as alice_stream:
        a.kill()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(alice_stream.receive(), WAIT)

    # While A is down, B stores for Alice; B keeps delivering to Bob.
    await send(bob, alice, b"while A was down")
    bob_on_b = bob.client
    async with bob_on_b.connect_websocket() as bob_stream:
        a.start()
        await a.wait_ready()
        async with alice.client.connect_websocket() as alice_stream:
            assert await received(alice_stream) == b"while A was down"
            await send(bob, alice, b"B to restarted A")
            assert await received(alice_stream) == b"B to restarted A"
            await send(alice, bob, b"restarted A to B")
            assert await received(bob_stream) == b"restarted A to B"

    # Both stop cleanly on SIGTERM.
    assert a.stop() == 0, a.log_text()
    assert b.stop() == 0, b.log_text()
