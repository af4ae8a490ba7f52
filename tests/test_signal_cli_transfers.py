"""Both transfers end to end over signal-cli, through the fake daemon, over D-Bus and JSON-RPC.

The wallets are real (store, share service, channel chosen by ``wallet.toml``); only signal-cli
and Signal's servers are played by ``tigress_signal.testing.fake_signal_cli``, on a private
dbus-daemon or a socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from signal_cli_fixtures import ALICE, BOB, WAIT, private_bus, receiving, short_tmp
from tigress_signal.credentials import ProvisioningInformation, ReferenceLock
from tigress_signal.errors import UnknownPeer, UntrustedIdentity
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState
from tigress_signal.testing.fake_signal_cli import FakeDbusDaemon, FakeJsonRpcDaemon, FakeSignal
from tigress_signal.wallet.config import SignalCliSettings
from tigress_signal.wallet.wallet import Wallet


@dataclass
class World:
    signal: FakeSignal
    alice: Wallet
    bob: Wallet
    transport: str


@contextlib.asynccontextmanager
async def world(transport: str, folder: Path) -> AsyncIterator[World]:
    signal = FakeSignal()
    signal.register(ALICE)
    signal.register(BOB)
    async with contextlib.AsyncExitStack() as stack:
        if transport == "dbus":
            address = await stack.enter_async_context(private_bus(folder))
            daemon: FakeDbusDaemon | FakeJsonRpcDaemon = FakeDbusDaemon(
                signal, [ALICE, BOB], address
            )

            def settings(account: str) -> SignalCliSettings:
                return SignalCliSettings(account=account, bus_address=address)

        else:
            socket = folder / "rpc.sock"
            daemon = FakeJsonRpcDaemon(signal, [ALICE, BOB], socket_path=socket)

            def settings(account: str) -> SignalCliSettings:
                return SignalCliSettings(account=account, socket=socket)

        await daemon.start()
        stack.push_async_callback(daemon.stop)
        alice = await Wallet.create_signal_cli(
            folder / "alice",
            settings(ALICE),
            transport=transport,  # type: ignore[arg-type]
        )
        stack.push_async_callback(alice.aclose)
        bob = await Wallet.create_signal_cli(
            folder / "bob",
            settings(BOB),
            transport=transport,  # type: ignore[arg-type]
        )
        stack.push_async_callback(bob.aclose)
        await stack.enter_async_context(receiving(alice, bob))
        yield World(signal, alice, bob, transport)


@pytest.fixture(params=["dbus", "jsonrpc"])
async def people(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    with short_tmp() as folder:
        async with world(request.param, folder) as w:
            yield w


async def test_both_transfers_end_to_end(people: World) -> None:
    alice, bob = people.alice, people.bob
    assert alice.channel.name == f"signal-cli-{people.transport}"
    assert alice.account_id == ALICE

    # Stateless: an access token, offered and accepted.
    offered = await alice.shares.offer_access_token(BOB, ["room:1207"], title="Room 1207")
    await bob.shares.wait_for(offered.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.accept(offered.share_id)
    await alice.shares.wait_for(offered.share_id, [ShareState.ACCEPTED], WAIT)
    token = bob.shares.credential(offered.share_id)
    assert token.from_peer == ALICE
    assert bob.shares.share(offered.share_id).peer == ALICE

    # Stateful: a digital key the receiver's device makes and the owner endorses.
    now = datetime.now(UTC)
    terms = DigitalKeyTerms("front-door", ("unlock",), now, now + timedelta(days=1))
    key_share = await alice.shares.offer_digital_key(BOB, terms, title="Front door")
    await bob.shares.wait_for(key_share.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.accept(key_share.share_id)
    await bob.shares.wait_for(key_share.share_id, [ShareState.ACCEPTED], WAIT)
    await alice.shares.wait_for(key_share.share_id, [ShareState.ACCEPTED], WAIT)
    key = bob.shares.digital_key(key_share.share_id)
    lock = ReferenceLock("front-door", alice.shares.owner_key("front-door").public_key_der)
    challenge = lock.challenge()
    lock.unlock(key.endorsement, key.holder.respond(challenge, "front-door"))

    # Every Signal message carried a readable first line; nothing is left half-assembled.
    first_lines = {text.split("\n", 1)[0] for _s, _r, text in people.signal.sent}
    assert "Credential offer: Room 1207" in first_lines
    for wallet in (alice, bob):
        rows = wallet.store.connection.execute("SELECT count(*) FROM signal_cli_parts")
        assert rows.fetchone()[0] == 0
        inbox = wallet.store.connection.execute("SELECT count(*) FROM signal_cli_inbox")
        assert inbox.fetchone()[0] == 0
    assert len(bob.shares.shares()) == 2  # legacy D-Bus signals were not taken as copies


async def test_a_large_credential_is_split_and_reassembled(people: World) -> None:
    alice, bob = people.alice, people.bob
    content = bytes(range(256)) * 40  # 10 KiB: several Signal messages
    provisioning = ProvisioningInformation(media_type="application/octet-stream", content=content)
    share = await alice.shares.offer_provisioning(BOB, provisioning, title="Big key")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    offers = [t for s, _r, t in people.signal.sent if s == ALICE]
    assert len(offers) > 5
    assert all(len(t.encode()) <= 2000 for t in offers)
    await bob.shares.accept(share.share_id)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    assert bob.shares.credential(share.share_id).content == content


async def test_chat_text_is_ignored(people: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    people.signal.send(ALICE, BOB, "hi Bob, a key is coming your way 🔑")
    share = await people.alice.shares.offer_access_token(BOB, ["gym"], title="Gym")
    await people.bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    assert len(people.bob.shares.shares()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_invalid_number_stores_nothing(people: World) -> None:
    with pytest.raises(UnknownPeer, match=r"E\.164"):
        await people.alice.shares.offer_access_token("0151 1234", ["x"], title="Nobody")
    assert people.alice.shares.shares() == []
    assert people.signal.sent == []


async def test_an_unregistered_user_ends_the_share(people: World) -> None:
    with pytest.raises(UnknownPeer, match="not registered"):
        await people.alice.shares.offer_access_token("+15555550999", ["x"], title="Nobody")
    (share,) = people.alice.shares.shares()
    assert share.state is ShareState.CANCELLED
    outbox = people.alice.store.connection.execute("SELECT count(*) FROM outbox")
    assert outbox.fetchone()[0] == 0


async def test_an_untrusted_identity_keeps_the_offer_for_later(people: World) -> None:
    people.signal.untrusted.add((ALICE, BOB))
    with pytest.raises(UntrustedIdentity) as raised:
        await people.alice.shares.offer_access_token(BOB, ["x"], title="Later")
    assert raised.value.peer == BOB
    (share,) = people.alice.shares.shares()
    assert share.state is ShareState.OFFERED
    assert people.signal.sent == []

    # Once the key is trusted, the stored offer goes out unchanged.
    people.signal.untrusted.clear()
    await people.alice.shares.deliver_outbox()
    await people.bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
