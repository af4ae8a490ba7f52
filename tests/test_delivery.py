"""Delivery under stress, over the real stack in one process: order, copies, forgeries,
outages and many shares at once. Every credential must arrive exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tigress_signal.channel import SealedMessage
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.intermediary.config import IntermediaryConfig, RateLimit
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.wallet import Wallet
from wallet_helpers import free_port, receiving, token

WAIT = 30.0


@pytest.fixture
def server_config(tmp_path: Path) -> IntermediaryConfig:
    return IntermediaryConfig(
        port=free_port(), database_url=f"sqlite:///{tmp_path / 'intermediary.db'}"
    )


def client_of(wallet: Wallet, url: str) -> IntermediaryClient:
    client = IntermediaryClient(url)
    account = wallet.account
    client.authenticate(account.account_id, account.device_id, account.password)
    return client


def records_of(wallet: Wallet) -> list[tuple[str, str, bytes]]:
    rows = wallet.store.connection.execute("SELECT kind, key, value FROM records ORDER BY 1, 2")
    return [(k, key, bytes(v)) for k, key, v in rows]


async def test_several_first_messages_before_any_reply_all_arrive(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob:
            # Three offers while Bob is offline: each is a PreKey message on a new session.
            shares = [
                await alice.shares.offer_provisioning(
                    bob.account_id, token(f"key {n}"), title=f"{n}"
                )
                for n in range(3)
            ]
            async with receiving(bob):
                for share in shares:
                    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
                for share in shares:
                    await bob.shares.accept(share.share_id)
            contents = sorted(c.content for c in bob.shares.credentials())
            assert contents == [b"key 0", b"key 1", b"key 2"]


async def test_messages_out_of_order_all_decrypt(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob:
            first = await alice.shares.offer_provisioning(bob.account_id, token("0"), title="0")
            async with receiving(alice), receiving(bob):
                await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
                await bob.shares.accept(first.share_id)  # Bob answers: the session is mutual
                await alice.shares.wait_for(first.share_id, [ShareState.ACCEPTED], WAIT)
            later = [
                await alice.shares.offer_provisioning(bob.account_id, token(f"{n}"), title=f"{n}")
                for n in range(1, 5)
            ]
            # Bob takes the stored messages newest first, as a network might reorder them.
            async with client_of(bob, server.url) as client:
                envelopes = await client.list_all_messages()
                assert len(envelopes) == 4
                for envelope in reversed(envelopes):
                    incoming = await bob.channel._open(  # type: ignore[attr-defined]
                        envelope, lambda guid=envelope.guid: client.acknowledge(guid)
                    )
                    assert incoming is not None
                    await bob.shares.handle(incoming)
                assert (await client.list_messages()).messages == []
            assert {bob.shares.share(s.share_id).state for s in later} == {ShareState.OFFERED}


async def test_a_forged_message_changes_nothing_and_the_next_genuine_one_arrives(
    server_config, tmp_path
):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, receiving(alice), receiving(bob):
            first = await alice.shares.offer_provisioning(bob.account_id, token("a"), title="a")
            await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
            # Once Bob has answered, Alice's messages are Whisper messages, MACed end to end.
            await bob.shares.accept(first.share_id)
            await alice.shares.wait_for(first.share_id, [ShareState.ACCEPTED], WAIT)
            await bob.shares.wait_idle(0.5)
            before = records_of(bob)

            # Seal a real message, flip one byte of its ciphertext, and deliver only that.
            sealed = await alice.channel.seal(bob.account_id, b"{}")
            await alice.channel.settle(sealed, stored=False)
            document = json.loads(sealed.wire)
            content = bytearray(base64.b64decode(document["messages"][0]["content"]))
            assert document["messages"][0]["type"] == 1  # a Whisper message
            content[-1] ^= 0x01  # its last bytes are the MAC
            document["messages"][0]["content"] = base64.b64encode(content).decode()
            forged = SealedMessage(bob.account_id, json.dumps(document).encode())
            await alice.channel.deliver(forged)
            await asyncio.sleep(1.0)
            await bob.shares.wait_idle(0.5)
            assert records_of(bob) == before

            second = await alice.shares.offer_provisioning(bob.account_id, token("b"), title="b")
            await bob.shares.wait_for(second.share_id, [ShareState.OFFERED], WAIT)


async def test_an_intermediary_restart_during_a_transfer_delays_it_and_loses_nothing(
    server_config, tmp_path
):
    server = IntermediaryServer(server_config)
    await server.start()
    alice = await Wallet.create(tmp_path / "alice", server.url)
    bob = await Wallet.create(tmp_path / "bob", server.url)
    try:
        async with alice, bob, receiving(alice), receiving(bob):
            # A first share, so that each side has sent to the other before the outage.
            first = await alice.shares.offer_provisioning(bob.account_id, token("j"), title="j")
            await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(first.share_id)
            await alice.shares.wait_for(first.share_id, [ShareState.ACCEPTED], WAIT)

            share = await alice.shares.offer_provisioning(bob.account_id, token("k"), title="k")
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)

            await server.stop()
            # Bob accepts while the intermediary is down: the answer waits in his outbox.
            await bob.shares.accept(share.share_id)
            outbox = bob.store.connection.execute("SELECT count(*) FROM outbox").fetchone()
            assert outbox[0] == 1

            server = IntermediaryServer(server_config)
            await server.start()
            await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
            assert sorted(c.content for c in bob.shares.credentials()) == [b"j", b"k"]
    finally:
        await server.stop()


async def test_many_shares_between_many_wallets_at_once(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        wallets = [await Wallet.create(tmp_path / f"w{n}", server.url) for n in range(4)]
        async with contextlib.AsyncExitStack() as stack:
            for wallet in wallets:
                await stack.enter_async_context(wallet)
                await stack.enter_async_context(receiving(wallet))

            async def offer(sender: Wallet, receiver: Wallet, n: int) -> str:
                text = f"{sender.account_id}->{receiver.account_id}#{n}"
                share = await sender.shares.offer_provisioning(
                    receiver.account_id, token(text), title=f"#{n}"
                )
                return share.share_id

            pairs = [(s, r) for s in wallets for r in wallets if s is not r]
            share_ids = await asyncio.gather(*(offer(s, r, n) for s, r in pairs for n in range(3)))
            receivers = [r for s, r in pairs for n in range(3)]

            async def accept(receiver: Wallet, share_id: str) -> None:
                await receiver.shares.wait_for(share_id, [ShareState.OFFERED], WAIT)
                await receiver.shares.accept(share_id)

            await asyncio.gather(
                *(accept(r, i) for r, i in zip(receivers, share_ids, strict=True))
            )
            senders = [s for s, r in pairs for n in range(3)]
            await asyncio.gather(
                *(
                    s.shares.wait_for(i, [ShareState.ACCEPTED], WAIT)
                    for s, i in zip(senders, share_ids, strict=True)
                )
            )
            for wallet in wallets:
                received = [c.content.decode() for c in wallet.shares.credentials()]
                assert len(received) == 9  # 3 shares from each of the 3 others, once each
                assert len(set(received)) == 9
                assert all(text.split("->")[1].startswith(wallet.account_id) for text in received)


async def test_a_drained_prekey_pool_is_refilled_and_old_keys_still_work(server_config, tmp_path):
    # A lenient bundle-fetch limit: this test plays someone draining a pool on purpose.
    lenient = server_config.model_copy(
        update={"bundle_fetch_rate": RateLimit(burst=1000, per_second=100.0)}
    )
    async with IntermediaryServer(lenient) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, client_of(alice, server.url) as taker:
            # Someone takes most of Bob's one-time keys while he is offline.
            for _ in range(80):
                await taker.fetch_bundle(bob.account_id)
            async with client_of(bob, server.url) as own:
                drained = await own.prekey_counts()
                assert (drained.count, drained.pq_count) == (20, 20)
                # Alice starts her session with a bundle taken before the refill.
                share = await alice.shares.offer_provisioning(
                    bob.account_id, token("x"), title="x"
                )
                async with receiving(bob):
                    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
                    refilled = await own.prekey_counts()
            assert (refilled.count, refilled.pq_count) == (100, 100)
            # New ids, never one handed out before.
            ids = [
                int(k)
                for (k,) in bob.store.connection.execute(
                    "SELECT key FROM records WHERE kind = 'prekey'"
                )
            ]
            assert len(ids) == len(set(ids))
            assert max(ids) == 200


async def test_a_rate_limited_send_waits_and_then_goes_out(server_config, tmp_path, caplog):
    # One message at once per pair, then one every two seconds.
    strict = server_config.model_copy(update={"message_rate": RateLimit(burst=1, per_second=0.5)})
    async with IntermediaryServer(strict) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, receiving(alice), receiving(bob):
            first = await alice.shares.offer_provisioning(bob.account_id, token("1"), title="1")
            second = await alice.shares.offer_provisioning(bob.account_id, token("2"), title="2")
            assert any("asked to wait" in r.getMessage() for r in caplog.records)
            for share in (first, second):
                await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            outbox = alice.store.connection.execute("SELECT count(*) FROM outbox").fetchone()
            assert outbox[0] == 0


async def test_a_half_open_connection_is_noticed_and_nothing_is_lost(tmp_path, caplog):
    # The intermediary runs as its own process so that it can be frozen (SIGSTOP): its TCP
    # connections stay open but nothing answers, as after a NAT drop or a hung host.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(  # noqa: ASYNC220 - starts at once; waits are polled below
        [sys.executable, "-m", "tigress_signal", "serve", "--port", str(port),
         "--database", f"sqlite:///{tmp_path / 'intermediary.db'}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as probe:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get(f"{url}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        alice = await Wallet.create(tmp_path / "alice", url)
        await alice.aclose()
        bob = await Wallet.create(tmp_path / "bob", url)
        await bob.aclose()
        for folder in (tmp_path / "alice", tmp_path / "bob"):
            config = (folder / "wallet.toml").read_text()
            (folder / "wallet.toml").write_text(
                config.replace("keepalive_seconds = 20.0", "keepalive_seconds = 1.0")
            )
        alice = await Wallet.open(tmp_path / "alice")
        bob = await Wallet.open(tmp_path / "bob")
        async with alice, bob, receiving(alice), receiving(bob):
            first = await alice.shares.offer_provisioning(bob.account_id, token("1"), title="1")
            await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(first.share_id)
            await alice.shares.wait_for(first.share_id, [ShareState.ACCEPTED], WAIT)

            caplog.clear()
            process.send_signal(signal.SIGSTOP)
            # A missed keepalive (1 s to answer, 1 s to close) and both wallets give the
            # connection up; allow a few seconds on a busy machine.
            for _ in range(80):
                lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
                if len(lost) >= 2:
                    break
                await asyncio.sleep(0.1)
            assert len(lost) >= 2, [r.getMessage() for r in caplog.records]
            process.send_signal(signal.SIGCONT)

            second = await alice.shares.offer_provisioning(bob.account_id, token("2"), title="2")
            await bob.shares.wait_for(second.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(second.share_id)
            await alice.shares.wait_for(second.share_id, [ShareState.ACCEPTED], WAIT)
            assert sorted(c.content for c in bob.shares.credentials()) == [b"1", b"2"]
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(15)
        log.close()


async def _link_device(
    bob: Wallet, url: str, registration_id: int, key_id: int
) -> tuple[int, str]:
    """Link a second device to Bob's account, with keys signed by Bob's identity."""
    bridge = bob._bridge
    assert bridge is not None
    signed = await bridge.generate_signed_prekey(key_id)
    (last_resort,) = await bridge.generate_kyber_prekeys(key_id, 1)
    async with client_of(bob, url) as own, IntermediaryClient(url) as fresh:
        code = await own.issue_link_code()
        linked = await fresh.link_device(
            verification_code=code.verification_code,
            registration_id=registration_id,
            signed_prekey=signed.public(),
            pq_last_resort_prekey=last_resort.public(),
        )
    return int(linked.device_id), linked.password


async def test_sends_follow_the_recipients_devices(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        bob_reg = bob.account.registration_id
        async with alice, bob, receiving(alice), receiving(bob):
            first = await alice.shares.offer_provisioning(bob.account_id, token("1"), title="1")
            await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
            assert alice.store.peer_devices(bob.account_id) == {1: bob_reg}

            async def messages_of(device_id: int, password: str) -> int:
                async with IntermediaryClient(server.url) as device:
                    device.authenticate(bob.account_id, device_id, password)
                    return len((await device.list_messages()).messages)

            # A new device (409 missingDevices): Alice's next message reaches it too.
            second_device, password = await _link_device(bob, server.url, 4242, 900)
            second = await alice.shares.offer_provisioning(bob.account_id, token("2"), title="2")
            await bob.shares.wait_for(second.share_id, [ShareState.OFFERED], WAIT)
            assert alice.store.peer_devices(bob.account_id) == {1: bob_reg, second_device: 4242}
            assert await messages_of(second_device, password) == 1

            # The device is removed (409 extraDevices): Alice stops sending to it.
            async with client_of(bob, server.url) as own:
                await own.remove_device(second_device)
            third = await alice.shares.offer_provisioning(bob.account_id, token("3"), title="3")
            await bob.shares.wait_for(third.share_id, [ShareState.OFFERED], WAIT)
            assert alice.store.peer_devices(bob.account_id) == {1: bob_reg}

            # Linked again under the same id with a new registration id: Alice learns it (410
            # staleDevices, or 409 since she had dropped it) and the new device gets the message.
            again, password = await _link_device(bob, server.url, 4343, 901)
            assert again == second_device
            fourth = await alice.shares.offer_provisioning(bob.account_id, token("4"), title="4")
            await bob.shares.wait_for(fourth.share_id, [ShareState.OFFERED], WAIT)
            assert alice.store.peer_devices(bob.account_id) == {1: bob_reg, again: 4343}
            assert await messages_of(again, password) == 1
            outbox = alice.store.connection.execute("SELECT count(*) FROM outbox").fetchone()
            assert outbox[0] == 0
