"""Broken sessions over the real stack: decryption errors, a fresh session and one resend.

Sessions really diverge here by restoring Bob's wallet folder from an older copy (taken while
the wallet was closed) after more messages were exchanged: Bob's restored ratchet state no
longer matches Alice's, so her next message fails at Bob with a bad MAC. A second scenario drops
Bob's session record for Alice (no session at all). Either way the credential must still arrive
exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tigress_signal.adapters.selfhosted import SelfHostedChannel
from tigress_signal.adapters.session_repair import SessionRepair
from tigress_signal.bridge.libsignal import MessageType
from tigress_signal.errors import (
    DuplicateMessage,
    InvalidMessage,
    InvalidSignature,
    NoSession,
    SignalProtocolError,
    UnknownPreKey,
    UntrustedIdentity,
)
from tigress_signal.intermediary.client import IntermediaryClient, OutgoingMessage
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet import send_log
from tigress_signal.wallet.store import WalletStore
from tigress_signal.wallet.wallet import Wallet
from wallet_helpers import free_port, receiving, token

WAIT = 30.0
REPAIR_LOGGER = "tigress_signal.adapters.session_repair"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    config = IntermediaryConfig(
        port=free_port(), database_url=f"sqlite:///{tmp_path / 'intermediary.db'}"
    )
    async with IntermediaryServer(config) as running:
        yield running


def client_of(wallet: Wallet, url: str) -> IntermediaryClient:
    client = IntermediaryClient(url)
    account = wallet.account
    client.authenticate(account.account_id, account.device_id, account.password)
    return client


def records_of(wallet: Wallet) -> list[tuple[str, str, bytes]]:
    rows = wallet.store.connection.execute("SELECT kind, key, value FROM records ORDER BY 1, 2")
    return [(k, key, bytes(v)) for k, key, v in rows]


def count(wallet: Wallet, table: str) -> int:
    return int(wallet.store.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait for a state the wallets reach in their background loops (no event to await)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def queue_emptied(client: IntermediaryClient) -> None:
    """Wait until a device's queue at the intermediary is empty (every envelope acknowledged)."""
    async with asyncio.timeout(WAIT):
        while (await client.list_messages()).messages:  # noqa: ASYNC110 - a server's queue
            await asyncio.sleep(0.05)


async def complete_share(alice: Wallet, bob: Wallet, text: str) -> str:
    share = await alice.shares.offer_provisioning(bob.account_id, token(text), title=text)
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.accept(share.share_id)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    return share.share_id


async def test_a_wallet_restored_from_an_older_copy_gets_the_credential_once(
    server, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger=REPAIR_LOGGER)
    folder = tmp_path / "bob"
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(folder, server.url)
    async with alice:
        async with receiving(alice), receiving(bob):
            await complete_share(alice, bob, "one")
        await bob.aclose()
        shutil.copytree(folder, tmp_path / "bob-backup")

        # More messages move both ratchets on; then Bob's folder is put back as it was.
        bob = await Wallet.open(folder)
        async with bob, receiving(alice), receiving(bob):
            await complete_share(alice, bob, "two")
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "bob-backup", folder)

        bob = await Wallet.open(folder)
        async with bob, receiving(alice), receiving(bob):
            share = await alice.shares.offer_provisioning(
                bob.account_id, token("three"), title="three"
            )
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(share.share_id)
            await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
            await bob.shares.wait_idle(0.5)

            # The restored Bob holds what he had then, and the new credential once.
            assert sorted(c.content for c in bob.shares.credentials()) == [b"one", b"three"]
            assert bob.shares.share(share.share_id).state is ShareState.ACCEPTED
            # One decryption error, one resend on a new session.
            assert len(messages(caplog, "sent a decryption error")) == 1
            resent = messages(caplog, "resent message")
            assert len(resent) == 1 and share.share_id in resent[0]
            # The share has ended: Alice's send log keeps nothing of it, her outbox is empty.
            assert count(alice, "outbox") == 0
            rows = alice.store.connection.execute(
                "SELECT count(*) FROM send_log WHERE share_id = ?", (share.share_id,)
            ).fetchone()
            assert rows[0] == 0


async def test_a_lost_session_record_is_repaired_and_the_share_completes(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REPAIR_LOGGER)
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    async with alice, bob:
        async with receiving(alice), receiving(bob):
            await complete_share(alice, bob, "first")
        # Bob loses his session with Alice (his copy and the sidecar's), and what he knew of
        # her device: his error must find her registration id in her bundle.
        key = f"{alice.account_id}.{alice.account.device_id}"
        with bob.store.transaction() as conn:
            conn.execute("DELETE FROM records WHERE kind = 'session' AND key = ?", (key,))
            conn.execute("DELETE FROM peer_devices WHERE peer = ?", (alice.account_id,))
        await bob._bridge.evict([("session", key)])  # type: ignore[union-attr]

        async with receiving(alice), receiving(bob):
            share_id = await complete_share(alice, bob, "second")
        assert sorted(c.content for c in bob.shares.credentials()) == [b"first", b"second"]
        assert alice.shares.share(share_id).state is ShareState.ACCEPTED
        assert len(messages(caplog, "sent a decryption error")) == 1
        assert len(messages(caplog, "resent message")) == 1


async def test_forged_and_garbage_decryption_errors_change_nothing(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REPAIR_LOGGER)
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    async with alice, bob:
        async with receiving(alice), receiving(bob):
            await complete_share(alice, bob, "first")
            await alice.shares.wait_idle(0.5)
        before = records_of(alice)
        # A real decryption-error message about a real ciphertext of Alice's, but naming a
        # timestamp she never sent at, and one naming another device of her account.
        sealed = await alice.channel.seal(bob.account_id, b"{}")
        await alice.channel.settle(sealed, stored=False)
        ciphertext = base64_content(sealed.wire)
        bridge = bob._bridge
        assert bridge is not None
        unknown = await bridge.decryption_error(ciphertext, MessageType.WHISPER, 42, 1)
        other_device = await bridge.decryption_error(ciphertext, MessageType.WHISPER, 42, 7)
        alice_device = OutgoingMessage(
            type=8,
            destination_device_id=alice.account.device_id,
            destination_registration_id=alice.account.registration_id,
            content=b"",
        )
        async with client_of(bob, server.url) as client:
            for content in (b"garbage", b"\x00" * 40, unknown, other_device):
                await client.send_messages(
                    alice.account_id, [alice_device.model_copy(update={"content": content})]
                )

        async with client_of(alice, server.url) as own, receiving(alice):
            # Every one of them is taken off Alice's queue (an envelope both listed over REST
            # and pushed may be looked at twice; dropping it is the same each time).
            await queue_emptied(own)
        async with client_of(bob, server.url) as client:
            # An error is never answered with another one.
            assert (await client.list_messages()).messages == []
        garbage = {line.split()[2] for line in messages(caplog, "not a decryption error")}
        assert len(garbage) == 2
        assert messages(caplog, "no message sent at 42")
        assert messages(caplog, "it is about device 7")
        assert messages(caplog, "resent message") == []
        assert records_of(alice) == before
        assert count(alice, "outbox") == 0

        # The receive loop goes on with genuine messages.
        async with receiving(alice), receiving(bob):
            share_id = await complete_share(alice, bob, "second")
        assert alice.shares.share(share_id).state is ShareState.ACCEPTED


async def test_resends_stop_at_the_limit_and_copies_are_dropped(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REPAIR_LOGGER)
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    async with alice, bob, client_of(bob, server.url) as bob_client:
        share = await alice.shares.offer_provisioning(bob.account_id, token("once"), title="x")
        (original,) = (await bob_client.list_messages()).messages
        bridge = bob._bridge
        assert bridge is not None
        # Bob (playing a hostile peer) reports the same message three times.
        error = await bridge.decryption_error(
            original.content, original.type, original.timestamp, original.source_device
        )
        report = OutgoingMessage(
            type=8,
            destination_device_id=alice.account.device_id,
            destination_registration_id=alice.account.registration_id,
            content=error,
        )
        for _ in range(3):
            await bob_client.send_messages(alice.account_id, [report])
        async with client_of(alice, server.url) as own, receiving(alice):
            # (an envelope both listed and pushed may be dropped twice: the same each time)
            await eventually(lambda: bool(messages(caplog, "was resent 2 times")))
            await queue_emptied(own)
        assert len(messages(caplog, "resent message")) == 2
        assert count(alice, "outbox") == 0
        logged = send_log.find(alice.store.connection, bob.account_id, original.timestamp)
        assert logged is not None and logged.resends == 2

        # Bob gets the original and two resends with the same message id: one offer.
        copies = (await bob_client.list_messages()).messages
        assert len(copies) == 3
        assert {c.timestamp for c in copies} == {original.timestamp}
        async with receiving(alice), receiving(bob):
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(share.share_id)
            await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
            await bob.shares.wait_idle(0.5)
            assert (await bob_client.list_messages()).messages == []
        assert [c.content for c in bob.shares.credentials()] == [b"once"]
        assert len(bob.shares.shares()) == 1


async def test_a_resend_is_stored_with_the_new_session_before_the_error_is_acknowledged(
    server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    async with alice, bob, client_of(bob, server.url) as bob_client:
        share = await alice.shares.offer_provisioning(bob.account_id, token("safe"), title="x")
        (original,) = (await bob_client.list_messages()).messages
        bridge = bob._bridge
        assert bridge is not None
        error = await bridge.decryption_error(
            original.content, original.type, original.timestamp, original.source_device
        )
        await bob_client.send_messages(
            alice.account_id,
            [
                OutgoingMessage(
                    type=8,
                    destination_device_id=alice.account.device_id,
                    destination_registration_id=alice.account.registration_id,
                    content=error,
                )
            ],
        )
        channel = alice.channel
        assert isinstance(channel, SelfHostedChannel)
        channel.on_outbox = None  # keep the resend in the outbox to look at it
        async with client_of(alice, server.url) as alice_client:
            (report,) = (await alice_client.list_messages()).messages

            # Alice handles the error, and dies before the intermediary hears of it.
            async def dies_first() -> None:
                return None

            assert await channel._open(report, dies_first) is None
            outbox = alice.store.connection.execute("SELECT message_id, peer FROM outbox")
            ((resend_id, peer),) = outbox.fetchall()
            assert resend_id.endswith(str(share_envelope_id(alice, share.share_id)))
            assert peer == bob.account_id
            logged = send_log.find(alice.store.connection, bob.account_id, original.timestamp)
            assert logged is not None and logged.resends == 1
            assert len((await bob_client.list_messages()).messages) == 1  # not delivered yet

            # After the restart the error comes again: it is dropped, nothing is resent twice.
            assert (
                await channel._open(report, lambda: alice_client.acknowledge(report.guid)) is None
            )
            assert (await alice_client.list_messages()).messages == []
            assert count(alice, "outbox") == 1
            logged = send_log.find(alice.store.connection, bob.account_id, original.timestamp)
            assert logged is not None and logged.resends == 1

        await alice.shares.deliver_outbox()
        assert count(alice, "outbox") == 0
        assert len((await bob_client.list_messages()).messages) == 2
        async with receiving(alice), receiving(bob):
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(share.share_id)
            await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
        assert [c.content for c in bob.shares.credentials()] == [b"safe"]


def share_envelope_id(wallet: Wallet, share_id: str) -> str:
    """The transfer message id of the offer a sender logged for a share."""
    row = wallet.store.connection.execute(
        "SELECT message_id FROM send_log WHERE share_id = ?", (share_id,)
    ).fetchone()
    return str(row[0])


async def test_an_error_from_a_device_never_sent_to_is_dropped(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REPAIR_LOGGER)
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    async with alice, bob, client_of(bob, server.url) as bob_client:
        await alice.shares.offer_provisioning(bob.account_id, token("one"), title="x")
        (original,) = (await bob_client.list_messages()).messages
        bridge = bob._bridge
        assert bridge is not None
        error = await bridge.decryption_error(
            original.content, original.type, original.timestamp, original.source_device
        )
        # Bob links a second device, which reports Alice's message although it never got it.
        signed = await bridge.generate_signed_prekey(900)
        (last_resort,) = await bridge.generate_kyber_prekeys(900, 1)
        code = await bob_client.issue_link_code()
        async with IntermediaryClient(server.url) as second:
            linked = await second.link_device(
                verification_code=code.verification_code,
                registration_id=4242,
                signed_prekey=signed.public(),
                pq_last_resort_prekey=last_resort.public(),
            )
            second.authenticate(linked.uuid, linked.device_id, linked.password)
            await second.send_messages(
                alice.account_id,
                [
                    OutgoingMessage(
                        type=8,
                        destination_device_id=alice.account.device_id,
                        destination_registration_id=alice.account.registration_id,
                        content=error,
                    )
                ],
            )
        async with receiving(alice):
            await eventually(lambda: bool(messages(caplog, "never sent to its device")))
        assert messages(caplog, "resent message") == []
        assert count(alice, "outbox") == 0
        logged = send_log.find(alice.store.connection, bob.account_id, original.timestamp)
        assert logged is not None and logged.resends == 0
        assert not alice.store.has_record("session", f"{bob.account_id}.{linked.device_id}")


@pytest.mark.parametrize(
    ("error", "reported"),
    [
        (InvalidMessage("bad mac"), True),
        (NoSession("no session"), True),
        (UnknownPreKey("no such signed prekey"), True),
        (DuplicateMessage("seen"), False),
        (UntrustedIdentity("changed key", peer="p"), False),
        (InvalidSignature("bad signature"), False),
        (SignalProtocolError("refused parameter"), False),
    ],
)
def test_only_diverged_sessions_are_reported(error, reported):
    assert SessionRepair.breaks_session(error) is reported


def base64_content(wire: bytes) -> bytes:
    import base64
    import json

    return base64.b64decode(json.loads(wire)["messages"][0]["content"])


# -- the send log --------------------------------------------------------------------------------


def test_the_send_log_expires_and_forgets_ended_shares(tmp_path):
    with WalletStore.open(tmp_path / "w") as store:
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO shares (share_id, role, peer, flow, state, credential_format,"
                " title, description, expires_at, created_at, updated_at, offer)"
                " VALUES ('s', 'sender', 'p', 'stateless', 'offered', 'x', 't', '', '', '', '',"
                " x'')"
            )
            for n, message in enumerate(("m1", "m2")):
                send_log.record(
                    conn,
                    send_log.LoggedMessage("p", 1000 + n, message, "s", b"secret", 0),
                    keep_seconds=60,
                    now=1000,
                )
            send_log.record(
                conn,
                send_log.LoggedMessage("p", 1000, "m3", "s", b"clash", 0),
                keep_seconds=60,
                now=1000,
            )
            # Nothing is kept when the window is 0.
            send_log.record(
                conn,
                send_log.LoggedMessage("p", 5, "m4", "s", b"x", 0),
                keep_seconds=0,
                now=1000,
            )
        conn = store.connection
        first = send_log.find(conn, "p", 1000, now=1001)
        assert first is not None and first.message_id == "m1" and first.payload == b"secret"
        assert send_log.find(conn, "p", 5, now=1001) is None
        assert send_log.find(conn, "other", 1000, now=1001) is None
        assert send_log.find(conn, "p", 1000, now=61_000) is None  # expired

        with store.transaction() as conn:
            send_log.count_resend(conn, "p", 1000)
            # An open share keeps its entries.
            assert send_log.forget_ended_share(conn, "s", keep=None) == 0
            conn.execute("UPDATE shares SET state = 'accepted' WHERE share_id = 's'")
            assert send_log.forget_ended_share(conn, "s", keep="m2") == 1
        kept = send_log.find(store.connection, "p", 1001, now=1001)
        assert kept is not None and kept.message_id == "m2"
        with store.transaction() as conn:
            assert send_log.purge_expired(conn, now=61_000) == 1
        assert store.connection.execute("SELECT count(*) FROM send_log").fetchone()[0] == 0
