"""A peer's identity key changes (Bob reinstalls), and each trust policy's answer to it.

Everything is real: an intermediary on loopback, two wallets with their own libsignal sidecars.
Bob registers his account again with a new identity key (``Wallet.reset_identity``); Alice's
wallet then meets the new key when her send is answered 410 and she fetches his new bundle, or
when his messages from the new key arrive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tigress_signal.bridge.libsignal import LibsignalBridge
from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.errors import ConfigError, SafetyNumberMismatch, UntrustedIdentity
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.config import TrustPolicy
from tigress_signal.wallet.wallet import Wallet

WAIT = 20.0


@dataclass
class Party:
    """A wallet folder that can be opened, run, closed and opened again."""

    folder: Path
    wallet: Wallet
    loop: asyncio.Task[None] | None = field(default=None)

    @property
    def id(self) -> str:
        return self.wallet.account_id

    def run(self) -> None:
        self.loop = asyncio.create_task(self.wallet.shares.run())

    async def stop(self) -> None:
        await self.wallet.channel.close()
        if self.loop is not None:
            self.loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop
            self.loop = None

    async def reopen(self, *, run: bool = True) -> None:
        await self.stop()
        await self.wallet.aclose()
        self.wallet = await Wallet.open(self.folder)
        if run:
            self.run()

    async def reinstall(self) -> bytes:
        """Register again with a new identity, with the receive loop stopped meanwhile."""
        await self.stop()
        account = await self.wallet.reset_identity()
        await self.reopen()
        return account.identity_public_key


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as running:
        yield running


@contextlib.asynccontextmanager
async def two_parties(
    tmp_path: Path, server: IntermediaryServer, alice_policy: TrustPolicy
) -> AsyncIterator[tuple[Party, Party]]:
    alice = Party(
        tmp_path / "alice",
        await Wallet.create(tmp_path / "alice", server.url, trust_policy=alice_policy),
    )
    bob = Party(tmp_path / "bob", await Wallet.create(tmp_path / "bob", server.url))
    alice.run()
    bob.run()
    try:
        yield alice, bob
    finally:
        for party in (alice, bob):
            await party.stop()
            await party.wallet.aclose()


def token(text: bytes) -> ProvisioningInformation:
    return ProvisioningInformation(media_type="application/octet-stream", content=text)


async def completed_share(sender: Party, receiver: Party, text: bytes) -> str:
    """One stateless share from offer to accepted; returns its id."""
    share = await sender.wallet.shares.offer_provisioning(receiver.id, token(text), title="t")
    await receiver.wallet.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await receiver.wallet.shares.accept(share.share_id)
    await sender.wallet.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    return share.share_id


async def until(condition: object) -> None:
    """Wait for a condition the wallet has no event for (an envelope kept)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def waiting_at_server(tmp_path: Path, account: str) -> int:
    with contextlib.closing(sqlite3.connect(tmp_path / "server.db")) as db:
        row = db.execute("SELECT count(*) FROM messages WHERE account_uuid = ?", (account,))
        return int(row.fetchone()[0])


def received_shares(party: Party) -> list[str]:
    return [s.share_id for s in party.wallet.shares.shares() if s.role == "receiver"]


@pytest.mark.parametrize("policy", ["tofu", "verify"])
async def test_a_changed_key_stops_both_ways_until_trusted_then_everything_goes_through(
    tmp_path, server, policy
):
    async with two_parties(tmp_path, server, policy) as (alice, bob):
        if policy == "verify":
            with pytest.raises(UntrustedIdentity):
                await alice.wallet.shares.offer_provisioning(bob.id, token(b"x"), title="t")
            await alice.wallet.trust(bob.id)
        await completed_share(alice, bob, b"before")
        old_key = alice.wallet.store.load_record("identity", bob.id)

        new_key = await bob.reinstall()
        assert new_key != old_key

        # Alice's offer is stored, but stops at Bob's new key, naming Bob.
        with pytest.raises(UntrustedIdentity) as caught:
            await alice.wallet.shares.offer_provisioning(bob.id, token(b"after"), title="t")
        assert caught.value.peer == bob.id
        (pending,) = [s for s in alice.wallet.shares.shares() if s.state is ShareState.OFFERED]
        assert caught.value.stored_share == pending.share_id
        identity = alice.wallet.peer_identity(bob.id)
        assert identity.changed and not identity.can_send
        assert identity.newest_key == new_key
        assert alice.wallet.store.load_record("identity", bob.id) == old_key

        # What Bob sends from the new key arrives and is kept, unread, at Alice's.
        offer = await bob.wallet.shares.offer_provisioning(alice.id, token(b"from new"), title="n")
        await until(lambda: len(alice.wallet.store.held_envelopes(bob.id)) == 1)
        assert offer.share_id not in received_shares(alice)

        # Both sides compute the same number over Bob's new key.
        alice_sees = await alice.wallet.safety_number(bob.id)
        bob_sees = await bob.wallet.safety_number(alice.id)
        assert alice_sees.digits == bob_sees.digits

        # Kept messages survive a restart; wrong digits store nothing.
        await alice.reopen()
        assert len(alice.wallet.store.held_envelopes(bob.id)) == 1
        wrong = str((int(alice_sees.digits) + 1) % 10**60).zfill(60)
        with pytest.raises(SafetyNumberMismatch):
            await alice.wallet.trust(bob.id, wrong)
        assert alice.wallet.store.load_record("identity", bob.id) == old_key
        assert alice.wallet.peer_identity(bob.id).changed
        assert len(alice.wallet.store.held_envelopes(bob.id)) == 1

        # Trust with the right digits: the kept offer is processed once, the stored one goes.
        # The kept offer is taken up by trust itself, or by the share service that the reopen
        # started (it replays kept messages at start) if that got to it first: once either way.
        taken_by_trust = await alice.wallet.trust(bob.id, alice_sees.digits)
        await until(lambda: alice.wallet.store.held_envelopes() == [])
        assert taken_by_trust in (0, 1)
        assert alice.wallet.store.load_record("identity", bob.id) == new_key
        assert alice.wallet.shares.share(offer.share_id).state is ShareState.OFFERED
        assert await alice.wallet.shares.process_held() == 0
        await bob.wallet.shares.wait_for(pending.share_id, [ShareState.OFFERED], WAIT)

        # And the shares finish, in both directions, over the new sessions.
        await alice.wallet.shares.accept(offer.share_id)
        await bob.wallet.shares.wait_for(offer.share_id, [ShareState.ACCEPTED], WAIT)
        await bob.wallet.shares.accept(pending.share_id)
        await alice.wallet.shares.wait_for(pending.share_id, [ShareState.ACCEPTED], WAIT)
        assert [c.content for c in alice.wallet.shares.credentials()] == [b"from new"]
        await completed_share(alice, bob, b"later")


async def test_always_lets_everything_through_and_stores_the_new_key(tmp_path, server, caplog):
    async with two_parties(tmp_path, server, "always") as (alice, bob):
        await completed_share(alice, bob, b"before")
        new_key = await bob.reinstall()

        await completed_share(alice, bob, b"after")
        assert alice.wallet.store.load_record("identity", bob.id) == new_key
        await completed_share(bob, alice, b"back")
        assert alice.wallet.store.held_envelopes() == []
        assert any(
            bob.id in r.getMessage() and "changed" in r.getMessage()
            for r in caplog.records
            if r.name == "tigress_signal.adapters.selfhosted"
        )
        # The warning names the peer, never the key.
        spellings = (new_key.hex(), base64.b64encode(new_key).decode(), repr(new_key))
        assert not any(k in r.getMessage() for r in caplog.records for k in spellings)


async def test_verify_receives_from_a_first_key_but_answers_only_after_trust(tmp_path, server):
    async with two_parties(tmp_path, server, "verify") as (alice, bob):
        offer = await bob.wallet.shares.offer_provisioning(alice.id, token(b"hello"), title="t")
        await alice.wallet.shares.wait_for(offer.share_id, [ShareState.OFFERED], WAIT)
        assert not alice.wallet.peer_identity(bob.id).can_send

        with pytest.raises(UntrustedIdentity) as caught:
            await alice.wallet.shares.accept(offer.share_id)
        assert caught.value.peer == bob.id
        assert alice.wallet.shares.share(offer.share_id).state is ShareState.OFFERED
        assert alice.wallet.shares.credentials() == []

        digits = (await bob.wallet.safety_number(alice.id)).digits
        spaced = " ".join(digits[i : i + 5] for i in range(0, 60, 5))
        assert await alice.wallet.trust(bob.id, spaced) == 0
        assert alice.wallet.peer_identity(bob.id).verified
        await alice.wallet.shares.accept(offer.share_id)
        await bob.wallet.shares.wait_for(offer.share_id, [ShareState.ACCEPTED], WAIT)


async def test_verify_refuses_first_contact_and_remembers_the_key_it_saw(tmp_path, server):
    async with two_parties(tmp_path, server, "verify") as (alice, bob):
        with pytest.raises(UntrustedIdentity) as caught:
            await alice.wallet.shares.offer_provisioning(bob.id, token(b"x"), title="t")
        assert caught.value.peer == bob.id
        assert alice.wallet.shares.shares() == []  # nothing stored, nothing sent
        assert caught.value.stored_share is None
        identity = alice.wallet.peer_identity(bob.id)
        assert identity.trusted_key is None
        assert identity.newest_key == bob.wallet.account.identity_public_key

        with pytest.raises(ConfigError):
            await alice.wallet.trust(bob.id, "12345")
        assert alice.wallet.store.load_record("verified_identity", bob.id) is None
        # The number Bob would show, computed apart from both wallets.
        async with LibsignalBridge() as bridge:
            bobs = await bridge.safety_number(
                bob.id,
                bob.wallet.account.identity_public_key,
                alice.id,
                alice.wallet.account.identity_public_key,
            )
        assert (await alice.wallet.safety_number(bob.id)).digits == bobs.digits
        await alice.wallet.trust(bob.id, bobs.digits)
        await completed_share(alice, bob, b"now")


async def test_tofu_trusts_first_contact_without_asking(tmp_path, server):
    async with two_parties(tmp_path, server, "tofu") as (alice, bob):
        await completed_share(alice, bob, b"first")
        identity = alice.wallet.peer_identity(bob.id)
        assert identity.can_send and not identity.changed and not identity.verified


async def test_kept_messages_of_a_trusted_peer_are_processed_at_the_next_start(tmp_path, server):
    async with two_parties(tmp_path, server, "tofu") as (alice, bob):
        await completed_share(alice, bob, b"before")
        await bob.reinstall()
        offer = await bob.wallet.shares.offer_provisioning(alice.id, token(b"kept"), title="n")
        await until(lambda: len(alice.wallet.store.held_envelopes(bob.id)) == 1)

        # The trust is stored, but the process stops before the kept message is processed
        # (its channel is closed already, so nothing is taken up).
        await alice.stop()
        assert await alice.wallet.trust(bob.id) == 0
        assert len(alice.wallet.store.held_envelopes(bob.id)) == 1
        assert offer.share_id not in received_shares(alice)

        # The next start takes it up, once.
        await alice.reopen()
        await alice.wallet.shares.wait_for(offer.share_id, [ShareState.OFFERED], WAIT)
        assert alice.wallet.store.held_envelopes() == []
        await alice.wallet.shares.accept(offer.share_id)
        await bob.wallet.shares.wait_for(offer.share_id, [ShareState.ACCEPTED], WAIT)
        assert [c.content for c in alice.wallet.shares.credentials()] == [b"kept"]


async def test_kept_messages_are_processed_in_the_order_they_arrived(tmp_path, server):
    async with two_parties(tmp_path, server, "tofu") as (alice, bob):
        await completed_share(alice, bob, b"before")
        await bob.reinstall()
        # An offer, then its cancellation: taken the other way round, the cancel would be
        # refused (no such share yet) and the offer would stay open.
        offer = await bob.wallet.shares.offer_provisioning(alice.id, token(b"x"), title="n")
        await bob.wallet.shares.cancel(offer.share_id)
        await until(lambda: len(alice.wallet.store.held_envelopes(bob.id)) == 2)
        # Kept by the wallet, so no longer stored at the intermediary.
        await until(lambda: waiting_at_server(tmp_path, alice.id) == 0)

        assert await alice.wallet.trust(bob.id) == 2
        assert alice.wallet.shares.share(offer.share_id).state is ShareState.CANCELLED
        assert alice.wallet.store.held_envelopes() == []


async def test_reset_identity_waits_for_an_empty_outbox(tmp_path, server):
    async with two_parties(tmp_path, server, "tofu") as (alice, bob):
        await bob.stop()
        before = bob.wallet.account
        with bob.wallet.store.transaction() as conn:
            conn.execute(
                "INSERT INTO outbox (message_id, share_id, peer, wire, created_at)"
                " VALUES ('m', 's', ?, x'00', '2026-01-01T00:00:00+00:00')",
                (alice.id,),
            )
        with pytest.raises(ConfigError, match="outbox"):
            await bob.wallet.reset_identity()
        assert bob.wallet.account == before
        with bob.wallet.store.transaction() as conn:
            conn.execute("DELETE FROM outbox")
        await bob.reopen()
        await completed_share(alice, bob, b"old identity still works")


def one_time_prekeys_at_server(tmp_path: Path, account: str) -> int:
    with contextlib.closing(sqlite3.connect(tmp_path / "server.db")) as db:
        query = "SELECT count(*) FROM one_time_prekeys WHERE account_uuid = ?"
        row = db.execute(query, (account,))
        return int(row.fetchone()[0])


async def test_outbox_retries_to_a_refused_key_take_none_of_the_peers_prekeys(tmp_path, server):
    async with two_parties(tmp_path, server, "tofu") as (alice, bob):
        await completed_share(alice, bob, b"before")
        await bob.reinstall()
        with pytest.raises(UntrustedIdentity):
            await alice.wallet.shares.offer_provisioning(bob.id, token(b"after"), title="t")
        left = one_time_prekeys_at_server(tmp_path, bob.id)
        # More retries than the server's bundle-fetch burst: none of them fetches a bundle.
        for _ in range(12):
            await alice.wallet.shares.deliver_outbox()
        assert one_time_prekeys_at_server(tmp_path, bob.id) == left
        assert alice.wallet.peer_identity(bob.id).changed


async def test_a_reset_identity_puts_its_new_keys_on_the_rotation_schedule(tmp_path, server):
    async with two_parties(tmp_path, server, "always") as (alice, bob):
        rows = "SELECT kind, key_id FROM rotating_prekeys ORDER BY kind"
        before = bob.wallet.store.connection.execute(rows).fetchall()
        await bob.reinstall()
        after = bob.wallet.store.connection.execute(rows).fetchall()
        assert [kind for kind, _ in after] == ["last_resort_kyber", "signed_prekey"]
        # Fresh ids, with their records; the old identity's keys are gone.
        assert not set(after) & set(before)
        for kind, key_id in after:
            if kind == "last_resort_kyber":
                assert bob.wallet.store.has_record("kyber_prekey", str(key_id))
            else:
                assert bob.wallet.store.has_record("signed_prekey", str(key_id))
        await completed_share(alice, bob, b"after the reset")
